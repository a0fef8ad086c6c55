import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import * as v from "valibot";
import type { SandboxConfigInput } from "../api/config.ts";
import type { SandboxEvent } from "../api/events.ts";
import { PRESTART_ENV, prestartHint } from "../api/prestart.ts";
import {
  isServerNotification,
  type RpcClientNotification,
  type RpcClientNotifications,
  RpcCode,
  type RpcMethod,
  type RpcNotificationParams,
  type RpcParamsInput,
  type RpcResult,
  RpcResults,
  type RpcServerNotification,
  RpcServerNotifications,
} from "../api/rpc.ts";
import { describeIssue } from "../api/schema.ts";
import { parsePortSpec } from "../api/specs.ts";
import { whenWritable } from "../host/drain.ts";
import { LineSplitter } from "../rpc/lines.ts";
import { type BinaryLike, toBuffer } from "./bytes.ts";
import { MatchlockError, RPCError, type VfsHookError } from "./errors.ts";
import { NetworkHookServer } from "./network-hooks.ts";
import { Sandbox } from "./sandbox.ts";
import { currentDir, SparePool, type SpawnSpec, spawnRpc } from "./spare.ts";
import { VfsHookRunner } from "./vfs-hook-runner.ts";
import { VFS_HOOK_OP_READ, VFS_HOOK_OP_READDIR, VFS_HOOK_OP_WRITE } from "./vfs-hooks.ts";

/**
 * The TypeScript SDK: drives one sandbox through a `matchlock rpc` child process (MATCHLOCK_BIN to
 * override which binary), speaking PROTOCOLS.md §2. Every call takes an AbortSignal and a timeout;
 * aborting sends `cancel`, which stops the guest command (SIGTERM, then SIGKILL).
 */

export type { BinaryLike } from "./bytes.ts";
export { MatchlockError, RPCError } from "./errors.ts";
export type StreamWriter = NodeJS.WritableStream | ((chunk: Buffer) => void);
export type StreamReader =
  | NodeJS.ReadableStream
  | AsyncIterable<BinaryLike>
  | Iterable<BinaryLike>
  | BinaryLike;

export interface ClientOptions {
  /** The matchlock binary; default MATCHLOCK_BIN, else this package's own CLI. */
  binaryPath?: string;
  env?: NodeJS.ProcessEnv;
  /**
   * Called with every network decision of the sandbox (intercept mode: each request, allowed or
   * blocked with its reason). Events a slow program does not take are dropped by the server.
   */
  onEvent?: (event: SandboxEvent) => void;
  /**
   * Ours: called when a VFS after hook (`hook`, `dangerousHook`) throws or passes its timeoutMs
   * (VfsHookError, code VFS_HOOK_FAILED / VFS_HOOK_TIMEOUT, the error it threw as `cause`). Such
   * errors never fail a client call; without this option each is a process warning on stderr
   * (Matchlock's SDK drops them silently).
   */
  onHookError?: (error: VfsHookError) => void;
  /**
   * Ours: after a create, start the next `matchlock rpc` child in the background, so the next
   * Client with the same binary, env and cwd starts without waiting for Node and the CLI to load
   * (~300 ms). Default true; false, or MATCHLOCK_SDK_SPARE=0 in `env` or process.env, turns it off.
   * An idle spare never keeps the program alive.
   */
  spare?: boolean;
}

export interface CallOptions {
  signal?: AbortSignal;
  /** Fail (and cancel the guest command) after this many milliseconds. */
  timeoutMs?: number;
}

export interface ExecOptions extends CallOptions {
  workingDir?: string;
  user?: string;
}

export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  durationMs: number;
}

export interface ExecStreamOptions extends ExecOptions {
  stdout?: StreamWriter;
  stderr?: StreamWriter;
}

export interface ExecPipeOptions extends ExecStreamOptions {
  stdin?: StreamReader;
}

export type TTYSize = { rows: number; cols: number } | [number, number];

