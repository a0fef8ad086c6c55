import type { Duplex } from "node:stream";
import { AgentProtocolError, MatchlockError, messageOf } from "../api/errors.ts";
import { whenWritable } from "../host/drain.ts";
import {
  CHUNK,
  type DirEntry,
  type ExecRequest,
  encodeExec,
  encodeFrame,
  encodePath,
  encodeResize,
  encodeU16,
  encodeU32,
  encodeWriteFile,
  type Frame,
  FrameDecoder,
  GuestMsg,
  HostMsg,
  readDirEntries,
  readExit,
  readI32,
  readResult,
  readU32,
  WINDOW,
  WRITE_REPLACE_LINK,
} from "./protocol.ts";

/** Host side of the agent protocol over one byte stream (the `agent` virtio-serial port). */

/** Delivered guest bytes acknowledged in one ACK (see `deliver`). */
const ACK_BATCH = WINDOW / 4;
/** readFile() collects at most this much by default; streamed reads (readFileStream) have no limit. */
export const MAX_READ_FILE = 64 * 1024 * 1024;
/** A LIST_DIR answer larger than this fails that listing (about 1.3 million entries). */
const MAX_LIST_BYTES = 64 * 1024 * 1024;

/**
 * Receives a chunk of guest output. The guest may send more only once we acknowledge the chunk, and
 * we do that when the sink is done with it: when the returned promise settles (fulfilled or not),
 * or at once if it returns nothing. So a sink that writes to a slow reader returns a promise that
 * waits for that reader (see `writeSink`), and the guest's writer stalls instead of host memory growing.
 */
export type OutputSink = (data: Buffer) => void | Promise<void>;

export interface ExecIO {
  onStdout?: OutputSink;
  onStderr?: OutputSink;
  onStarted?: (pid: number) => void;
}

/** A sink writing to a Node stream: settles once the stream has room again (or is gone). */
export function writeSink(out: NodeJS.WritableStream & { destroyed?: boolean }): OutputSink {
  return (data) => {
    if (out.destroyed || out.write(data)) return;
    return whenWritable(out);
  };
}

export interface ExecResult {
  exitCode: number;
  /** Terminating signal, 0 if the process exited. */
  signal: number;
  /** Why the command could not start, when it could not. */
  startError?: string;
}

export interface ExecHandle {
  readonly stream: number;
  /** Sends stdin bytes; resolves once they fit in the flow-control window. */
  writeStdin(data: Buffer): Promise<void>;
  endStdin(): void;
  resize(rows: number, cols: number): void;
  signal(signo: number): void;
  readonly done: Promise<ExecResult>;
}

interface ExecState {
  kind: "exec";
  io: ExecIO;
  unacked: number;
  /** Output bytes the guest sent that we have not acknowledged yet. */
  guestUnacked: number;
  /** Of those, the bytes already delivered (acknowledged in batches). */
  delivered: number;
  /** Stdin writes and the EOF go out in call order, whatever the window makes each wait for. */
  stdinChain: Promise<void>;
  windowWaiters: Array<() => void>;
  startError?: string;
  resolve: (r: ExecResult) => void;
  reject: (e: Error) => void;
}

interface FileState {
  kind: "file";
  /** READ_FILE: content flows to the sink under flow control. LIST_DIR: collected up to the limit. */
  sink: OutputSink | undefined;
  guestUnacked: number;
  delivered: number;
  chunks: Buffer[];
  bytes: number;
  limit: number;
  resolve: (r: { data: Buffer; errno: number; message: string }) => void;
  reject: (e: Error) => void;
}

interface PingState {
  kind: "ping";
  resolve: () => void;
  reject: (e: Error) => void;
}

export interface FileWriter {
  write(data: Buffer): Promise<void>;
  /** Closes the file; rejects with the guest's error if any write failed. */
  end(): Promise<void>;
  /** Gives up: the guest removes the partial file. */
  abort(): void;
}

/** A TCP connection to a port in the guest (port forwarding), multiplexed on the agent channel. */
export interface TcpStream {
  readonly stream: number;
  /** Sends bytes; resolves once they fit in the flow-control window. */
  write(data: Buffer): Promise<void>;
  /** We are done sending (half-close); the guest side can still answer. */
  end(): void;
  /** Drops the connection at once. */
  abort(): void;
  /** Tell the guest `n` of its bytes were delivered, so it may send more. */
  ack(n: number): void;
  /** Settles with the errno of the end (0: both directions finished normally). */
  readonly closed: Promise<number>;
}

