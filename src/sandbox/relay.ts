import { chmodSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { messageOf } from "../api/errors.ts";
import {
  type ExecHandle,
  type ExecIO,
  type FileWriter,
  type OutputSink,
  TcpConnectError,
  type TcpIO,
  type TcpStream,
} from "../guest/agent-client.ts";
import {
  type DirEntry,
  decodeExec,
  encodeDirEntries,
  encodeExit,
  encodeFrame,
  encodeI32,
  encodeResult,
  encodeU32,
  type Frame,
  FrameDecoder,
  GuestMsg,
  HostMsg,
  readU32,
} from "../guest/protocol.ts";
import type { PauseState } from "./pause.ts";
import type { ExecOptions } from "./sandbox.ts";

/**
 * The exec relay: the owning process serves a unix socket (0600) in the VM dir so that other
 * processes (`matchlock exec`, later `port-forward`) reach the VM. It speaks the agent protocol
 * itself, so a client is just an AgentClient on this socket. Client stream ids are the client's
 * own; each maps to a sandbox operation. A client that goes away cancels its execs.
 *
 * EXEC from a client: empty `cwd`/`user` mean the image defaults, `env` is added on top of the
 * image's and the sandbox's.
 *
 * Flow control holds end to end: guest output and file content go to the client as fast as the
 * client ACKs them (the guest's own window is acknowledged only then), and a client's WRITE_FILE
 * data is read off its socket only as fast as the VM takes it. Memory per client stays bounded.
 */

export const RELAY_VERSION = "matchlock-relay 4";
/** Bytes of a client's data (stdin, TCP, file writes) in flight to the VM before we stop reading its socket. */
const INBOUND_HIGH_WATER = 1024 * 1024;
const ECANCELED = 125;

export interface RelayTarget {
  exec(opts: ExecOptions, io: ExecIO): ExecHandle;
  terminate(handle: ExecHandle, graceMs?: number): Promise<void>;
  openWrite(path: string, mode?: number): FileWriter;
  readFileStream(path: string, sink: OutputSink): Promise<void>;
  listFiles(path: string): Promise<DirEntry[]>;
  tcpConnect(port: number, io: TcpIO): Promise<TcpStream>;
  allowListAdd(hosts: readonly string[]): unknown;
  allowListDelete(hosts: readonly string[]): unknown;
  readonly paused: boolean;
  pause(): Promise<PauseState>;
  resume(): Promise<PauseState>;
}

/**
 * Bytes sent to the client on one stream and not yet acknowledged by it: each send waits until the
 * client's ACKs cover it. `release` (client gone, stream over) lets every wait through.
 */
class AckQueue {
  private credit = 0;
  private readonly waiting: Array<{ n: number; resolve: () => void; reject: (e: Error) => void }> = [];
  private released = false;
  private failure: Error | undefined;

  wait(n: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.released) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.waiting.push({ n, resolve, reject });
      this.settle();
    });
  }

  ack(n: number): void {
    this.credit += n;
    this.settle();
  }

  get cancelled(): boolean {
    return this.failure !== undefined;
  }

  release(): void {
    this.released = true;
    for (const w of this.waiting.splice(0)) w.resolve();
  }

  /** Every pending and later wait rejects (the client cancelled the operation). */
  fail(e: Error): void {
    this.failure = e;
    for (const w of this.waiting.splice(0)) w.reject(e);
  }

  private settle(): void {
    while (this.waiting.length > 0 && (this.waiting[0] as { n: number }).n <= this.credit) {
      const w = this.waiting.shift() as { n: number; resolve: () => void };
      this.credit -= w.n;
      w.resolve();
    }
  }
}

export class RelayServer {
  private readonly server: Server;
  private readonly path: string;
  private readonly conns = new Set<RelayConnection>();

  private constructor(server: Server, path: string) {
    this.server = server;
    this.path = path;
  }