export interface ExecInteractiveOptions extends ExecOptions {
  stdin?: StreamReader;
  stdout?: StreamWriter;
  rows?: number;
  cols?: number;
  /** New window sizes, e.g. from `process.stdout.on("resize")`. */
  resize?: AsyncIterable<TTYSize> | Iterable<TTYSize>;
}

export interface StreamResult {
  exitCode: number;
  durationMs: number;
}

export interface FileInfo {
  name: string;
  size: number;
  mode: number;
  modTime: string;
  isDir: boolean;
}

export interface PortForwardBinding {
  address: string;
  localPort: number;
  remotePort: number;
}

/** The JSON-RPC error codes (PROTOCOLS.md §2), from the one declaration the server uses too. */
export const RPC_CODES = RpcCode;

type Json = Record<string, unknown>;

interface Pending {
  method: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  onNotification?: ((n: ServerNotification) => void) | undefined;
}

/** A server notification, parsed with its declared schema. */
type ServerNotification = {
  [N in RpcServerNotification]: { method: N; params: RpcNotificationParams<N> };
}[RpcServerNotification];

const fromBase64 = (s: string) => Buffer.from(s, "base64");

const STDIN_CHUNK = 512 * 1024;
const STDERR_TAIL = 8192;

/** Idle `matchlock rpc` children, one per spawn spec: two keep e.g. a cold and a restoring setup warm. */
const spares = new SparePool({ max: 2, stderrTail: STDERR_TAIL });
/** The latest a spare starts after a create, however busy the client is. */
const SPARE_DELAY_MS = 1000;

function commandFor(binaryPath: string | undefined): { cmd: string; args: string[] } {
  const bin = binaryPath ?? process.env.MATCHLOCK_BIN;
  if (bin)
    // `--` ends Node's own options: nothing after it (an --env-file…) is ever read by Node itself.
    return /\.(c?m?js|ts)$/.test(bin) ? { cmd: process.execPath, args: ["--", bin] } : { cmd: bin, args: [] };
  // This package's own launcher, as a user's shell runs it: it picks the Node the CLI runs on (the
  // package's own Node 24 in a checkout, so there a program on an older Node still drives
  // sandboxes; else this program's Node, from MATCHLOCK_NODE: see childEnv).
  const launcher = fileURLToPath(new URL("../../bin/matchlock", import.meta.url));
  if (existsSync(launcher)) return { cmd: launcher, args: [] };
  const own = fileURLToPath(
    new URL(import.meta.url.endsWith(".ts") ? "../cli/main.ts" : "../cli/main.js", import.meta.url),
  );
  return { cmd: process.execPath, args: ["--", own] };
}

/**
 * The rpc child's environment: MATCHLOCK_NODE names this program's Node, which node-check.ts found
 * supported, for bin/matchlock to run the CLI on (not whatever `node` PATH finds); one set by the
 * caller wins.
 */
function childEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  // The prestart hint is for spares only (SparePool.fill adds it), never inherited.
  const { [PRESTART_ENV]: _hint, ...rest } = env;
  return { MATCHLOCK_NODE: process.execPath, ...rest };
}

/** An iterator over stdin or resize sources: streams, (async) iterables, or one buffer/string. */
function sourceIterator<T>(src: AsyncIterable<T> | Iterable<T> | T): AsyncIterator<T> {
  if (src !== null && typeof src === "object" && Symbol.asyncIterator in src) {
    return (src as AsyncIterable<T>)[Symbol.asyncIterator]();
  }
  if (
    src !== null &&
    typeof src === "object" &&
    Symbol.iterator in src &&
    !Buffer.isBuffer(src) &&
    !(src instanceof Uint8Array)
  ) {
    return toAsync(src as Iterable<T>);
  }
  return toAsync([src as T]);
}

async function* toAsync<T>(items: Iterable<T>): AsyncGenerator<T> {
  yield* items;
}