export interface TcpIO {
  onData: (data: Buffer) => void;
  /** The guest side finished sending. */
  onEnd: () => void;
}

interface TcpState {
  kind: "tcp";
  io: TcpIO;
  unacked: number;
  /** Guest bytes delivered to us that we have not acknowledged yet. */
  guestUnacked: number;
  chain: Promise<void>;
  windowWaiters: Array<() => void>;
  connected: boolean;
  onConnected: () => void;
  resolve: (errno: number) => void;
  reject: (e: Error) => void;
}

type StreamState = ExecState | FileState | PingState | TcpState;

export class AgentClient {
  private readonly decoder = new FrameDecoder();
  private readonly streams = new Map<number, StreamState>();
  private nextStream = 1;
  private failure: Error | undefined;
  private readyResolve: ((version: string) => void) | undefined;
  private readyReject: ((e: Error) => void) | undefined;
  readonly ready: Promise<string>;

  private readonly sock: Duplex;
  private onLog: (line: string) => void;

  constructor(sock: Duplex, onLog: (line: string) => void = () => {}) {
    this.sock = sock;
    this.onLog = onLog;
    this.ready = new Promise((resolve, reject) => {
      this.readyResolve = resolve;
      this.readyReject = reject;
    });
    this.ready.catch(() => {}); // observed by whoever awaits it; never an unhandled rejection
    sock.on("data", (chunk: Buffer) => this.onData(chunk));
    sock.on("error", (e) =>
      this.fail(new MatchlockError("VM_FAILED", `agent connection failed: ${e.message}`)),
    );
    sock.on("close", () => this.fail(new MatchlockError("VM_FAILED", "the VM closed the agent connection")));
  }

  /** Where the agent's log lines go from now on (a clone made ahead of time gets its VM's log). */
  setLog(onLog: (line: string) => void): void {
    this.onLog = onLog;
  }

  /** The first fatal error, if the connection has failed. */
  get failed(): Error | undefined {
    return this.failure;
  }

  exec(req: ExecRequest, io: ExecIO = {}): ExecHandle {
    const stream = this.allocStream();
    let resolve!: (r: ExecResult) => void;
    let reject!: (e: Error) => void;
    const done = new Promise<ExecResult>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    done.catch(() => {}); // a caller that only cancels still must not cause an unhandled rejection
    const state: ExecState = {
      kind: "exec",
      io,
      unacked: 0,
      guestUnacked: 0,
      delivered: 0,
      stdinChain: Promise.resolve(),
      windowWaiters: [],
      resolve,
      reject,
    };
    const payload = encodeExec(req); // a bad request throws before any state exists
    this.streams.set(stream, state);
    this.send(HostMsg.EXEC, stream, payload);
    return {
      stream,
      done,
      writeStdin: (data) => {
        const p = state.stdinChain.then(() => this.writeWindowed(stream, state, HostMsg.STDIN, data));
        state.stdinChain = p.catch(() => {});
        return p;
      },
      endStdin: () => {
        state.stdinChain = state.stdinChain.then(() =>
          this.sendIfOpen(stream, HostMsg.STDIN, Buffer.alloc(0)),
        );
      },
      resize: (rows, cols) => this.sendIfOpen(stream, HostMsg.RESIZE, encodeResize(rows, cols)),
      signal: (signo) => this.sendIfOpen(stream, HostMsg.SIGNAL, encodeU32(signo)),
    };
  }

  /**
   * Opens a TCP connection to `port` on the guest's loopback. Resolves once connected; rejects with
   * the guest's errno (ECONNREFUSED…) if it cannot.
   */
  async tcpConnect(port: number, io: TcpIO): Promise<TcpStream> {
    const stream = this.allocStream();
    let resolve!: (errno: number) => void;
    let reject!: (e: Error) => void;
    const closed = new Promise<number>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    closed.catch(() => {});
    let onConnected!: () => void;
    const connected = new Promise<void>((r) => {
      onConnected = r;
    });
    const state: TcpState = {
      kind: "tcp",
      io,
      unacked: 0,
      guestUnacked: 0,
      chain: Promise.resolve(),
      windowWaiters: [],
      connected: false,
      onConnected,
      resolve,
      reject,
    };
    this.streams.set(stream, state);
    this.send(HostMsg.TCP_CONNECT, stream, encodeU16(port));
    const first = await Promise.race([connected.then(() => -1), closed]);
    if (first !== -1) throw new TcpConnectError(port, first);
    return {
      stream,
      closed,
      write: (data) => {
        const p = state.chain.then(() => this.writeWindowed(stream, state, HostMsg.TCP_DATA, data));
        state.chain = p.catch(() => {});
        return p;
      },
      end: () => {
        state.chain = state.chain.then(() => this.sendIfOpen(stream, HostMsg.TCP_DATA, Buffer.alloc(0)));
      },
      abort: () => this.sendIfOpen(stream, HostMsg.CLOSE, Buffer.alloc(0)),
      ack: (n) => {
        state.guestUnacked = Math.max(0, state.guestUnacked - n);
        this.sendIfOpen(stream, HostMsg.ACK, encodeU32(n));
      },
    };
  }

