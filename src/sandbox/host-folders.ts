import { appendFileSync } from "node:fs";
import { mkdir, stat, writeFile } from "node:fs/promises";
import { basename, dirname, isAbsolute, join, posix, resolve } from "node:path";
import type { Duplex } from "node:stream";
import type { SandboxConfig } from "../api/config.ts";
import { InvalidArgumentError, messageOf } from "../api/errors.ts";
import type { FileEvent } from "../api/events.ts";
import type { Attr } from "../vfs/fuse-abi.ts";
import { buildWorkspace, FuseServer, overlayIndexes, serveStream, type VfsRule } from "../vfs/index.ts";

/**
 * Host folders in a sandbox (issue #13, docs/vfs.md): the config's `vfs.workspace` and
 * `vfs.mounts` become one FUSE file system the guest mounts at the workspace; its requests come
 * over the VM's "vfs" port and are answered here by the VFS server (src/vfs), which never follows
 * a link out of a mount's root. Overlay mounts write to per-VM upper directories in the VM dir, so
 * the host copy stays as it was.
 */

/** Matchlock's default workspace when mounts are given without one. */
export const DEFAULT_WORKSPACE = "/workspace";
/** The server's log of host errors and refusals (op and path), in the VM dir. */
export const VFS_LOG = "vfs.log";

/** A guest path that can go on the kernel command line and means one place: absolute, normalised. */
const GUEST_PATH = /^(\/[A-Za-z0-9._@+-]+)+$/;

export function checkGuestPath(what: string, p: string): string {
  const normal = posix.normalize(p);
  if (!GUEST_PATH.test(p) || normal !== p || p.split("/").includes("..")) {
    throw new InvalidArgumentError(
      `${what} ${JSON.stringify(p)} is not a plain absolute guest path`,
      "use letters, digits and . _ - @ + between slashes, e.g. /workspace/repo",
    );
  }
  return p;
}

/** `vfs.interception` as the VFS layer takes it (nulls, Go's empty values, dropped). */
function interceptionOf(
  config: SandboxConfig,
  onEvent: ((e: FileEvent["file"]) => void) | undefined,
): Pick<Parameters<typeof buildWorkspace>[0], "interception" | "onEvent"> {
  const i = config.vfs.interception;
  if (!i) return {};
  const rules: VfsRule[] = (i.rules ?? []).map((r) => ({
    ...(r.name ? { name: r.name } : {}),
    ...(r.phase ? { phase: r.phase } : {}),
    ...(r.ops ? { ops: r.ops } : {}),
    ...(r.path ? { path: r.path } : {}),
    ...(r.action ? { action: r.action } : {}),
  }));
  return {
    interception: { rules, emit_events: i.emit_events },
    ...(onEvent ? { onEvent: (e) => onEvent({ ...e }) } : {}),
  };
}

/** Where the n-th overlay mount keeps its changes and their bases, in the VM dir. */
export function overlayPaths(vmDir: string, index: number): { upper: string; base: string } {
  return { upper: join(vmDir, "vfs", `upper-${index}`), base: join(vmDir, "vfs", `base-${index}.jsonl`) };
}

/** `<vm dir>/vfs/overlays.json`: what `matchlock diff` / `apply` need once the VM is gone. */
export const OVERLAYS_FILE = "overlays.json";

/** One overlay mount, as recorded for diff/apply. */
export interface OverlayRecord {
  index: number;
  guest_path: string;
  /** The host folder (or, for a single file, its parent folder). */
  host_dir: string;
  /** A single-file mount: the one name of host_dir it shows. */
  file?: string;
}

/**
 * What the host had at a path when the guest first changed it: enough to tell, at apply, whether
 * the host copy changed since (size, mtime to the nanosecond, inode), or that nothing was there.
 */
export type BaseRecord =
  | { path: string; absent: true }
  | { path: string; type: "file" | "dir" | "link" | "other"; size: number; mtime_ns: string; ino: string };

function baseRecord(path: string, lower: Attr | undefined): BaseRecord {
  if (lower === undefined) return { path, absent: true };
  const fmt = lower.mode & 0o170000;
  const type = fmt === 0o100000 ? "file" : fmt === 0o040000 ? "dir" : fmt === 0o120000 ? "link" : "other";
  const mtime = BigInt(lower.mtime.sec) * 1_000_000_000n + BigInt(lower.mtime.nsec);
  return {
    path,
    type,
    size: lower.size,
    mtime_ns: mtime.toString(),
    ino: (lower.ino & ~(1n << 62n)).toString(),
  };
}