export class Client {
  private readonly options: ClientOptions;
  private child: ChildProcessWithoutNullStreams | undefined;
  private exited: Promise<void> | undefined;
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;
  private stderrTail = "";
  /** Writers of streamed output that asked us to wait (write() returned false). */
  private slowWriters = 0;
  private writeChain: Promise<void> = Promise.resolve();
  private closed = false;
  private vmIdValue = "";
  private deadError: MatchlockError | undefined;
  /** The spare `matchlock rpc` to start once this client is idle (see fillSpare). */
  private spareDue: { spec: SpawnSpec; hint: string | undefined; timer: NodeJS.Timeout } | undefined;
  /** Serves the launched sandbox's network hook callbacks. */
  private hookServer: NetworkHookServer | undefined;
  /** Runs the launched sandbox's local VFS hooks (undefined: it has none). */
  private vfsHooks: VfsHookRunner | undefined;

  constructor(options: ClientOptions = {}) {
    this.options = options;
  }

  /** The VM id once `create`/`launch` returned. */
  get vmId(): string {
    return this.vmIdValue;
  }

  /**
   * Boots a sandbox from the builder; serves its network hook callbacks and runs its local VFS
   * hooks (until close, or the next launch) and sets up its port forwards. Returns the VM id.
   */
  async launch(sandbox: Sandbox = new Sandbox(), opts: CallOptions = {}): Promise<string> {
    const config = sandbox.options();
    const { callbacks } = sandbox.networkHooks();
    const vfsHooks = sandbox.vfsHooks();
    let server: NetworkHookServer | undefined;
    if (callbacks.size > 0) {
      server = await NetworkHookServer.start(callbacks);
      const network = config.network ?? {};
      config.network = {
        ...network,
        interception: { ...network.interception, callback_socket: server.socketPath },
      };
    }
    let id: string;
    try {
      id = await this.create(config, opts);
    } catch (e) {
      await server?.close();
      throw e;
    }
    // A second launch replaced the first VM (as in Matchlock): its callbacks are no longer called.
    const previous = this.hookServer;
    this.hookServer = server;
    // As Matchlock: the new VM's VFS hooks from now on, the previous VM's no longer.
    this.vfsHooks = VfsHookRunner.of(vfsHooks, this, (e) => this.reportHookError(e));
    await previous?.close();
    if (sandbox.portForwards.length > 0) {
      await this.portForwardMappings(sandbox.portForwards, [...sandbox.portForwardAddresses], opts);
    }
    return id;
  }

  async create(config: SandboxConfigInput = {}, opts: CallOptions = {}): Promise<string> {
    const r = await this.call("create", config, opts);
    if (!r.id) throw new MatchlockError("invalid create response: no id", this.stderrTail);
    this.vmIdValue = r.id;
    this.fillSpare(config);
    return this.vmIdValue;
  }

  /** Runs `command` with /bin/sh -c and collects its output. */
  async exec(command: string, opts: ExecOptions = {}): Promise<ExecResult> {
    const r = await this.call("exec", execParams(command, opts), opts);
    return {
      exitCode: r.exit_code,
      stdout: fromBase64(r.stdout).toString("utf8"),
      stderr: fromBase64(r.stderr).toString("utf8"),
      durationMs: r.duration_ms,
    };
  }

  async execStream(command: string, opts: ExecStreamOptions = {}): Promise<StreamResult> {
    const r = await this.call("exec_stream", execParams(command, opts), opts, (n) => {
      if (n.method === "exec_stream.stdout") this.deliver(opts.stdout, fromBase64(n.params.data));
      else if (n.method === "exec_stream.stderr") this.deliver(opts.stderr, fromBase64(n.params.data));
    });
    return { exitCode: r.exit_code, durationMs: r.duration_ms };
  }

  /** Like execStream, with the command's stdin fed from `opts.stdin` (then EOF). */
  async execPipe(command: string, opts: ExecPipeOptions = {}): Promise<StreamResult> {
    return this.execWithInput(
      "exec_pipe",
      execParams(command, opts),
      opts,
      opts.stdin,
      undefined,
      (method, data) => this.deliver(method.endsWith(".stderr") ? opts.stderr : opts.stdout, data),
    );
  }

