import { type ChildProcess, spawn } from "node:child_process";
import { createReadStream, createWriteStream, existsSync } from "node:fs";
import { appendFile, readFile, rm } from "node:fs/promises";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { MatchlockError, messageOf, VmBootError } from "../../api/errors.ts";
import { paths } from "../../api/paths.ts";
import type { RunningVm, VmBackend, VmExit, VmSpec } from "../backend.ts";
import { deviceSignature, QEMU_BINARY, type QemuPaths, qemuArgv } from "./argv.ts";
import { QmpClient } from "./qmp.ts";
import { guestNeedsRng } from "./rng.ts";
import { hostTscKhz } from "./tsc.ts";

/** How long QEMU gets to start and connect its sockets (not the guest boot, which is the caller's). */
const SPAWN_TIMEOUT_MS = 15_000;

export function qemuPaths(dir: string): QemuPaths {
  return {
    agentSocket: join(dir, "agent.sock"),
    vfsSocket: join(dir, "vfs.sock"),
    qmpSocket: join(dir, "qmp.sock"),
    consoleLog: join(dir, "console.log"),
  };
}

/** Listens on a unix socket for QEMU's one connection (QEMU is the client: no polling for a path). */
async function listenOnce(path: string): Promise<{ server: Server; conn: Promise<Socket> }> {
  await rm(path, { force: true });
  const server = createServer();
  const conn = new Promise<Socket>((resolve) => server.once("connection", resolve));
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(path, () => resolve());
  });
  return { server, conn };
}

function closeServer(server: Server, path: string): void {
  server.close();
  rm(path, { force: true }).catch(() => {});
}

export interface QemuBackendOptions {
  /** The cache dir (Paths.cache), where host facts such as the TSC frequency are kept across runs. */
  cacheDir?: string;
}

export class QemuBackend implements VmBackend {
  readonly name = "qemu";
  readonly #tscCache: string;

  constructor(opts: QemuBackendOptions = {}) {
    this.#tscCache = join(opts.cacheDir ?? paths().cache, "tsc.json");
  }

