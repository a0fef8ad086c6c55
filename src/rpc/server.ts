import { open, stat } from "node:fs/promises";
import { join } from "node:path";
import type { Readable, Writable } from "node:stream";
import * as v from "valibot";
import { parseSandboxConfig, unsupportedFeatures } from "../api/config.ts";
import { isMatchlockError, MatchlockError, messageOf } from "../api/errors.ts";
import {
  goFileMode,
  invalidParamsMessage,
  isClientNotification,
  isRpcMethod,
  RpcClientNotifications,
  RpcCode,
  type RpcMethod,
  RpcMethods,
  type RpcParams,
  type RpcResult,
  RpcResults,
  rpcCodeFor,
} from "../api/rpc.ts";
import { describeIssue } from "../api/schema.ts";
import { splitHosts } from "../api/specs.ts";
import { type ExecHandle, MAX_READ_FILE, type OutputSink } from "../guest/agent-client.ts";
import { whenWritable } from "../host/drain.ts";
import { launchEntrypoint, VM_LOG_FILES } from "../sandbox/entrypoint.ts";
import { DEFAULT_GRACE_MS, Sandbox } from "../sandbox/sandbox.ts";
import { LineSplitter } from "./lines.ts";

/**
 * `matchlock rpc`: newline-delimited JSON-RPC 2.0 on stdio, one VM per process, the methods and
 * notifications of Matchlock (PROTOCOLS.md §2). Requests run concurrently; each request's
 * notifications are written in order before its response. stdout carries only protocol lines; logs
 * go to stderr. EOF on stdin (or a broken stdout) cancels everything and closes the VM.
 *
 * Memory stays bounded however fast the guest writes and however slowly the client reads:
 * streamed output is acknowledged to the guest only once its notification is written out to the
 * client (stdout has room); while stdout is backed up we also stop reading requests; results that
 * must be held whole (`exec`, `read_file`) have a per-request and a server-wide cap.
 */

type Id = number | string;

/** A line longer than this is refused (and skipped without being buffered). 96 MiB fits a 64 MiB write_file. */
export const DEFAULT_MAX_LINE = 96 * 1024 * 1024;

/** Event notifications are dropped while this many bytes wait unread on stdout. */
const MAX_UNREAD_EVENTS = 1024 * 1024;
const STDIN_HIGH_WATER = 8 * 1024 * 1024;
const STDIN_LOW_WATER = 2 * 1024 * 1024;

/** The most output one `exec` collects (stdout + stderr), and the largest file `read_file` returns. */
export const MAX_BUFFERED_RESULT = MAX_READ_FILE;
/** The most bytes all in-flight `exec`/`read_file` requests of one server hold at once. */
export const MAX_BUFFERED_TOTAL = 4 * MAX_BUFFERED_RESULT;

class RpcError extends Error {
  readonly code: number;
  constructor(code: number, message: string) {
    super(message);
    this.code = code;
  }
}

interface Inflight {
  id: Id;
  method: string;
  handle?: ExecHandle;
  cancelled: boolean;
  /** Stops a log_stream. */
  stop?: () => void;
  /** Client notifications that arrived before the command started; applied in order once it has. */
  early?: Array<(h: ExecHandle) => void>;
}

export interface RpcServerOptions {
  input: Readable;
  output: Writable;
  log?: (line: string) => void;
  maxLine?: number;
  graceMs?: number;
  /** Creates the sandbox (tests inject options such as a private MATCHLOCK_HOME). */
  createSandbox?: (config: ReturnType<typeof parseSandboxConfig>) => Promise<Sandbox>;
}