  async ping(): Promise<void> {
    const stream = this.allocStream();
    await new Promise<void>((resolve, reject) => {
      this.streams.set(stream, { kind: "ping", resolve, reject });
      this.send(HostMsg.PING, stream);
    });
  }

  /** `replaceLink`: a symlink at `path` is removed first (the file becomes a regular one). */
  async writeFile(
    path: string,
    data: Buffer,
    mode = 0o644,
    opts: { replaceLink?: boolean } = {},
  ): Promise<void> {
    const w = this.openWrite(path, mode, opts.replaceLink ? WRITE_REPLACE_LINK : 0);
    await w.write(data);
    await w.end();
  }

  /**
   * Writes a guest file piece by piece (the relay streams its clients' writes through this). Each
   * write resolves once the bytes are handed to the channel with room to spare, so a fast producer
   * is held back by the VM instead of queueing in memory. `end` resolves when the guest has closed
   * the file; a failed write leaves no file behind (the agent removes it).
   */
  openWrite(path: string, mode = 0o644, flags = 0): FileWriter {
    const header = encodeWriteFile(path, mode, flags); // a bad path throws before any state exists
    const stream = this.allocStream();
    const result = this.fileOp(stream, 0);
    result.catch(() => {}); // observed by end(); a writer given up on must not be an unhandled rejection
    this.send(HostMsg.WRITE_FILE, stream, header);
    let chain = Promise.resolve();
    return {
      write: (data) => {
        chain = chain.then(async () => {
          for (let off = 0; off < data.length; off += CHUNK) {
            this.send(HostMsg.FILE_DATA, stream, data.subarray(off, off + CHUNK));
            if (this.sock.writableNeedDrain) await whenWritable(this.sock);
          }
        });
        return chain;
      },
      end: async () => {
        await chain;
        this.send(HostMsg.FILE_DATA, stream);
        const r = await result;
        if (r.errno !== 0) throw fileError(r.message || `write ${path} failed (errno ${r.errno})`);
      },
      abort: () => this.sendIfOpen(stream, HostMsg.CLOSE, Buffer.alloc(0)),
    };
  }

  /**
   * Streams a guest file into `sink`, under flow control: the guest reads ahead at most WINDOW bytes
   * of what the sink has taken. A sink that throws cancels the read (the guest closes the file) and
   * the read rejects with that error.
   */
  async readFileStream(path: string, sink: OutputSink): Promise<void> {
    const payload = encodePath(path);
    const stream = this.allocStream();
    const result = this.fileOp(stream, Number.POSITIVE_INFINITY, sink);
    this.send(HostMsg.READ_FILE, stream, payload);
    const r = await result;
    if (r.errno !== 0) throw fileError(r.message || `read ${path} failed (errno ${r.errno})`);
  }

  /** A guest file in memory; one larger than `limit` bytes is refused, and its read cancelled. */
  async readFile(path: string, limit = MAX_READ_FILE): Promise<Buffer> {
    const chunks: Buffer[] = [];
    let bytes = 0;
    await this.readFileStream(path, (data) => {
      bytes += data.length;
      if (bytes > limit) throw new FileTooLargeError(path, limit);
      chunks.push(data);
    });
    return Buffer.concat(chunks, bytes);
  }