  async start(spec: VmSpec): Promise<RunningVm> {
    const p = qemuPaths(spec.dir);
    // Where the logs are now: a clone made ahead of time moves to its VM's dir (`relocate`).
    const where = { consoleLog: p.consoleLog, qemuLog: join(spec.dir, "qemu.log") };
    const rng = spec.rng ?? (await guestNeedsRng(spec.accel));
    const argv = qemuArgv(
      { ...spec, rng },
      p,
      spec.accel === "tcg" ? { khz: await hostTscKhz(this.#tscCache) } : undefined,
    );
    const devices = deviceSignature(argv);
    if (spec.restoreFrom !== undefined && spec.restoreDevices !== devices) {
      throw new VmBootError("the snapshot was saved from a VM with other devices than this one", {
        hint: `saved:\n${spec.restoreDevices ?? "(unknown)"}\nthis VM:\n${devices}`,
      });
    }
    const agentL = await listenOnce(p.agentSocket);
    const qmpL = await listenOnce(p.qmpSocket);
    const vfsL = spec.vfs ? await listenOnce(p.vfsSocket) : undefined;
    await appendFile(where.qemuLog, `${[QEMU_BINARY, ...argv].map((a) => JSON.stringify(a)).join(" ")}\n`);

    // detached: QEMU gets its own session, so a Ctrl-C on the terminal reaches us (who stop the guest
    // command gracefully) and not QEMU. setpriv's parent-death signal kills QEMU if we die: a VM never
    // outlives its owner unnoticed.
    // MATCHLOCK_TEST_NO_PDEATHSIG lets the crash tests leave a QEMU behind for `gc` to find.
    const usePdeath = existsSync("/usr/bin/setpriv") && !process.env.MATCHLOCK_TEST_NO_PDEATHSIG;
    const child: ChildProcess = usePdeath
      ? spawn("/usr/bin/setpriv", ["--pdeathsig", "SIGKILL", "--", QEMU_BINARY, ...argv], {
          stdio: ["ignore", "ignore", "pipe"],
          detached: true,
        })
      : spawn(QEMU_BINARY, argv, { stdio: ["ignore", "ignore", "pipe"], detached: true });

    let stderrTail = "";
    child.stderr?.setEncoding("utf8");
    child.stderr?.on("data", (d: string) => {
      stderrTail = (stderrTail + d).slice(-4096);
      appendFile(where.qemuLog, d).catch(() => {});
    });
    const exited = new Promise<VmExit>((resolve) => {
      child.once("exit", (code, signal) => resolve({ code, signal }));
      child.once("error", (e: NodeJS.ErrnoException) => {
        stderrTail += e.code === "ENOENT" ? `${QEMU_BINARY} is not installed` : e.message;
        resolve({ code: null, signal: null });
      });
    });
    const diagnostics = async (): Promise<string> => {
      let console = "";
      try {
        console = (await readFile(where.consoleLog, "utf8")).split("\n").slice(-15).join("\n");
      } catch {}
      return [stderrTail.trim(), console.trim()].filter(Boolean).join("\n");
    };

    let timer: NodeJS.Timeout | undefined;
    try {
      const sockets = await Promise.race([
        Promise.all([agentL.conn, qmpL.conn, vfsL?.conn]),
        exited.then(async (e): Promise<never> => {
          throw new VmBootError(`QEMU exited during start (${describeExit(e)})`, {
            hint: await diagnostics(),
          });
        }),
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () => reject(new VmBootError(`QEMU did not start within ${SPAWN_TIMEOUT_MS / 1000} s`)),
            SPAWN_TIMEOUT_MS,
          );
        }),
      ]);
      const [agent, qmpSock, vfs] = sockets;
      const qmp = new QmpClient(qmpSock);
      const failed = async (e: unknown): Promise<never> => {
        // QEMU connects its sockets before loading the kernel; a bad kernel (or a bad snapshot) makes
        // it exit right here.
        const exit = await Promise.race([
          exited,
          new Promise<undefined>((r) => setTimeout(() => r(undefined), 2000)),
        ]);
        const why = exit ? `QEMU exited during start (${describeExit(exit)})` : messageOf(e);
        throw new VmBootError(why, { cause: e, hint: await diagnostics() });
      };
      await qmp.init().catch(failed);
      if (spec.restoreFrom !== undefined) {
        // QEMU listens here for the saved device state while restoring.
        await restore(qmp, spec.restoreFrom, join(spec.dir, "migrate.sock"), !spec.paused).catch(failed);
      }
      return new QemuVm(child, agent, vfs, qmp, exited, where, devices, diagnostics);
    } catch (e) {
      child.kill("SIGKILL");
      await exited;
      throw e;
    } finally {
      clearTimeout(timer);
      closeServer(agentL.server, p.agentSocket);
      closeServer(qmpL.server, p.qmpSocket);
      if (vfsL) closeServer(vfsL.server, p.vfsSocket);
    }
  }
}

/** Migration stream options: RAM in a shared file stays out of the stream; events say when it ends. */
const MIGRATION_CAPS = {
  capabilities: [
    { capability: "x-ignore-shared", state: true },
    { capability: "events", state: true },
  ],
};
/** The device state is ~100 KB; anything near this means QEMU is stuck. */
const MIGRATION_TIMEOUT_MS = 30_000;

function migrationEnd(qmp: QmpClient, what: string): Promise<string> {
  return qmp
    .waitEvent(
      what,
      (e) =>
        e.event === "MIGRATION" && ["completed", "failed", "cancelled"].includes(migrationStatus(e.data)),
      MIGRATION_TIMEOUT_MS,
    )
    .then((e) => migrationStatus(e.data));
}

function migrationStatus(data: unknown): string {
  const s = (data as { status?: unknown } | undefined)?.status;
  return typeof s === "string" ? s : "";
}

/**
 * Loads a saved device state into a QEMU started with `-incoming defer` and lets the guest run on.
 * QEMU listens on a unix socket and we stream the file into it: no shell command, and we know
 * exactly when every byte was handed over.
 */