  /** A command on a PTY: stdin and resizes flow in, the terminal's output flows to `stdout`. */
  async execInteractive(command: string, opts: ExecInteractiveOptions = {}): Promise<StreamResult> {
    const params = { ...execParams(command, opts), rows: opts.rows ?? 24, cols: opts.cols ?? 80 };
    return this.execWithInput("exec_tty", params, opts, opts.stdin, opts.resize, (_m, data) =>
      this.deliver(opts.stdout, data),
    );
  }

  /**
   * Writes a file in the guest (parent directories created), mode 0644 unless `opts.mode`. The
   * sandbox's actionHooks (op write) may refuse it and its mutateHooks change what is written.
   */
  async writeFile(
    path: string,
    content: BinaryLike,
    opts: CallOptions & { mode?: number } = {},
  ): Promise<void> {
    await this.writeFileMode(path, content, opts.mode ?? 0o644, opts);
  }

  /** Matchlock's: writeFile with the mode as an argument. */
  async writeFileMode(
    path: string,
    content: BinaryLike,
    mode: number,
    opts: CallOptions = {},
  ): Promise<void> {
    let data = toBuffer(content);
    const hooks = this.vfsHooks;
    if (hooks) {
      await hooks.checkAction(VFS_HOOK_OP_WRITE, path, data.length, mode);
      data = await hooks.mutateWrite(path, data, mode);
    }
    await this.call("write_file", { path, content: data.toString("base64"), mode }, opts);
  }

  /** A file's content; the sandbox's actionHooks (op read) may refuse it. */
  async readFile(path: string, opts: CallOptions = {}): Promise<Buffer> {
    await this.vfsHooks?.checkAction(VFS_HOOK_OP_READ, path, 0, 0);
    const r = await this.call("read_file", { path }, opts);
    return fromBase64(r.content);
  }

  /** A directory's entries; the sandbox's actionHooks (op readdir) may refuse it. */
  async listFiles(path: string, opts: CallOptions = {}): Promise<FileInfo[]> {
    await this.vfsHooks?.checkAction(VFS_HOOK_OP_READDIR, path, 0, 0);
    const r = await this.call("list_files", { path }, opts);
    return r.files.map((f) => ({
      name: f.name,
      size: f.size,
      mode: f.mode, // Go's os.FileMode bits, as Matchlock sends them
      modTime: f.mod_time,
      isDir: f.is_dir,
    }));
  }

  /** The VM's console log (sent base64, as Matchlock does). */
  async log(opts: CallOptions = {}): Promise<string> {
    return fromBase64((await this.call("log", {}, opts)).content).toString("utf8");
  }

  /** Allows more hosts in the VM's allow-list (intercept mode); returns the added and the whole list. */
  async allowListAdd(...hosts: string[]): Promise<{ added: string[]; allowedHosts: string[] }> {
    const r = await this.call("allow_list_add", { hosts }, {});
    return { added: r.added, allowedHosts: r.allowed_hosts };
  }

  /** Stops allowing hosts; returns the removed and the whole list. */
  async allowListDelete(...hosts: string[]): Promise<{ removed: string[]; allowedHosts: string[] }> {
    const r = await this.call("allow_list_delete", { hosts }, {});
    return { removed: r.removed, allowedHosts: r.allowed_hosts };
  }

  /**
   * Freezes the VM (ours; Matchlock has no pause): nothing runs in it and QEMU uses no CPU until
   * `resume`. Meanwhile exec, file and port-forward calls fail (-32000, "… is paused"); calls already
   * running wait. Idempotent: `changed` says whether this call paused it. `close` resumes it first.
   */
  async pause(opts: CallOptions = {}): Promise<{ paused: boolean; changed: boolean }> {
    return this.call("pause", {}, opts);
  }

  /** Lets a paused VM run again from where it stopped. Idempotent: `changed` is false if it was not paused. */
  async resume(opts: CallOptions = {}): Promise<{ paused: boolean; changed: boolean }> {
    return this.call("resume", {}, opts);
  }

