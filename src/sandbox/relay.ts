import { chmodSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { messageOf } from "../api/errors.ts";
import {
  type ExecHandle,
  type ExecIO,
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
import type { ExecOptions } from "./sandbox.ts";

/**
 * The exec relay: the owning process serves a unix socket (0600) in the VM dir so that other
 * processes (`matchlock exec`, later `port-forward`) reach the VM. It speaks the agent protocol
 * itself, so a client is just an AgentClient on this socket. Client stream ids are the client's
 * own; each maps to a sandbox operation. A client that goes away cancels its execs.
 *
 * EXEC from a client: empty `cwd`/`user` mean the image defaults, `env` is added on top of the
 * image's and the sandbox's.
 */

export const RELAY_VERSION = "matchlock-relay 1";
const CHUNK = 64 * 1024;
/** Bytes a client may stream into one WRITE_FILE before it must end it. */
const MAX_RELAY_WRITE = 512 * 1024 * 1024;

export interface RelayTarget {
  exec(opts: ExecOptions, io: ExecIO): ExecHandle;
  terminate(handle: ExecHandle, graceMs?: number): Promise<void>;
  writeFile(path: string, data: Buffer, mode?: number): Promise<void>;
  readFile(path: string): Promise<Buffer>;
  listFiles(path: string): Promise<DirEntry[]>;
  tcpConnect(port: number, io: TcpIO): Promise<TcpStream>;
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
  private readonly writes = new Map<
    number,
    { path: string; mode: number; chunks: Buffer[]; bytes: number }
  >();
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
        this.stdinChains.set(
          f.stream,
          next.catch(() => {}),
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
      case HostMsg.WRITE_FILE: {
        if (f.payload.length < 5) throw new Error("WRITE_FILE payload too short");
        const end = f.payload.indexOf(0, 4);
        const path = f.payload.subarray(4, end < 0 ? undefined : end).toString("utf8");
        this.writes.set(f.stream, { path, mode: f.payload.readUInt32LE(0), chunks: [], bytes: 0 });
        return;
      }
      case HostMsg.FILE_DATA: {
        const w = this.writes.get(f.stream);
        if (!w) return;
        if (f.payload.length > 0) {
          w.bytes += f.payload.length;
          if (w.bytes > MAX_RELAY_WRITE) {
            this.writes.delete(f.stream);
            this.send(
              GuestMsg.RESULT,
              f.stream,
              encodeResult(27, `write ${w.path}: larger than the relay accepts`),
            );
            return;
          }
          w.chunks.push(Buffer.from(f.payload));
          return;
        }
        this.writes.delete(f.stream);
        this.target.writeFile(w.path, Buffer.concat(w.chunks), w.mode).then(
          () => this.send(GuestMsg.RESULT, f.stream, encodeResult(0, "")),
          (e: unknown) => this.send(GuestMsg.RESULT, f.stream, encodeResult(5, messageOf(e))),
        );
        return;
      }
      case HostMsg.READ_FILE:
        this.target.readFile(cstring(f.payload)).then(
          (data) => {
            for (let off = 0; off < data.length; off += CHUNK)
              this.send(GuestMsg.DATA, f.stream, data.subarray(off, off + CHUNK));
            this.send(GuestMsg.RESULT, f.stream, encodeResult(0, ""));
          },
          (e: unknown) => this.send(GuestMsg.RESULT, f.stream, encodeResult(2, messageOf(e))),
        );
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
      case HostMsg.TCP_DATA: {
        const data = Buffer.from(f.payload);
        this.withTcp(f.stream, (t) => {
          if (data.length === 0) t.end();
          else
            t.write(data).then(
              () => this.send(GuestMsg.STDIN_ACK, f.stream, encodeU32(data.length)),
              () => {},
            );
        });
        return;
      }
      case HostMsg.TCP_ACK: {
        const n = readU32(f.payload, "TCP_ACK");
        this.withTcp(f.stream, (t) => t.ack(n));
        return;
      }
      case HostMsg.TCP_CLOSE:
        this.withTcp(f.stream, (t) => t.abort());
        return;
      default:
        // SHUTDOWN and anything else are the owner's business, not a client's.
        this.send(GuestMsg.LOG, 0, Buffer.from(`relay: frame 0x${f.type.toString(16)} is not allowed`));
    }
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
          onStdout: (d) => this.send(GuestMsg.STDOUT, f.stream, d),
          onStderr: (d) => this.send(GuestMsg.STDERR, f.stream, d),
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
        if (r.startError !== undefined) this.send(GuestMsg.ERROR, f.stream, Buffer.from(r.startError));
        this.send(GuestMsg.EXIT, f.stream, encodeExit(r.exitCode, r.signal));
      },
      (e: unknown) => {
        this.execs.delete(f.stream);
        this.stdinChains.delete(f.stream);
        this.send(GuestMsg.ERROR, f.stream, Buffer.from(messageOf(e)));
        this.send(GuestMsg.EXIT, f.stream, encodeExit(1, 0));
      },
    );
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
    this.writes.clear();
  }
}

function cstring(p: Buffer): string {
  const end = p.indexOf(0);
  return p.subarray(0, end < 0 ? undefined : end).toString("utf8");
}