async function restore(qmp: QmpClient, stateFile: string, sock: string, cont: boolean): Promise<void> {
  await rm(sock, { force: true });
  await qmp.execute("migrate-set-capabilities", MIGRATION_CAPS);
  const end = migrationEnd(qmp, "end of the restore");
  end.catch(() => {});
  await qmp.execute("migrate-incoming", { uri: `unix:${sock}` });
  const conn = createConnection(sock);
  conn.on("error", () => {}); // QEMU may close its end early (a state it refuses): its verdict counts
  await pipeline(createReadStream(stateFile), conn).catch(() => {});
  const status = await end;
  await rm(sock, { force: true });
  if (status !== "completed") throw new VmBootError(`restoring the snapshot ${status}`);
  // The template was stopped when it was saved, so the clone arrives paused.
  if (cont) await qmp.execute("cont");
}

function describeExit(e: VmExit): string {
  return e.signal ? `killed by ${e.signal}` : `exit code ${e.code}`;
}

class QemuVm implements RunningVm {
  readonly pid: number;
  readonly agent: Socket;
  readonly vfs: Socket | undefined;
  readonly exited: Promise<VmExit>;
  readonly devices: string;
  readonly diagnostics: () => Promise<string>;
  private readonly where: { consoleLog: string; qemuLog: string };
  private readonly child: ChildProcess;
  private readonly qmp: QmpClient;
  private done = false;

  constructor(
    child: ChildProcess,
    agent: Socket,
    vfs: Socket | undefined,
    qmp: QmpClient,
    exited: Promise<VmExit>,
    where: { consoleLog: string; qemuLog: string },
    devices: string,
    diagnostics: () => Promise<string>,
  ) {
    if (child.pid === undefined) throw new MatchlockError("VM_FAILED", "QEMU has no pid");
    this.pid = child.pid;
    this.child = child;
    this.agent = agent;
    this.vfs = vfs;
    this.qmp = qmp;
    this.where = where;
    this.devices = devices;
    this.diagnostics = diagnostics;
    this.exited = exited.then((e) => {
      this.done = true;
      return e;
    });
  }

  get consoleLog(): string {
    return this.where.consoleLog;
  }

  relocate(dir: string): void {
    this.where.consoleLog = qemuPaths(dir).consoleLog;
    this.where.qemuLog = join(dir, "qemu.log");
  }

  async snapshot(stateFile: string): Promise<void> {
    const sock = `${stateFile}.sock`;
    await rm(sock, { force: true });
    const server = createServer();
    const received = new Promise<void>((resolve, reject) => {
      server.once("connection", (c) => {
        pipeline(c, createWriteStream(stateFile, { mode: 0o600 })).then(resolve, reject);
      });
    });
    received.catch(() => {});
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(sock, () => resolve());
    });
    try {
      await this.qmp.execute("stop");
      await this.qmp.execute("migrate-set-capabilities", MIGRATION_CAPS);
      const end = migrationEnd(this.qmp, "end of the snapshot");
      end.catch(() => {});
      await this.qmp.execute("migrate", { uri: `unix:${sock}` });
      const status = await end;
      if (status !== "completed") throw new MatchlockError("VM_FAILED", `saving the snapshot ${status}`);
      await received; // every byte is in the file
    } finally {
      server.close();
      await rm(sock, { force: true });
    }
  }

  // QMP's `stop` returns once every vCPU thread has left the guest, so "paused" is true on return;
  // `cont` on a running VM (or `stop` on a paused one) is a no-op for QEMU, never an error.
  async pause(): Promise<void> {
    await this.qmp.execute("stop");
  }

  async resume(): Promise<void> {
    await this.qmp.execute("cont");
  }

  async stop(graceMs = 2000): Promise<void> {
    if (!this.done) {
      // The upper disk is thrown away with the VM, so nothing needs flushing: ask QEMU to quit.
      this.qmp.execute("quit").catch(() => {});
      const timer = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
      await this.exited;
      clearTimeout(timer);
    }
    this.qmp.destroy();
    this.agent.destroy();
  }
}