  /** `"8080:80"` forwards host 127.0.0.1:8080 to guest port 80; `"80"` uses the same port; `"0:80"` any free port. */
  async portForward(...specs: string[]): Promise<PortForwardBinding[]> {
    return this.portForwardMappings(specs.map(portSpec), undefined, {});
  }

  async portForwardWithAddresses(addresses: string[], ...specs: string[]): Promise<PortForwardBinding[]> {
    return this.portForwardMappings(specs.map(portSpec), addresses, {});
  }

  /**
   * Closes the VM and ends the rpc process. It really stops: if the child does not exit, it is
   * killed, and `matchlock gc` reclaims the VM.
   */
  async close(timeoutSeconds = 0, opts: CallOptions = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // As Matchlock: no hook runs once closing starts (the VM's last events are not the program's business).
    this.vfsHooks = undefined;
    try {
      await this.stop(timeoutSeconds, opts);
    } finally {
      // After the VM: its proxy may call a hook until then.
      await this.hookServer?.close();
      this.hookServer = undefined;
    }
  }

  private async stop(timeoutSeconds: number, opts: CallOptions): Promise<void> {
    const child = this.child;
    if (!child || this.deadError) return;
    const t = timeoutSeconds > 0 ? timeoutSeconds : 10;
    try {
      await this.call(
        "close",
        { timeout_seconds: t },
        { ...opts, timeoutMs: (t + 10) * 1000 },
        undefined,
        true,
      );
    } catch {}
    child.stdin.end();
    if (!(await this.waitExit(5000))) {
      child.kill("SIGTERM");
      if (!(await this.waitExit(3000))) {
        child.kill("SIGKILL");
        await this.waitExit(3000);
        if (this.vmIdValue) await this.runCli(["gc", this.vmIdValue]).catch(() => {});
      }
    }
  }

  /** Removes the stopped VM's record and logs (`matchlock rm`). */
  async remove(): Promise<void> {
    if (!this.vmIdValue) return;
    const r = await this.runCli(["rm", this.vmIdValue]);
    if (r.code !== 0) throw new MatchlockError(`matchlock rm ${this.vmIdValue} failed`, r.stderr);
  }

  private async portForwardMappings(
    forwards: readonly { localPort: number; remotePort: number }[],
    addresses: string[] | undefined,
    opts: CallOptions,
  ): Promise<PortForwardBinding[]> {
    const r = await this.call(
      "port_forward",
      {
        forwards: forwards.map((f) => ({ local_port: f.localPort, remote_port: f.remotePort })),
        addresses: addresses && addresses.length > 0 ? addresses : ["127.0.0.1"],
      },
      opts,
    );
    return r.bindings.map((b) => ({
      address: b.address,
      localPort: b.local_port,
      remotePort: b.remote_port,
    }));
  }

