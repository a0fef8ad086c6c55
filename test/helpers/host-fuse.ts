import { type ChildProcess, spawn } from "node:child_process";
import { closeSync, openSync, read, writeSync } from "node:fs";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import type { MountConfig, VfsRule } from "../../src/vfs/index.ts";
import type { FuseServer } from "../../src/vfs/server.ts";

/**
 * Drives a FuseServer with the host's real kernel, no VM: opens /dev/fuse, mounts it with mount(2)
 * (koffi, as root), reads each request the kernel queues, feeds it to the server and writes the
 * reply back. The very server the VM relay will use thus answers real tools (git, tar, python...)
 * running on the host.
 *
 * The server runs in a child process (`mountInChild`): a test that touches the mount from the process
 * serving it can deadlock (a synchronous fs call blocks the event loop the answer needs). `serveDevFuse`
 * is the in-process part the child runs.
 */

const MS_NOSUID = 2;
const MS_NODEV = 4;
const MNT_DETACH = 2;

interface Libc {
  mount: (src: string, target: string, type: string, flags: number, data: string) => number;
  umount2: (target: string, flags: number) => number;
  errno: () => number;
}

let libc: Libc | undefined;
function load(): Libc {
  if (libc) return libc;
  const koffi = createRequire(import.meta.url)("koffi") as {
    load(path: string): { func(sig: string): (...args: unknown[]) => number };
    errno(): number;
  };
  const lib = koffi.load("libc.so.6");
  const mount = lib.func(
    "int mount(const char *src, const char *target, const char *type, unsigned long flags, const char *data)",
  );
  const umount2 = lib.func("int umount2(const char *target, int flags)");
  libc = {
    mount: (s, t, ty, f, d) => mount(s, t, ty, f, d),
    umount2: (t, f) => umount2(t, f),
    errno: () => koffi.errno(),
  };
  return libc;
}

/** umount2(MNT_DETACH); true if it was mounted. */
export function detach(mountpoint: string): boolean {
  const c = load();
  return c.umount2(mountpoint, MNT_DETACH) === 0;
}

export interface Served {
  /** Resolves when the kernel ends the session (unmount, abort). */
  done: Promise<void>;
  requests: number;
  /** Writes notifications (FuseServer.invalidate) to the kernel. */
  notify(messages: Buffer[]): void;
}

/** Mounts /dev/fuse at `mountpoint` and serves it with `server` until the session ends. */
export function serveDevFuse(server: FuseServer, mountpoint: string, readers = 4): Served {
  const c = load();
  const fd = openSync("/dev/fuse", "r+");
  const opts = `fd=${fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions`;
  if (c.mount("matchlock", mountpoint, "fuse.matchlock", MS_NOSUID | MS_NODEV, opts) !== 0) {
    const errno = c.errno();
    closeSync(fd);
    throw new Error(`mount fuse at ${mountpoint}: errno ${errno}`);
  }
  const state: Served = {
    done: Promise.resolve(),
    requests: 0,
    notify: (messages) => {
      for (const m of messages) {
        try {
          writeSync(fd, m);
        } catch {
          // ENOENT: the kernel no longer knows that node; ENODEV: unmounted.
        }
      }
    },
  };
  let live = readers;
  let finish: () => void = () => {};
  state.done = new Promise<void>((resolve) => {
    finish = resolve;
  });
  const size = server.maxMessageSize + 4096;
  const loop = (buf: Buffer) => {
    read(fd, buf, 0, buf.length, null, (err, n) => {
      if (err) {
        // EINTR/EAGAIN: read again; ENODEV: the session is over (unmounted or aborted).
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "EINTR" || code === "EAGAIN" || code === "ENOENT") return loop(buf);
        if (--live === 0) {
          closeSync(fd);
          finish();
        }
        return;
      }
      state.requests++;
      const msg = Buffer.from(buf.subarray(0, n));
      loop(buf);
      void server.handle(msg).then((reply) => {
        if (!reply) return;
        try {
          writeSync(fd, reply);
        } catch {
          // ENOENT: the request was interrupted and is gone; ENODEV: unmounted meanwhile.
        }
      });
    });
  };
  for (let i = 0; i < readers; i++) loop(Buffer.alloc(size));
  return state;
}

/** What the child process serves (see fuse-daemon.ts). */
export type ProviderSpec =
  | { kind: "memory" }
  | { kind: "host_fs"; root: string; readonly?: boolean }
  | { kind: "overlay"; lower: string; upper: string }
  | { kind: "router"; mounts: { guestPath: string; spec: ProviderSpec }[] }
  /** The production wiring (buildWorkspace) from the vfs config shapes. */
  | {
      kind: "workspace";
      workspace: string;
      mounts: Record<string, MountConfig>;
      upperBase: string;
      interception?: { rules?: VfsRule[]; emit_events?: boolean };
    };

export interface ChildMount {
  mountpoint: string;
  child: ChildProcess;
  /** Has the server invalidate the kernel's caches for a provider path (FuseServer.invalidate). */
  invalidate(path: string): Promise<void>;
  /** What the server logged (stderr). */
  log: () => string;
  /** Unmounts (MNT_DETACH) and waits for the child to exit; safe to call twice. */
  stop(): Promise<void>;
}

const daemon = fileURLToPath(new URL("./fuse-daemon.ts", import.meta.url));

/** Spawns a server process for `spec` mounted at `mountpoint`; resolves once the mount answers. */
export async function mountInChild(
  spec: ProviderSpec,
  mountpoint: string,
  server: { entryTimeout?: number; attrTimeout?: number } = {},
): Promise<ChildMount> {
  const child = spawn(process.execPath, [daemon, mountpoint, JSON.stringify(spec), JSON.stringify(server)], {
    // stdin stays open while we live: the child unmounts and exits when it closes (we died).
    stdio: ["pipe", "pipe", "pipe"],
    env: { ...process.env, UV_THREADPOOL_SIZE: "16" },
  });
  let err = "";
  child.stderr?.on("data", (d: Buffer) => {
    err += d.toString();
    if (err.length > 1_000_000) err = err.slice(-500_000);
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  let out = "";
  const waiters: (() => void)[] = [];
  child.stdout?.on("data", (d: Buffer) => {
    out += d.toString();
    for (const w of waiters.splice(0)) w();
  });
  const waitFor = (line: string) =>
    new Promise<void>((resolve) => {
      const check = () => {
        const at = out.indexOf(`${line}\n`);
        if (at < 0) {
          waiters.push(check);
          return;
        }
        out = out.slice(at + line.length + 1);
        resolve();
      };
      check();
    });
  await new Promise<void>((resolve, reject) => {
    void waitFor("ready").then(resolve);
    child.once("exit", (code) => reject(new Error(`fuse daemon exited (${code}) before ready: ${err}`)));
  });
  let stopped = false;
  return {
    mountpoint,
    child,
    log: () => err,
    invalidate: async (path) => {
      child.stdin?.write(`inval ${path}\n`);
      await waitFor("invalidated");
    },
    stop: async () => {
      if (stopped) return;
      stopped = true;
      detach(mountpoint);
      child.stdin?.end();
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(timer);
    },
  };
}