  static async listen(path: string, target: RelayTarget): Promise<RelayServer> {
    rmSync(path, { force: true });
    const server = createServer();
    const relay = new RelayServer(server, path);
    server.on("connection", (sock) => {
      const c = new RelayConnection(sock, target);
      relay.conns.add(c);
      sock.on("close", () => relay.conns.delete(c));
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      // Only the owner's user may connect: the socket is created 0600 (umask) and chmod'ed to be sure.
      const old = process.umask(0o177);
      server.listen(path, () => {
        process.umask(old);
        resolve();
      });
    });
    chmodSync(path, 0o600);
    return relay;
  }

  close(): void {
    this.server.close();
    for (const c of this.conns) c.destroy();
    rmSync(this.path, { force: true });
  }
}

class RelayConnection {
  private readonly sock: Socket;
  private readonly target: RelayTarget;
  private readonly decoder = new FrameDecoder("host");
  private readonly execs = new Map<number, ExecHandle>();
  private readonly stdinChains = new Map<number, Promise<void>>();
  /** Client TCP streams: each resolves to the guest stream once connected (frames queue behind it). */
  private readonly tcp = new Map<number, Promise<TcpStream | undefined>>();
  /** Client WRITE_FILEs: each streams into the VM; `chain` orders its pieces and the end. */
  private readonly writes = new Map<
    number,
    { writer: FileWriter | undefined; error?: string; chain: Promise<void> }
  >();
  /** Bytes of client data received and not yet taken by the VM (we pause the socket above a bound). */
  private inbound = 0;
  /** Guest→client data (exec output, file content) waiting for the client's ACKs, per stream. */
  private readonly acks = new Map<number, AckQueue>();
  private closed = false;

  constructor(sock: Socket, target: RelayTarget) {
    this.sock = sock;
    this.target = target;
    sock.on("data", (d: Buffer) => this.onData(d));
    sock.on("error", () => {});
    sock.on("close", () => this.onClose());
    this.send(GuestMsg.READY, 0, Buffer.from(RELAY_VERSION));
  }

  destroy(): void {
    this.sock.destroy();
  }

  private send(type: number, stream: number, payload?: Buffer): void {
    if (!this.closed && !this.sock.destroyed) this.sock.write(encodeFrame(type, stream, payload));
  }