  private async execWithInput(
    method: "exec_pipe" | "exec_tty",
    params: RpcParamsInput<"exec_tty">,
    opts: CallOptions,
    stdin: StreamReader | undefined,
    resize: AsyncIterable<TTYSize> | Iterable<TTYSize> | undefined,
    onData: (method: string, data: Buffer) => void,
  ): Promise<StreamResult> {
    let readyId: number | undefined;
    let stopped = false;
    let markReady: () => void = () => {};
    const ready = new Promise<void>((r) => {
      markReady = r;
    });
    const call = this.call(method, params, opts, (n) => {
      if (n.method === "exec_pipe.ready" || n.method === "exec_tty.ready") {
        readyId = Number(n.params.id);
        markReady();
      } else if ("data" in n.params) onData(n.method, fromBase64(n.params.data));
    });
    // When the command ends the input iterators are closed (even mid-read), so a terminal's stdin
    // is released and the program can exit.
    let markStopped: () => void = () => {};
    const stoppedP = new Promise<{ done: true; value: undefined }>((r) => {
      markStopped = () => r({ done: true, value: undefined });
    });
    const iterators: Array<AsyncIterator<unknown>> = [];
    const drive = async <T>(it: AsyncIterator<T>, each: (v: T) => Promise<void>) => {
      iterators.push(it);
      for (;;) {
        const next = await Promise.race([it.next(), stoppedP]);
        if (next.done || stopped) return;
        await each(next.value);
      }
    };
    const pumpIn = (async () => {
      await Promise.race([ready, call.catch(() => {})]);
      if (readyId === undefined || stopped) return;
      const id = readyId;
      if (stdin !== undefined) {
        await drive(sourceIterator(stdin as AsyncIterable<BinaryLike>), async (c) => {
          const b = toBuffer(c);
          for (let off = 0; off < b.length; off += STDIN_CHUNK) {
            await this.notify(`${method}.stdin`, {
              id,
              data: b.subarray(off, off + STDIN_CHUNK).toString("base64"),
            });
          }
        });
      }
      if (!stopped) await this.notify(`${method}.stdin_eof`, { id });
    })();
    const pumpResize = (async () => {
      if (!resize) return;
      await Promise.race([ready, call.catch(() => {})]);
      if (readyId === undefined || stopped) return;
      const id = readyId;
      await drive(sourceIterator(resize), async (size) => {
        const [rows, cols] = Array.isArray(size) ? size : [size.rows, size.cols];
        if (rows > 0 && cols > 0) await this.notify("exec_tty.resize", { id, rows, cols });
      });
    })();
    try {
      const r = await call;
      return { exitCode: r.exit_code, durationMs: r.duration_ms };
    } finally {
      stopped = true;
      markStopped();
      for (const it of iterators) Promise.resolve(it.return?.()).catch(() => {});
      pumpIn.catch(() => {});
      pumpResize.catch(() => {});
    }
  }

  /** What this client spawns; a spare started for the same spec is as good as a new child. */
  private spawnSpec(): SpawnSpec {
    const { cmd, args } = commandFor(this.options.binaryPath);
    return {
      cmd,
      args: [...args, "rpc"],
      env: childEnv(this.options.env ?? process.env),
      cwd: currentDir(),
    };
  }

  private get sparesWanted(): boolean {
    return (
      this.options.spare !== false &&
      this.options.env?.MATCHLOCK_SDK_SPARE !== "0" &&
      process.env.MATCHLOCK_SDK_SPARE !== "0"
    );
  }

  /**
   * After a create, never before: the spare's start (Node and the CLI, ~300 ms of CPU) must not
   * take CPU from the VM's start, nor from the first command in it (a restored VM's first exec is
   * the slow one under TCG). So it starts once no call of this client is running, at the latest
   * SPARE_DELAY_MS after the create. Unref'd: a program that is done exits without starting one.
   */
  private fillSpare(config: SandboxConfigInput): void {
    if (!this.sparesWanted || this.spareDue) return;
    const timer = setTimeout(() => this.startSpare(), SPARE_DELAY_MS).unref();
    // The spare restores a clone of this kind while it waits (PRESTART_ENV).
    this.spareDue = { spec: this.spawnSpec(), hint: prestartHint(config), timer };
    // After the caller's continuation (microtasks) has sent its next call, if it has one.
    setImmediate(() => {
      if (this.pending.size === 0) this.startSpare();
    }).unref();
  }

  private startSpare(): void {
    const due = this.spareDue;
    if (!due) return;
    this.spareDue = undefined;
    clearTimeout(due.timer);
    spares.fill(due.spec, due.hint === undefined ? {} : { [PRESTART_ENV]: due.hint });
  }