export class RpcServer {
  private readonly input: Readable;
  private readonly output: Writable;
  private readonly log: (line: string) => void;
  private readonly splitter: LineSplitter;
  private readonly graceMs: number;
  private readonly createSandbox: (config: ReturnType<typeof parseSandboxConfig>) => Promise<Sandbox>;
  private readonly inflight = new Map<string, Inflight>();
  private sandbox: Sandbox | undefined;
  private creating: Promise<Sandbox> | undefined;
  /** Why the sandbox is gone, once it is. */
  private gone: string | undefined;
  private shuttingDown: Promise<void> | undefined;
  private pendingStdin = 0;
  /** Nothing has arrived on stdin yet, not even its end. */
  private waiting = true;
  /** Bytes held by in-flight exec / read_file results (bounded by MAX_BUFFERED_TOTAL). */
  private buffered = 0;
  /** Why reading requests is paused: stdin fed to the guest faster than it takes it, stdout backed up. */
  private readonly pausedBy = new Set<"stdin" | "output">();
  private readonly onSandboxClosed = new WeakMap<Sandbox, () => void>();
  /** The entrypoint `launch_entrypoint` started, stopped with the sandbox like a running request. */
  private readonly entrypoints = new WeakMap<Sandbox, ExecHandle>();

  constructor(opts: RpcServerOptions) {
    this.input = opts.input;
    this.output = opts.output;
    this.log = opts.log ?? ((line) => process.stderr.write(`matchlock rpc: ${line}\n`));
    this.splitter = new LineSplitter(opts.maxLine ?? DEFAULT_MAX_LINE);
    this.graceMs = opts.graceMs ?? DEFAULT_GRACE_MS;
    this.createSandbox = opts.createSandbox ?? ((config) => Sandbox.create({ config }));
  }

  /** True until the first bytes (or the end) of stdin arrive: time for warm-up work. */
  get idle(): boolean {
    return this.waiting;
  }

  /** Serves until stdin ends, then closes the VM. */
  serve(): Promise<void> {
    return new Promise((resolve) => {
      this.input.on("data", (chunk: Buffer) => {
        this.waiting = false;
        for (const ev of this.splitter.push(chunk)) this.onLineEvent(ev);
      });
      const finish = () => {
        this.waiting = false;
        for (const ev of this.splitter.end()) this.onLineEvent(ev);
        this.shutdown("stdin closed").then(resolve, resolve);
      };
      this.input.once("end", finish);
      this.input.once("error", finish);
      this.output.on("error", () => {
        this.shutdown("stdout is broken").then(resolve, resolve);
      });
      this.output.on("drain", () => this.resumeInput("output"));
    });
  }