  async listDir(path: string): Promise<DirEntry[]> {
    const payload = encodePath(path);
    const stream = this.allocStream();
    const result = this.fileOp(stream, MAX_LIST_BYTES);
    this.send(HostMsg.LIST_DIR, stream, payload);
    const r = await result;
    if (r.errno !== 0) throw fileError(r.message || `list ${path} failed (errno ${r.errno})`);
    return readDirEntries(r.data).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** Relay clients only: changes the owner's allow-list for the VM; the owner's JSON result. */
  async allowList(op: "add" | "delete", hosts: readonly string[]): Promise<unknown> {
    const stream = this.allocStream();
    const result = this.fileOp(stream, MAX_LIST_BYTES);
    this.send(HostMsg.ALLOW_LIST, stream, Buffer.from(JSON.stringify({ op, hosts })));
    const r = await result;
    if (r.errno !== 0) throw new MatchlockError("VM_FAILED", r.message || `allow-list ${op} failed`);
    return JSON.parse(r.data.toString("utf8")) as unknown;
  }

  /**
   * A clone restored from a snapshot becomes this VM: `entropy` (≤ 512 bytes) is credited to the
   * guest kernel's pool and its CRNG reseeded, then the boot parameters are applied as at boot.
   */
  async setIdentity(entropy: Buffer, params: readonly string[]): Promise<void> {
    const head = Buffer.alloc(4);
    head.writeUInt32LE(entropy.length);
    const stream = this.allocStream();
    const result = this.fileOp(stream, 0);
    this.send(HostMsg.SET_IDENTITY, stream, Buffer.concat([head, entropy, Buffer.from(params.join(" "))]));
    const r = await result;
    if (r.errno !== 0)
      throw new MatchlockError("VM_FAILED", r.message || `set identity failed (errno ${r.errno})`);
  }

  /**
   * Relay clients only: pauses or resumes the VM in its owner, or asks whether it is paused (the
   * relay must greet with `matchlock-relay 4` or later: see `relayVersion`).
   */
  async pauseVm(op: "pause" | "resume" | "status"): Promise<{ paused: boolean; changed: boolean }> {
    const stream = this.allocStream();
    const result = this.fileOp(stream, MAX_LIST_BYTES);
    this.send(HostMsg.PAUSE, stream, Buffer.from(JSON.stringify({ op })));
    const r = await result;
    if (r.errno !== 0) throw new MatchlockError("VM_FAILED", r.message || `${op} failed`);
    const answer = JSON.parse(r.data.toString("utf8")) as { paused?: unknown; changed?: unknown };
    if (typeof answer.paused !== "boolean" || typeof answer.changed !== "boolean")
      throw new AgentProtocolError(`the relay answered ${op} with ${r.data.toString("utf8").slice(0, 200)}`);
    return { paused: answer.paused, changed: answer.changed };
  }

  /** Asks the guest to sync and power off. */
  shutdown(): void {
    if (!this.failure) this.send(HostMsg.SHUTDOWN, 0);
  }

  /** Fails every pending operation and stops reading: the VM is going away. */
  close(reason = "the VM was stopped"): void {
    this.fail(new MatchlockError("VM_FAILED", reason));
    this.sock.destroy();
  }

  private fileOp(
    stream: number,
    limit: number,
    sink?: OutputSink,
  ): Promise<{ data: Buffer; errno: number; message: string }> {
    return new Promise((resolve, reject) => {
      this.streams.set(stream, {
        kind: "file",
        sink,
        guestUnacked: 0,
        delivered: 0,
        chunks: [],
        bytes: 0,
        limit,
        resolve,
        reject,
      });
    });
  }

  /**
   * Hands guest output to its sink and acknowledges it once the sink is done. A guest that sends
   * beyond the window ignores flow control: that breaks the protocol (our own agent never does).
   */
  private deliver(
    stream: number,
    s: { guestUnacked: number; delivered: number },
    sink: OutputSink | undefined,
    data: Buffer,
    onSinkError?: (e: unknown) => void,
  ): void {
    s.guestUnacked += data.length;
    if (s.guestUnacked > WINDOW) {
      throw new AgentProtocolError(
        `guest sent ${s.guestUnacked} bytes on stream ${stream} without acknowledgement (window ${WINDOW})`,
      );
    }
    const ack = () => {
      // Batched: one ACK per quarter window, not per frame (output often comes in 4 KiB pieces, and
      // every frame costs the emulated guest). The guest stalls only with a full window unacknowledged,
      // and by then at least a quarter of it is delivered, so the credit always goes out.
      s.delivered += data.length;
      if (s.delivered < ACK_BATCH) return;
      s.guestUnacked -= s.delivered;
      this.sendIfOpen(stream, HostMsg.ACK, encodeU32(s.delivered));
      s.delivered = 0;
    };
    let pending: void | Promise<void>;
    try {
      pending = sink?.(data);
    } catch (e) {
      onSinkError?.(e);
      return;
    }
    if (pending === undefined) ack();
    else
      pending.then(ack, (e: unknown) => {
        if (onSinkError) onSinkError(e);
        else ack();
      });
  }

  /** Sends `data` in chunks, never more than the window ahead of the guest's STDIN_ACKs. */
  private async writeWindowed(
    stream: number,
    state: ExecState | TcpState,
    type: number,
    data: Buffer,
  ): Promise<void> {
    for (let off = 0; off < data.length; off += CHUNK) {
      const piece = data.subarray(off, off + CHUNK);
      while (state.unacked + piece.length > WINDOW) {
        if (this.failure) throw this.failure;
        if (!this.streams.has(stream)) return; // the process/connection is gone: drop the bytes
        await new Promise<void>((resolve) => state.windowWaiters.push(resolve));
      }
      if (!this.streams.has(stream)) return;
      state.unacked += piece.length;
      this.send(type, stream, piece);
    }
  }

  private sendIfOpen(stream: number, type: number, payload: Buffer): void {
    if (this.streams.has(stream) && !this.failure) this.send(type, stream, payload);
  }

  private send(type: number, stream: number, payload?: Buffer): void {
    if (this.failure) throw this.failure;
    this.sock.write(encodeFrame(type, stream, payload));
  }

  private allocStream(): number {
    if (this.failure) throw this.failure;
    // Ids wrap well before 2^32; skip 0 (the agent itself) and ids still in use.
    do {
      this.nextStream = this.nextStream >= 0xfffffff0 ? 1 : this.nextStream + 1;
    } while (this.streams.has(this.nextStream));
    return this.nextStream;
  }

  private onData(chunk: Buffer): void {
    if (this.failure) return;
    try {
      for (const frame of this.decoder.push(chunk)) this.dispatch(frame);
    } catch (e) {
      const err = e instanceof MatchlockError ? e : new AgentProtocolError(messageOf(e));
      this.fail(err);
      this.sock.destroy();
    }
  }

  private dispatch(f: Frame): void {
    if (f.type === GuestMsg.READY) {
      this.readyResolve?.(f.payload.toString("utf8"));
      return;
    }
    if (f.type === GuestMsg.LOG) {
      this.onLog(f.payload.toString("utf8"));
      return;
    }
    const state = this.streams.get(f.stream);
    if (state === undefined) return; // late frames of a finished or cancelled stream
    switch (state.kind) {
      case "exec":
        this.dispatchExec(f, state);
        return;
      case "file":
        this.dispatchFile(f, state);
        return;
      case "tcp":
        this.dispatchTcp(f, state);
        return;
      case "ping":
        if (f.type !== GuestMsg.PONG)
          throw new AgentProtocolError(`unexpected frame 0x${f.type.toString(16)} for a ping`);
        this.streams.delete(f.stream);
        state.resolve();
        return;
    }
  }

  private dispatchExec(f: Frame, s: ExecState): void {
    switch (f.type) {
      case GuestMsg.STDOUT:
        this.deliver(f.stream, s, s.io.onStdout, f.payload);
        return;
      case GuestMsg.STDERR:
        this.deliver(f.stream, s, s.io.onStderr, f.payload);
        return;
      case GuestMsg.STARTED:
        s.io.onStarted?.(readU32(f.payload, "STARTED"));
        return;
      case GuestMsg.STDIN_ACK: {
        s.unacked = Math.max(0, s.unacked - readU32(f.payload, "STDIN_ACK"));
        const waiters = s.windowWaiters.splice(0);
        for (const w of waiters) w();
        return;
      }
      case GuestMsg.ERROR:
        s.startError = f.payload.toString("utf8");
        return;
      case GuestMsg.EXIT: {
        const { exitCode, signal } = readExit(f.payload);
        this.streams.delete(f.stream);
        for (const w of s.windowWaiters.splice(0)) w();
        s.resolve(
          s.startError === undefined ? { exitCode, signal } : { exitCode, signal, startError: s.startError },
        );
        return;
      }
      default:
        throw new AgentProtocolError(`unexpected frame 0x${f.type.toString(16)} on an exec stream`);
    }
  }

  private dispatchTcp(f: Frame, s: TcpState): void {
    switch (f.type) {
      case GuestMsg.TCP_CONNECTED:
        s.connected = true;
        s.onConnected();
        return;
      case GuestMsg.TCP_DATA:
        if (f.payload.length === 0) {
          s.io.onEnd();
          return;
        }
        s.guestUnacked += f.payload.length;
        if (s.guestUnacked > WINDOW) {
          // The guest ignores flow control: drop this connection, not the whole VM.
          this.streams.delete(f.stream);
          this.send(HostMsg.CLOSE, f.stream);
          s.resolve(-1);
          return;
        }
        s.io.onData(f.payload);
        return;
      case GuestMsg.STDIN_ACK: {
        s.unacked = Math.max(0, s.unacked - readU32(f.payload, "STDIN_ACK"));
        for (const w of s.windowWaiters.splice(0)) w();
        return;
      }
      case GuestMsg.TCP_CLOSED: {
        const errno = readI32(f.payload, "TCP_CLOSED");
        this.streams.delete(f.stream);
        for (const w of s.windowWaiters.splice(0)) w();
        s.resolve(errno);
        return;
      }
      default:
        throw new AgentProtocolError(`unexpected frame 0x${f.type.toString(16)} on a TCP stream`);
    }
  }

  private dispatchFile(f: Frame, s: FileState): void {
    if (f.type === GuestMsg.DATA) {
      if (s.sink) {
        // A sink that fails ends the read here: the guest closes the file, later frames are dropped.
        this.deliver(f.stream, s, s.sink, f.payload, (e) => {
          if (this.streams.get(f.stream) !== s) return;
          this.streams.delete(f.stream);
          if (!this.failure) this.send(HostMsg.CLOSE, f.stream);
          s.reject(e instanceof Error ? e : new Error(String(e)));
        });
        return;
      }
      s.bytes += f.payload.length;
      if (s.bytes > s.limit) {
        // Too much for one listing: fail this operation, not the VM (its late frames are dropped).
        this.streams.delete(f.stream);
        s.reject(fileError(`the guest answered more than ${s.limit} bytes for one listing`));
        return;
      }
      s.chunks.push(f.payload);
      return;
    }
    if (f.type === GuestMsg.RESULT) {
      this.streams.delete(f.stream);
      const { errno, message } = readResult(f.payload);
      s.resolve({ data: Buffer.concat(s.chunks), errno, message });
      return;
    }
    throw new AgentProtocolError(`unexpected frame 0x${f.type.toString(16)} on a file stream`);
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.readyReject?.(err);
    for (const s of this.streams.values()) {
      if (s.kind === "exec" || s.kind === "tcp") for (const w of s.windowWaiters.splice(0)) w();
      s.reject(err);
    }
    this.streams.clear();
  }
}

const ERRNO_NAMES: Record<number, string> = {
  [-1]: "flow-control violation",
  2: "ENOENT",
  22: "EINVAL",
  104: "ECONNRESET",
  110: "ETIMEDOUT",
  111: "ECONNREFUSED (nothing listens there)",
  113: "EHOSTUNREACH",
};

/** Grace between SIGTERM and SIGKILL when a command is cancelled. */
export const DEFAULT_GRACE_MS = 3000;

/** SIGTERM to a command's process group, then SIGKILL if it still runs after `graceMs`; waits for its end. */
export async function terminateExec(handle: ExecHandle, graceMs: number): Promise<void> {
  handle.signal(15);
  const timer = setTimeout(() => handle.signal(9), graceMs);
  await handle.done.catch(() => {});
  clearTimeout(timer);
}

/** readFile of a file larger than its limit: the caller should stream it instead. */
export class FileTooLargeError extends MatchlockError {
  readonly limit: number;
  constructor(path: string, limit: number) {
    super("FILE_FAILED", `${path} is larger than ${limit} bytes, the most read_file returns at once`, {
      hint: "stream it instead (exec_stream `cat FILE`), or read part of it (`head -c`)",
    });
    this.name = "FileTooLargeError";
    this.limit = limit;
  }
}

export class TcpConnectError extends MatchlockError {
  readonly errno: number;
  constructor(port: number, errno: number) {
    super("VM_FAILED", `cannot connect to guest port ${port}: ${errnoName(errno)}`);
    this.name = "TcpConnectError";
    this.errno = errno;
  }
}

export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

function fileError(message: string): MatchlockError {
  return new MatchlockError("FILE_FAILED", message);
}