async function recordOverlays(
  dir: string,
  mounts: Record<string, SandboxConfig["vfs"]["mounts"][string]>,
): Promise<OverlayRecord[]> {
  const out: OverlayRecord[] = [];
  for (const [guestPath, index] of overlayIndexes(mounts)) {
    const m = mounts[guestPath];
    if (!m?.host_path) continue; // refused by prepare before this
    const isFile = !(await stat(m.host_path)).isDirectory();
    out.push({
      index,
      guest_path: guestPath,
      host_dir: isFile ? dirname(m.host_path) : m.host_path,
      ...(isFile ? { file: basename(m.host_path) } : {}),
    });
  }
  if (out.length > 0) {
    await mkdir(join(dir, "vfs"), { recursive: true, mode: 0o700 });
    await writeFile(join(dir, "vfs", OVERLAYS_FILE), `${JSON.stringify(out, null, 2)}\n`);
  }
  return out;
}

export class HostFolders {
  readonly workspace: string;
  readonly server: FuseServer;
  private readonly log: (line: string) => void;

  private constructor(workspace: string, server: FuseServer, log: (line: string) => void) {
    this.workspace = workspace;
    this.server = server;
    this.log = log;
  }

  /**
   * Checks the mounts (guest paths inside the workspace, host paths that exist) and builds the
   * server. Host paths are resolved against the current directory. `dir` is the VM dir (created).
   */
  static async prepare(
    config: SandboxConfig,
    dir: string,
    onEvent?: (e: FileEvent["file"]) => void,
  ): Promise<HostFolders> {
    const workspace = checkGuestPath("vfs.workspace", config.vfs.workspace || DEFAULT_WORKSPACE);
    const mounts: Record<string, SandboxConfig["vfs"]["mounts"][string]> = {};
    for (const [guestPath, m] of Object.entries(config.vfs.mounts)) {
      checkGuestPath("mount", guestPath);
      if (guestPath !== workspace && !guestPath.startsWith(`${workspace}/`)) {
        throw new InvalidArgumentError(
          `mount ${guestPath} is not inside the workspace ${workspace}`,
          "mount below the workspace, or choose another with --workspace",
        );
      }
      if (m.type === "memory") {
        mounts[guestPath] = m;
        continue;
      }
      if (!m.host_path)
        throw new InvalidArgumentError(`mount ${guestPath}: a ${m.type} mount needs host_path`);
      const hostPath = isAbsolute(m.host_path) ? m.host_path : resolve(m.host_path);
      try {
        await stat(hostPath);
      } catch (e) {
        throw new InvalidArgumentError(`mount ${guestPath}: host path ${hostPath}: ${messageOf(e)}`);
      }
      mounts[guestPath] = { ...m, host_path: hostPath };
    }
    await recordOverlays(dir, mounts);
    let provider: Awaited<ReturnType<typeof buildWorkspace>>;
    try {
      provider = await buildWorkspace({
        workspace,
        mounts,
        overlayUpper: (i) => overlayPaths(dir, i).upper,
        ...interceptionOf(config, onEvent),
        overlayBase: (i) => {
          const file = overlayPaths(dir, i).base;
          return (path, lower) => {
            try {
              appendFileSync(file, `${JSON.stringify(baseRecord(path, lower))}\n`);
            } catch {}
          };
        },
      });
    } catch (e) {
      throw new InvalidArgumentError(`host folders: ${messageOf(e)}`);
    }
    const logFile = join(dir, VFS_LOG);
    const log = (line: string) => {
      try {
        appendFileSync(logFile, `${line}\n`);
      } catch {}
    };
    return new HostFolders(workspace, new FuseServer({ provider, log }), log);
  }

  /** The kernel argument that makes the guest mount the workspace and relay it over "vfs". */
  get kernelArg(): string {
    return `matchlock.vfs=${this.workspace}`;
  }

  /** Answers the guest's FUSE requests from the VM's "vfs" port until it closes. */
  serve(port: Duplex): void {
    const served = serveStream(this.server, port);
    void served.done.then((why) => {
      if (why) this.log(`vfs channel closed: ${why}`);
    });
  }

  close(): Promise<void> {
    return this.server.close();
  }
}