  private onLineEvent(ev: ReturnType<LineSplitter["push"]>[number]): void {
    if (ev.kind === "too_long") {
      this.sendError(null, RpcCode.INVALID_REQUEST, `request line of ${ev.bytes} bytes exceeds the limit`);
      return;
    }
    const text = ev.line.toString("utf8").trim();
    if (text === "") return;
    let msg: unknown;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      this.sendError(null, RpcCode.PARSE_ERROR, `Parse error: ${messageOf(e)}`);
      return;
    }
    this.onMessage(msg);
  }

  private onMessage(msg: unknown): void {
    if (typeof msg !== "object" || msg === null || Array.isArray(msg)) {
      this.sendError(null, RpcCode.INVALID_REQUEST, "Invalid request: expected a JSON object");
      return;
    }
    const m = msg as Record<string, unknown>;
    const rawId = m.id;
    const hasId = rawId !== undefined && rawId !== null;
    if (hasId && typeof rawId !== "number" && typeof rawId !== "string") {
      this.sendError(null, RpcCode.INVALID_REQUEST, "Invalid request: id must be a number or a string");
      return;
    }
    const id = hasId ? (rawId as Id) : null;
    if (typeof m.method !== "string") {
      this.sendError(id, RpcCode.INVALID_REQUEST, "Invalid request: method must be a string");
      return;
    }
    const method = m.method;
    if (isClientNotification(method)) {
      // Never answered, even when sent with an id: Matchlock does not, and its SDKs do not read one.
      this.onClientNotification(method, m.params);
      return;
    }
    if (id === null) return; // an unknown notification: JSON-RPC says never answer one
    if (!isRpcMethod(method)) {
      this.sendError(id, RpcCode.METHOD_NOT_FOUND, `Method not found: ${method}`);
      return;
    }
    const key = String(id);
    if (this.inflight.has(key)) {
      this.sendError(
        id,
        RpcCode.INVALID_REQUEST,
        `Invalid request: id ${key} is already in use by a running request`,
      );
      return;
    }
    const parsed = v.safeParse(RpcMethods[method], m.params ?? undefined);
    if (!parsed.success) {
      this.sendError(id, RpcCode.INVALID_PARAMS, invalidParamsMessage(method, parsed.issues));
      return;
    }
    const req: Inflight = { id, method, cancelled: false };
    this.inflight.set(key, req);
    this.dispatch(method, parsed.output, req).then(
      (result) => {
        this.inflight.delete(key);
        if (req.cancelled) this.sendError(id, RpcCode.CANCELLED, `request ${key} was cancelled`);
        else this.send({ jsonrpc: "2.0", id, result });
      },
      (e: unknown) => {
        this.inflight.delete(key);
        if (req.cancelled) this.sendError(id, RpcCode.CANCELLED, `request ${key} was cancelled`);
        else if (e instanceof RpcError) this.sendError(id, e.code, e.message);
        else if (isMatchlockError(e))
          this.sendError(id, rpcCodeFor(e.code), e.hint ? `${e.message} (${e.hint})` : e.message);
        else {
          this.log(`internal error in ${method}: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
          this.sendError(id, RpcCode.INTERNAL, `internal error: ${messageOf(e)}`);
        }
      },
    );
  }

  /**
   * One handler per method, typed from the declarations in src/api/rpc.ts: a method without a
   * handler, or a handler returning the wrong shape, does not compile.
   */
  private readonly handlers: {
    [M in RpcMethod]: (params: RpcParams<M>, req: Inflight) => Promise<RpcResult<M>>;
  } = {
    create: (p) => this.create(p),
    close: async (p) => {
      // As in Matchlock: the VM stays listed as stopped, with its logs, until `remove` (`matchlock rm`).
      // `timeout_seconds` bounds the graceful part (commands' SIGTERM, QEMU's quit); 0 means the default.
      const t = p.timeout_seconds ?? 0;
      await this.closeSandbox("closed by the client", {
        keep: true,
        ...(t > 0 ? { graceMs: Math.min(t, 3600) * 1000 } : {}),
      });
      return {};
    },
    cancel: (p) => this.cancel(p),
    pause: async () => (await this.vm()).pause(),
    resume: async () => (await this.vm()).resume(),
    exec: async (p, req) => {
      const r = await this.exec("exec", p, req);
      return {
        exit_code: r.exitCode,
        stdout: Buffer.concat(r.out).toString("base64"),
        stderr: Buffer.concat(r.err).toString("base64"),
        duration_ms: r.durationMs,
      };
    },
    exec_stream: (p, req) => this.execStreamed("exec_stream", p, req),
    exec_pipe: (p, req) => this.execStreamed("exec_pipe", p, req),
    exec_tty: (p, req) => this.execStreamed("exec_tty", p, req),
    write_file: async (p) => {
      const data = decodeBase64(p.content, "content");
      await (await this.vm()).writeFile(p.path, data, p.mode ?? 0o644);
      return {};
    },
    read_file: async (p) => {
      const sb = await this.vm();
      const held = this.budget(
        "FILE_FAILED",
        `${p.path} is larger than`,
        "stream it with exec_stream `cat FILE`",
      );
      const chunks: Buffer[] = [];
      try {
        await sb.readFileStream(p.path, (d) => {
          held.reserve(d.length);
          chunks.push(d);
        });
        return { content: Buffer.concat(chunks).toString("base64") };
      } finally {
        held.release();
      }
    },
    list_files: async (p) => {
      const files = await (await this.vm()).listFiles(p.path);
      return {
        files: files.map((f) => ({
          name: f.name,
          size: f.size,
          mode: goFileMode(f.mode),
          mod_time: new Date(f.mtimeMs).toISOString(),
          is_dir: f.isDir,
        })),
      };
    },
    log: async () => ({ content: (await this.readLog(await this.vm())).toString("base64") }),
    log_stream: async (_p, req) => this.logStream(await this.vm(), req),
    allow_list_add: async (p) => (await this.vm()).allowListAdd(splitHosts(p.hosts)),
    allow_list_delete: async (p) => (await this.vm()).allowListDelete(splitHosts(p.hosts)),
    port_forward: async (p) => {
      const bindings = await (await this.vm()).portForward(
        p.forwards.map((f) => ({ localPort: f.local_port, remotePort: f.remote_port })),
        p.addresses && p.addresses.length > 0 ? p.addresses : ["127.0.0.1"],
      );
      return {
        bindings: bindings.map((b) => ({
          address: b.address,
          local_port: b.localPort,
          remote_port: b.remotePort,
        })),
      };
    },
  };

  /** Runs a method's handler and checks its result against the declaration (a mismatch is our bug). */
  private async dispatch(method: RpcMethod, params: unknown, req: Inflight): Promise<unknown> {
    // The table is typed per method; TypeScript cannot follow `method` into it, hence the one cast.
    const handler = this.handlers[method] as (params: unknown, req: Inflight) => Promise<unknown>;
    const result = await handler(params, req);
    const checked = v.safeParse(RpcResults[method], result);
    if (!checked.success) {
      throw new Error(
        `the ${method} result does not match its declaration: ${describeIssue(checked.issues[0])}`,
      );
    }
    return result;
  }

  /** The VM; a request that arrives while `create` is still booting waits for it, as in Matchlock. */
  private async vm(): Promise<Sandbox> {
    if (this.creating) await this.creating.catch(() => {});
    if (this.sandbox) return this.sandbox;
    if (this.gone) throw new RpcError(RpcCode.VM_FAILED, `the sandbox is gone: ${this.gone}`);
    throw new RpcError(RpcCode.VM_FAILED, "VM not created: call create first");
  }

  private async create(input: RpcParams<"create">): Promise<RpcResult<"create">> {
    const config = parseSandboxConfig(input);
    const missing = unsupportedFeatures(config);
    if (missing.length > 0) {
      throw new RpcError(
        RpcCode.INVALID_PARAMS,
        `not supported by this version of matchlock: ${missing.join(", ")}`,
      );
    }
    // One VM per session: a second create replaces the first, as in Matchlock (its requests end).
    if (this.creating || this.sandbox) await this.closeSandbox("replaced by a new create", { keep: true });
    if (this.shuttingDown) throw new RpcError(RpcCode.VM_FAILED, "the rpc session is shutting down");
    this.gone = undefined;
    this.creating = this.createSandbox(config);
    try {
      const sb = await this.creating;
      if (this.shuttingDown) {
        await sb.close();
        throw new RpcError(RpcCode.VM_FAILED, "the rpc session is shutting down");
      }
      if (config.launch_entrypoint) {
        try {
          const ep = await launchEntrypoint(sb);
          if (ep) this.entrypoints.set(sb, ep);
        } catch (e) {
          // As in Matchlock: the create fails and takes its VM with it.
          await sb.close();
          throw e;
        }
      }
      this.sandbox = sb;
      // Matchlock's `event` notifications. Never paced: a client that does not read its stdout loses
      // events (counted, logged on close) rather than stall the VM's proxy.
      let dropped = 0;
      const unsubscribe = sb.events.subscribe((e) => {
        if (this.sandbox !== sb) return;
        if (this.output.writableLength > MAX_UNREAD_EVENTS) dropped++;
        else this.write({ jsonrpc: "2.0", method: "event", params: e });
      });
      this.onSandboxClosed.set(sb, () => {
        unsubscribe();
        if (dropped > 0) this.log(`${sb.id}: ${dropped} events not sent (the client was not reading)`);
      });
      sb.deadline.addEventListener("abort", () => {
        this.log(`${sb.id}: ${messageOf(sb.deadline.reason)}; closing the VM`);
        this.closeSandbox(messageOf(sb.deadline.reason)).catch(() => {});
      });
      this.log(`${sb.id} created`);
      return { id: sb.id };
    } finally {
      this.creating = undefined;
    }
  }

  private async execStreamed(
    method: "exec_stream" | "exec_pipe" | "exec_tty",
    p: RpcParams<"exec"> & Partial<RpcParams<"exec_tty">>,
    req: Inflight,
  ): Promise<RpcResult<"exec_stream">> {
    const r = await this.exec(method, p, req);
    return { exit_code: r.exitCode, duration_ms: r.durationMs };
  }

  /** A command for one of the exec methods: `exec` gets its output back, the others stream it. */
  private async exec(
    method: "exec" | "exec_stream" | "exec_pipe" | "exec_tty",
    p: RpcParams<"exec"> & Partial<RpcParams<"exec_tty">>,
    req: Inflight,
  ): Promise<{ exitCode: number; durationMs: number; out: Buffer[]; err: Buffer[] }> {
    const sb = await this.vm();
    const started = Date.now();
    // exec holds its output for the response, within a cap; the others stream it as notifications,
    // each acknowledged to the guest once written out to the client.
    const held =
      method === "exec"
        ? this.budget("EXEC_FAILED", "the output of exec exceeded", "use exec_stream")
        : undefined;
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let overflow: unknown;
    const notify =
      (stream: "stdout" | "stderr"): OutputSink =>
      (d) => {
        if (held) {
          if (overflow) return;
          try {
            held.reserve(d.length);
          } catch (e) {
            // Past the cap: stop the command now rather than let it run on unobserved.
            overflow = e;
            handle.signal(9);
            return;
          }
          (stream === "stdout" ? out : err).push(d);
          return;
        }
        return this.sendPaced({
          jsonrpc: "2.0",
          method: `${method}.${stream}`,
          params: { id: req.id, data: d.toString("base64") },
        });
      };
    const handle = sb.exec(
      {
        argv: ["/bin/sh", "-c", p.command],
        ...(p.working_dir ? { cwd: p.working_dir } : {}),
        ...(p.user ? { user: p.user } : {}),
        tty: method === "exec_tty",
        stdin: method === "exec_pipe" || method === "exec_tty",
        ...(method === "exec_tty" ? { rows: p.rows, cols: p.cols } : {}),
      },
      { onStdout: notify("stdout"), onStderr: notify("stderr") },
    );
    req.handle = handle;
    for (const apply of req.early?.splice(0) ?? []) apply(handle);
    if (method === "exec_pipe" || method === "exec_tty") {
      this.send({ jsonrpc: "2.0", method: `${method}.ready`, params: { id: req.id } });
    }
    const r = await handle.done
      .catch((e: unknown) => {
        throw new MatchlockError("EXEC_FAILED", messageOf(e));
      })
      .finally(() => held?.release());
    if (overflow) throw overflow;
    const duration_ms = Date.now() - started;
    if (r.startError !== undefined) {
      const msg = Buffer.from(`${r.startError}\n`);
      if (method === "exec") err.push(msg);
      // A terminal has one stream: the reason the command did not start is shown in it.
      else if (method === "exec_tty") await notify("stdout")(Buffer.from(`${r.startError}\r\n`));
      else await notify("stderr")(msg);
    }
    return { exitCode: r.exitCode, durationMs: duration_ms, out, err };
  }

  private onClientNotification(method: keyof typeof RpcClientNotifications, params: unknown): void {
    const parsed = v.safeParse(RpcClientNotifications[method], params);
    if (!parsed.success) {
      this.log(`ignored ${method}: invalid params`);
      return;
    }
    const p = parsed.output as { id: Id; data?: string; rows?: number; cols?: number };
    const req = this.inflight.get(String(p.id));
    if (!req?.method.startsWith(method.split(".")[0] as string)) return;
    let apply: (h: ExecHandle) => void;
    if (method.endsWith(".stdin")) {
      let data: Buffer;
      try {
        data = decodeBase64(p.data ?? "", "data");
      } catch {
        this.log(`ignored ${method}: data is not base64`);
        return;
      }
      apply = (h) => {
        // Notifications have no acknowledgement: when the guest is slower than the client, stop
        // reading our stdin (the pipe then pushes back on the client) instead of buffering.
        this.pendingStdin += data.length;
        if (this.pendingStdin > STDIN_HIGH_WATER) this.pauseInput("stdin");
        h.writeStdin(data)
          .catch(() => {})
          .finally(() => {
            this.pendingStdin -= data.length;
            if (this.pendingStdin < STDIN_LOW_WATER) this.resumeInput("stdin");
          });
      };
    } else if (method.endsWith(".stdin_eof")) apply = (h) => h.endStdin();
    else apply = (h) => h.resize(p.rows ?? 24, p.cols ?? 80);
    if (req.handle) apply(req.handle);
    else {
      req.early ??= [];
      req.early.push(apply);
    }
  }

  private async cancel(p: RpcParams<"cancel">): Promise<RpcResult<"cancel">> {
    const target = this.inflight.get(String(p.id));
    if (!target || target.method === "cancel" || target.method === "create" || target.method === "close") {
      return { cancelled: false };
    }
    target.cancelled = true;
    target.stop?.();
    if (target.handle && this.sandbox) await this.sandbox.terminate(target.handle, this.graceMs);
    return { cancelled: true };
  }

  /** The VM's logs (console, then command output of a detached run); at most the last 64 MiB of each. */
  private async readLog(sb: Sandbox): Promise<Buffer> {
    const parts = await Promise.all(
      VM_LOG_FILES.map(async (f) => {
        const path = join(sb.dir, f);
        const size = await stat(path).then(
          (st) => st.size,
          () => 0,
        );
        const start = Math.max(0, size - MAX_BUFFERED_RESULT);
        return readRange(path, start, size - start);
      }),
    );
    return Buffer.concat(parts);
  }

  /**
   * Sends what the logs gain, as `log_stream.data`, until cancelled or the VM closes: read from where
   * it left off, a bounded piece at a time, each sent before the next is read.
   */
  private async logStream(sb: Sandbox, req: Inflight): Promise<RpcResult<"log_stream">> {
    let stopped = false;
    req.stop = () => {
      stopped = true;
    };
    const files = VM_LOG_FILES.map((f) => ({ path: join(sb.dir, f), offset: 0 }));
    while (!stopped && this.sandbox === sb) {
      let grew = false;
      for (const f of files) {
        const chunk = await readRange(f.path, f.offset, LOG_CHUNK);
        if (chunk.length === 0) continue;
        grew = true;
        f.offset += chunk.length;
        // Base64, as Matchlock sends it: the logs are the guest's bytes, not necessarily UTF-8.
        await this.sendPaced({
          jsonrpc: "2.0",
          method: "log_stream.data",
          params: { id: req.id, data: chunk.toString("base64") },
        });
      }
      if (!grew) await new Promise((r) => setTimeout(r, 200));
    }
    return {};
  }

  /**
   * Stops the VM. `keep` leaves it listed as stopped with its logs (a client's `close`); otherwise
   * its records and files go too (the client vanished, the session ends, the lifetime ran out).
   */
  private async closeSandbox(why: string, opts: { keep?: boolean; graceMs?: number } = {}): Promise<void> {
    const creating = this.creating;
    if (creating) await creating.catch(() => {});
    const sb = this.sandbox;
    if (!sb) {
      this.gone ??= why;
      return;
    }
    this.sandbox = undefined;
    this.gone = why;
    for (const req of this.inflight.values()) {
      req.stop?.();
      if (req.handle) sb.terminate(req.handle, opts.graceMs ?? this.graceMs).catch(() => {});
    }
    const entrypoint = this.entrypoints.get(sb);
    if (entrypoint) sb.terminate(entrypoint, opts.graceMs ?? this.graceMs).catch(() => {});
    this.onSandboxClosed.get(sb)?.();
    await sb.close({ remove: !opts.keep, ...(opts.graceMs === undefined ? {} : { graceMs: opts.graceMs }) });
    this.log(`${sb.id} closed (${why})`);
  }

  private shutdown(why: string): Promise<void> {
    this.shuttingDown ??= (async () => {
      for (const req of this.inflight.values()) if (req.handle || req.stop) req.cancelled = true;
      await this.closeSandbox(why).catch((e: unknown) => this.log(`close failed: ${messageOf(e)}`));
    })();
    return this.shuttingDown;
  }

  private sendError(id: Id | null, code: number, message: string): void {
    this.send({ jsonrpc: "2.0", id, error: { code, message } });
  }

  /** Writes one protocol line; while stdout is backed up, no new requests are read. */
  private send(msg: unknown): void {
    this.write(msg);
  }

  /**
   * Writes a notification of streamed output: settles once stdout has room again (or breaks), which
   * is when the output is acknowledged to the guest.
   */
  private sendPaced(msg: unknown): Promise<void> | undefined {
    if (this.write(msg)) return;
    return whenWritable(this.output);
  }

  /** True if stdout has room for more (or is gone: nothing waits for a broken stdout). */
  private write(msg: unknown): boolean {
    if (this.output.writableEnded || this.output.destroyed) return true;
    if (this.output.write(`${JSON.stringify(msg)}\n`)) return true;
    this.pauseInput("output");
    return false;
  }

  private pauseInput(why: "stdin" | "output"): void {
    this.pausedBy.add(why);
    this.input.pause();
  }

  private resumeInput(why: "stdin" | "output"): void {
    if (!this.pausedBy.delete(why) || this.pausedBy.size > 0) return;
    this.input.resume();
  }

  /**
   * Accounts for a result held in memory for a response (`exec` output, `read_file` content):
   * `reserve` throws past MAX_BUFFERED_RESULT bytes for this request, or when all requests together
   * would hold more than MAX_BUFFERED_TOTAL; `release` gives the bytes back to the server.
   */
  private budget(
    code: "EXEC_FAILED" | "FILE_FAILED",
    tooBig: string,
    hint: string,
  ): { reserve(n: number): void; release(): void } {
    let bytes = 0;
    let released = false;
    return {
      reserve: (n) => {
        if (bytes + n > MAX_BUFFERED_RESULT) {
          throw new MatchlockError(code, `${tooBig} ${MAX_BUFFERED_RESULT / 1048576} MiB`, { hint });
        }
        if (this.buffered + n > MAX_BUFFERED_TOTAL) {
          throw new MatchlockError(
            code,
            `the rpc server already holds ${MAX_BUFFERED_TOTAL / 1048576} MiB of results for other requests`,
            { hint: `retry when they are done, or ${hint}` },
          );
        }
        bytes += n;
        this.buffered += n;
      },
      release: () => {
        if (released) return;
        released = true;
        this.buffered -= bytes;
      },
    };
  }
}

const LOG_CHUNK = 1024 * 1024;

/** Up to `length` bytes of a file from `offset`; nothing if it does not exist (yet). */
async function readRange(path: string, offset: number, length: number): Promise<Buffer> {
  if (length <= 0) return Buffer.alloc(0);
  const fh = await open(path, "r").catch(() => undefined);
  if (!fh) return Buffer.alloc(0);
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

function decodeBase64(s: string, what: string): Buffer {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length % 4 === 1) {
    throw new RpcError(RpcCode.INVALID_PARAMS, `${what} is not valid base64`);
  }
  return Buffer.from(s, "base64");
}