  private onData(d: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.decoder.push(d);
    } catch (e) {
      this.send(GuestMsg.LOG, 0, Buffer.from(`relay: ${messageOf(e)}`));
      this.sock.end();
      return;
    }
    for (const f of frames) {
      try {
        this.dispatch(f);
      } catch (e) {
        this.send(GuestMsg.LOG, 0, Buffer.from(`relay: ${messageOf(e)}`));
      }
    }
  }

  private dispatch(f: Frame): void {
    switch (f.type) {
      case HostMsg.EXEC:
        this.startExec(f);
        return;
      case HostMsg.STDIN: {
        const h = this.execs.get(f.stream);
        if (!h) return;
        // Chained per stream: a later chunk or the EOF must never overtake one still waiting for window.
        const prev = this.stdinChains.get(f.stream) ?? Promise.resolve();
        const data = Buffer.from(f.payload);
        const next = prev.then(async () => {
          if (data.length === 0) {
            h.endStdin();
            return;
          }
          await h.writeStdin(data);
          this.send(GuestMsg.STDIN_ACK, f.stream, encodeU32(data.length));
        });
        // Counted from arrival: chunks queued behind a slow one are in flight too.
        this.stdinChains.set(
          f.stream,
          this.holdInbound(data.length, next).catch(() => {}),
        );
        return;
      }
      case HostMsg.RESIZE:
        if (f.payload.length === 4)
          this.execs.get(f.stream)?.resize(f.payload.readUInt16LE(0), f.payload.readUInt16LE(2));
        return;
      case HostMsg.SIGNAL:
        this.execs.get(f.stream)?.signal(readU32(f.payload, "SIGNAL"));
        return;
      case HostMsg.PING:
        this.send(GuestMsg.PONG, f.stream, f.payload);
        return;
      case HostMsg.WRITE_FILE:
        this.startWrite(f);
        return;
      case HostMsg.FILE_DATA:
        this.writeData(f.stream, Buffer.from(f.payload));
        return;
      case HostMsg.READ_FILE:
        this.startRead(f.stream, cstring(f.payload));
        return;
      case HostMsg.LIST_DIR:
        this.target.listFiles(cstring(f.payload)).then(
          (entries) => {
            for (let i = 0; i < entries.length; i += 512) {
              this.send(GuestMsg.DATA, f.stream, encodeDirEntries(entries.slice(i, i + 512)));
            }
            this.send(GuestMsg.RESULT, f.stream, encodeResult(0, ""));
          },
          (e: unknown) => this.send(GuestMsg.RESULT, f.stream, encodeResult(2, messageOf(e))),
        );
        return;
      case HostMsg.TCP_CONNECT:
        this.startTcp(f);
        return;
      case HostMsg.ALLOW_LIST:
        this.changeAllowList(f);
        return;
      case HostMsg.PAUSE:
        this.changePause(f);
        return;
      case HostMsg.TCP_DATA: {
        const data = Buffer.from(f.payload);
        const connecting = this.tcp.get(f.stream);
        if (!connecting) return;
        const written = connecting.then(async (t) => {
          if (!t) return;
          if (data.length === 0) t.end();
          else {
            await t.write(data);
            this.send(GuestMsg.STDIN_ACK, f.stream, encodeU32(data.length));
          }
        });
        this.holdInbound(data.length, written).catch(() => {});
        return;
      }
      case HostMsg.ACK: {
        const n = readU32(f.payload, "ACK");
        const q = this.acks.get(f.stream);
        if (q) q.ack(n);
        else this.withTcp(f.stream, (t) => t.ack(n));
        return;
      }
      case HostMsg.CLOSE: {
        const q = this.acks.get(f.stream);
        if (q && !this.execs.has(f.stream)) q.fail(new Error("read cancelled by the client"));
        else this.withTcp(f.stream, (t) => t.abort());
        return;
      }
      default:
        // SHUTDOWN and anything else are the owner's business, not a client's.
        this.send(GuestMsg.LOG, 0, Buffer.from(`relay: frame 0x${f.type.toString(16)} is not allowed`));
    }
  }

  private changeAllowList(f: Frame): void {
    try {
      const req = JSON.parse(f.payload.toString("utf8")) as { op?: unknown; hosts?: unknown };
      const hosts = Array.isArray(req.hosts)
        ? req.hosts.filter((h): h is string => typeof h === "string")
        : [];
      if (req.op !== "add" && req.op !== "delete") throw new Error(`unknown allow-list op ${String(req.op)}`);
      const result = req.op === "add" ? this.target.allowListAdd(hosts) : this.target.allowListDelete(hosts);
      this.send(GuestMsg.DATA, f.stream, Buffer.from(JSON.stringify(result)));
      this.send(GuestMsg.RESULT, f.stream, encodeResult(0, ""));
    } catch (e) {
      this.send(GuestMsg.RESULT, f.stream, encodeResult(22, messageOf(e)));
    }
  }

  /** PAUSE `{op}`: the owner pauses or resumes its VM, or says whether it is paused. */
  private changePause(f: Frame): void {
    const answer = (r: PauseState) => {
      this.send(GuestMsg.DATA, f.stream, Buffer.from(JSON.stringify(r)));
      this.send(GuestMsg.RESULT, f.stream, encodeResult(0, ""));
    };
    let op: unknown;
    try {
      op = (JSON.parse(f.payload.toString("utf8")) as { op?: unknown }).op;
    } catch {}
    if (op === "status") answer({ paused: this.target.paused, changed: false });
    else if (op === "pause" || op === "resume") {
      (op === "pause" ? this.target.pause() : this.target.resume()).then(answer, (e: unknown) =>
        this.send(GuestMsg.RESULT, f.stream, encodeResult(5, messageOf(e))),
      );
    } else this.send(GuestMsg.RESULT, f.stream, encodeResult(22, `unknown pause op ${String(op)}`));
  }

  private startExec(f: Frame): void {
    if (this.execs.has(f.stream)) throw new Error(`stream ${f.stream} is already in use`);
    const req = decodeExec(f.payload);
    const env: Record<string, string> = {};
    for (const kv of req.env) {
      const eq = kv.indexOf("=");
      if (eq > 0) env[kv.slice(0, eq)] = kv.slice(eq + 1);
    }
    let h: ExecHandle;
    try {
      h = this.target.exec(
        {
          argv: req.argv,
          env,
          ...(req.cwd ? { cwd: req.cwd } : {}),
          ...(req.user ? { user: req.user } : {}),
          tty: req.tty,
          stdin: req.stdin,
          ...(req.rows ? { rows: req.rows } : {}),
          ...(req.cols ? { cols: req.cols } : {}),
        },
        {
          onStdout: this.sinkTo(f.stream, GuestMsg.STDOUT),
          onStderr: this.sinkTo(f.stream, GuestMsg.STDERR),
          onStarted: (pid) => this.send(GuestMsg.STARTED, f.stream, encodeU32(pid)),
        },
      );
    } catch (e) {
      this.send(GuestMsg.ERROR, f.stream, Buffer.from(messageOf(e)));
      this.send(GuestMsg.EXIT, f.stream, encodeExit(1, 0));
      return;
    }
    this.execs.set(f.stream, h);
    h.done.then(
      (r) => {
        this.execs.delete(f.stream);
        this.stdinChains.delete(f.stream);
        this.endAcks(f.stream);
        if (r.startError !== undefined) this.send(GuestMsg.ERROR, f.stream, Buffer.from(r.startError));
        this.send(GuestMsg.EXIT, f.stream, encodeExit(r.exitCode, r.signal));
      },
      (e: unknown) => {
        this.execs.delete(f.stream);
        this.stdinChains.delete(f.stream);
        this.endAcks(f.stream);
        this.send(GuestMsg.ERROR, f.stream, Buffer.from(messageOf(e)));
        this.send(GuestMsg.EXIT, f.stream, encodeExit(1, 0));
      },
    );
  }

  /** A sink sending guest data to the client as `type` frames, settling as the client ACKs them. */
  private sinkTo(stream: number, type: number): OutputSink {
    return (d) => {
      if (this.closed) {
        // Nobody reads any more: output is dropped, a file read is cancelled.
        if (type === GuestMsg.DATA) throw new Error("the client went away");
        return;
      }
      let q = this.acks.get(stream);
      if (!q) {
        q = new AckQueue();
        this.acks.set(stream, q);
      }
      this.send(type, stream, d);
      return q.wait(d.length);
    };
  }

  private endAcks(stream: number): void {
    this.acks.get(stream)?.release();
    this.acks.delete(stream);
  }

  private startRead(stream: number, path: string): void {
    if (this.acks.has(stream) || this.execs.has(stream))
      throw new Error(`stream ${stream} is already in use`);
    this.acks.set(stream, new AckQueue());
    this.target.readFileStream(path, this.sinkTo(stream, GuestMsg.DATA)).then(
      () => {
        this.endAcks(stream);
        this.send(GuestMsg.RESULT, stream, encodeResult(0, ""));
      },
      (e: unknown) => {
        const cancelled = this.acks.get(stream)?.cancelled ?? false;
        this.endAcks(stream);
        this.send(GuestMsg.RESULT, stream, encodeResult(cancelled ? ECANCELED : 2, messageOf(e)));
      },
    );
  }

  private startWrite(f: Frame): void {
    if (this.writes.has(f.stream)) throw new Error(`stream ${f.stream} is already in use`);
    const end = f.payload.indexOf(0, 4);
    if (f.payload.length < 5 || end < 0) {
      this.writes.set(f.stream, {
        writer: undefined,
        error: "write_file: malformed payload",
        chain: Promise.resolve(),
      });
      return;
    }
    const path = f.payload.subarray(4, end).toString("utf8");
    try {
      const writer = this.target.openWrite(path, f.payload.readUInt32LE(0));
      this.writes.set(f.stream, { writer, chain: Promise.resolve() });
    } catch (e) {
      this.writes.set(f.stream, { writer: undefined, error: messageOf(e), chain: Promise.resolve() });
    }
  }

  /** A piece of a client's WRITE_FILE (empty: the end). Its socket pauses while the VM lags behind. */
  private writeData(stream: number, data: Buffer): void {
    const w = this.writes.get(stream);
    if (!w) return;
    if (data.length === 0) {
      this.writes.delete(stream);
      w.chain
        .then(() => {
          if (w.error !== undefined) throw new Error(w.error);
          return w.writer?.end();
        })
        .then(
          () => this.send(GuestMsg.RESULT, stream, encodeResult(0, "")),
          (e: unknown) => this.send(GuestMsg.RESULT, stream, encodeResult(5, messageOf(e))),
        );
      return;
    }
    if (!w.writer || w.error !== undefined) return; // already failed: the end reports it
    const writer = w.writer;
    w.chain = this.holdInbound(
      data.length,
      w.chain.then(() => writer.write(data)),
    ).catch((e: unknown) => {
      w.error ??= messageOf(e);
    });
  }

  /**
   * Counts `n` client bytes as in flight until `taken` settles; above the bound we stop reading the
   * client's socket, so a client that sends faster than the VM takes is held back by its own socket.
   */
  private holdInbound<T>(n: number, taken: Promise<T>): Promise<T> {
    this.inbound += n;
    if (this.inbound > INBOUND_HIGH_WATER) this.sock.pause();
    return taken.finally(() => {
      this.inbound -= n;
      if (this.inbound <= INBOUND_HIGH_WATER && !this.closed) this.sock.resume();
    });
  }

  /**
   * A client TCP stream to a guest port. The client's TCP_ACKs are passed on to the guest only as
   * the client acknowledges, so flow control holds end to end.
   */
  private startTcp(f: Frame): void {
    if (this.tcp.has(f.stream)) throw new Error(`stream ${f.stream} is already in use`);
    if (f.payload.length !== 2) {
      this.send(GuestMsg.TCP_CLOSED, f.stream, encodeI32(22));
      return;
    }
    const port = f.payload.readUInt16LE(0);
    const connecting = this.target
      .tcpConnect(port, {
        onData: (d) => this.send(GuestMsg.TCP_DATA, f.stream, d),
        onEnd: () => this.send(GuestMsg.TCP_DATA, f.stream, Buffer.alloc(0)),
      })
      .then(
        (t) => {
          this.send(GuestMsg.TCP_CONNECTED, f.stream);
          t.closed.then(
            (errno) => this.endTcp(f.stream, errno),
            () => this.endTcp(f.stream, 5),
          );
          return t;
        },
        (e: unknown) => {
          this.endTcp(f.stream, e instanceof TcpConnectError ? e.errno : 111);
          return undefined;
        },
      );
    this.tcp.set(f.stream, connecting);
  }

  private withTcp(stream: number, fn: (t: TcpStream) => void): void {
    this.tcp
      .get(stream)
      ?.then((t) => {
        if (t) fn(t);
      })
      .catch(() => {});
  }

  private endTcp(stream: number, errno: number): void {
    if (!this.tcp.delete(stream)) return;
    this.send(GuestMsg.TCP_CLOSED, stream, encodeI32(errno));
  }

  /** The client went away: its commands are cancelled, as if it had pressed Ctrl-C. */
  private onClose(): void {
    this.closed = true;
    for (const h of this.execs.values()) this.target.terminate(h).catch(() => {});
    this.execs.clear();
    for (const t of this.tcp.values()) t.then((s) => s?.abort()).catch(() => {});
    this.tcp.clear();
    for (const w of this.writes.values()) w.writer?.abort();
    this.writes.clear();
    // Nobody will ACK any more: the cancelled commands' output drains so they can end; reads stop.
    for (const [stream, q] of this.acks) {
      if (this.execs.has(stream)) q.release();
      else q.fail(new Error("the client went away"));
    }
    this.acks.clear();
  }
}

function cstring(p: Buffer): string {
  const end = p.indexOf(0);
  return p.subarray(0, end < 0 ? undefined : end).toString("utf8");
}