  private start(): ChildProcessWithoutNullStreams {
    if (this.child) return this.child;
    const spec = this.spawnSpec();
    const adopted = this.sparesWanted ? spares.take(spec) : undefined;
    const child = adopted?.child ?? spawnRpc(spec);
    this.stderrTail = adopted?.stderrTail ?? "";
    this.child = child;
    const lines = new LineSplitter(512 * 1024 * 1024);
    child.stdout.on("data", (d: Buffer) => {
      for (const ev of lines.push(d)) if (ev.kind === "line") this.onLine(ev.line);
    });
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (d: string) => {
      this.stderrTail = (this.stderrTail + d).slice(-STDERR_TAIL);
    });
    child.stdin.on("error", () => {});
    this.exited = new Promise((resolve) => {
      const done = (why: string) => {
        this.deadError ??= new MatchlockError(`matchlock rpc ${why}`, this.stderrTail);
        for (const p of this.pending.values()) p.reject(this.deadError);
        this.pending.clear();
        resolve();
      };
      child.once("error", (e) => done(`could not start (${spec.cmd}): ${e.message}`));
      child.once("close", (code, signal) =>
        done(signal ? `was killed by ${signal}` : `exited with code ${code}`),
      );
    });
    return child;
  }

  /**
   * Hands streamed output to the caller's writer. A writer that is full (write() returned false)
   * pauses our reading of the server until it drains: the server then stops acknowledging output
   * to the guest, and the command in the sandbox waits, instead of output piling up in memory.
   */
  private deliver(w: StreamWriter | undefined, chunk: Buffer): void {
    if (!w) return;
    if (typeof w === "function") {
      w(chunk);
      return;
    }
    if (w.write(chunk)) return;
    this.slowWriters++;
    this.child?.stdout.pause();
    void whenWritable(w).then(() => {
      if (--this.slowWriters === 0) this.child?.stdout.resume();
    });
  }

  private onLine(line: Buffer): void {
    let msg: Json;
    try {
      msg = JSON.parse(line.toString("utf8")) as Json;
    } catch {
      return;
    }
    if (typeof msg.id === "number" && ("result" in msg || "error" in msg)) {
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      const err = msg.error as { code?: number; message?: string } | undefined;
      if (err) p.reject(new RPCError(Number(err.code ?? RPC_CODES.INTERNAL), String(err.message ?? "error")));
      else p.resolve(msg.result);
      if (this.spareDue && this.pending.size === 0) this.startSpare();
      return;
    }
    if (typeof msg.method !== "string" || !isServerNotification(msg.method)) return;
    const parsed = v.safeParse(RpcServerNotifications[msg.method], msg.params);
    if (!parsed.success) return; // not what the protocol declares: dropped, never half-used
    const n = { method: msg.method, params: parsed.output } as ServerNotification;
    if (n.method === "event") {
      // A callback that throws must not break the session's protocol handling.
      try {
        this.options.onEvent?.(n.params);
      } catch {}
      if (n.params.type === "file") this.vfsHooks?.onFileEvent(n.params.file);
      return;
    }
    const p = typeof n.params.id === "number" ? this.pending.get(n.params.id) : undefined;
    p?.onNotification?.(n);
  }

  private send(line: string): Promise<void> {
    const child = this.start();
    const next = this.writeChain.then(
      () =>
        new Promise<void>((resolve, reject) => {
          if (this.deadError) {
            reject(this.deadError);
            return;
          }
          // Waiting for each write keeps a 64 MiB upload from piling up in memory twice.
          child.stdin.write(line, (e) =>
            e ? reject(new MatchlockError(`write to matchlock rpc failed: ${e.message}`)) : resolve(),
          );
        }),
    );
    this.writeChain = next.catch(() => {});
    return next;
  }

  private notify<N extends RpcClientNotification>(
    method: N,
    params: v.InferInput<(typeof RpcClientNotifications)[N]>,
  ): Promise<void> {
    return this.send(`${JSON.stringify({ jsonrpc: "2.0", method, params })}\n`);
  }

  /**
   * One request, typed from the declarations in src/api/rpc.ts; the result is parsed with the same
   * schema the server checked it against, so a malformed one is an error, never a coerced value.
   */
  private async call<M extends RpcMethod>(
    method: M,
    params: RpcParamsInput<M>,
    opts: CallOptions,
    onNotification?: (n: ServerNotification) => void,
    allowAfterClose = false,
  ): Promise<RpcResult<M>> {
    const raw = await this.request(method, params, opts, onNotification, allowAfterClose);
    const parsed = v.safeParse(RpcResults[method], raw);
    if (!parsed.success) {
      throw new MatchlockError(
        `invalid ${method} result from matchlock rpc: ${describeIssue(parsed.issues[0], "result")}`,
        this.stderrTail,
      );
    }
    return parsed.output as RpcResult<M>;
  }

  private request(
    method: RpcMethod,
    params: unknown,
    opts: CallOptions,
    onNotification: ((n: ServerNotification) => void) | undefined,
    allowAfterClose: boolean,
  ): Promise<unknown> {
    if (this.closed && !allowAfterClose) return Promise.reject(new MatchlockError("client is closed"));
    if (this.deadError) return Promise.reject(this.deadError);
    this.start();
    const id = ++this.nextId;
    return new Promise<unknown>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const cleanup = () => {
        clearTimeout(timer);
        opts.signal?.removeEventListener("abort", onAbort);
      };
      const abortWith = (err: Error) => {
        if (!this.pending.has(id)) return;
        this.pending.delete(id);
        cleanup();
        // Tell the server so the guest command is stopped too.
        this.send(
          `${JSON.stringify({ jsonrpc: "2.0", id: ++this.nextId, method: "cancel", params: { id } })}\n`,
        ).catch(() => {});
        reject(err);
      };
      const onAbort = () =>
        abortWith(
          opts.signal?.reason instanceof Error
            ? opts.signal.reason
            : new MatchlockError(`${method} was aborted`),
        );
      this.pending.set(id, {
        method,
        onNotification,
        resolve: (v) => {
          cleanup();
          resolve(v);
        },
        reject: (e) => {
          cleanup();
          reject(e);
        },
      });
      if (opts.signal?.aborted) {
        onAbort();
        return;
      }
      opts.signal?.addEventListener("abort", onAbort, { once: true });
      if (opts.timeoutMs && opts.timeoutMs > 0) {
        timer = setTimeout(
          () => abortWith(new MatchlockError(`${method} timed out after ${opts.timeoutMs} ms`)),
          opts.timeoutMs,
        );
      }
      this.send(`${JSON.stringify({ jsonrpc: "2.0", id, method, params })}\n`).catch((e: Error) => {
        if (this.pending.delete(id)) {
          cleanup();
          reject(e);
        }
      });
    });
  }

  /** Where after-hook failures go: the program's onHookError, else a process warning. */
  private reportHookError(e: VfsHookError): void {
    if (this.options.onHookError) this.options.onHookError(e);
    else process.emitWarning(e);
  }

  private async waitExit(ms: number): Promise<boolean> {
    if (!this.exited) return true;
    let timer: NodeJS.Timeout | undefined;
    const ok = await Promise.race([
      this.exited.then(() => true),
      new Promise<boolean>((r) => {
        timer = setTimeout(() => r(false), ms);
      }),
    ]);
    clearTimeout(timer);
    return ok;
  }

  private runCli(args: string[]): Promise<{ code: number; stderr: string }> {
    const { cmd, args: pre } = commandFor(this.options.binaryPath);
    return new Promise((resolve) => {
      const c = spawn(cmd, [...pre, ...args], {
        stdio: ["ignore", "ignore", "pipe"],
        env: childEnv(this.options.env ?? process.env),
      });
      let stderr = "";
      c.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      c.on("close", (code) => resolve({ code: code ?? 1, stderr }));
      c.on("error", (e) => resolve({ code: 1, stderr: e.message }));
    });
  }
}

function execParams(command: string, opts: ExecOptions): RpcParamsInput<"exec"> {
  return {
    command,
    ...(opts.workingDir ? { working_dir: opts.workingDir } : {}),
    ...(opts.user ? { user: opts.user } : {}),
  };
}

function portSpec(spec: string): { localPort: number; remotePort: number } {
  try {
    return parsePortSpec(spec);
  } catch (e) {
    throw new MatchlockError((e as Error).message);
  }
}
