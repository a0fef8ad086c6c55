import { AgentProtocolError, InvalidArgumentError } from "../api/errors.ts";
import { Constants, ExecFlags, GuestMsg, HostMsg } from "./protocol-spec.ts";

/**
 * Frame codec of the agent protocol (docs/agent-protocol.md). The frame types and numbers are declared
 * once, in protocol-spec.ts, which the C agent's header and the Python test driver are generated from.
 */

export { ExecFlags, GuestMsg, HostMsg };

export const HEADER_SIZE = Constants.HEADER_SIZE;
export const MAX_PAYLOAD = Constants.MAX_PAYLOAD;
/**
 * Flow control, both directions: a sender keeps at most this many bytes of one stream unacknowledged.
 * Host→guest (STDIN, TCP_DATA) the guest answers STDIN_ACK; guest→host (STDOUT/STDERR, READ_FILE
 * DATA, TCP_DATA) the host answers ACK once the bytes are delivered to their reader, so a slow
 * reader anywhere stalls the writer in the guest and no buffer in between grows.
 */
export const WINDOW = Constants.WINDOW;
/** The largest data frame the guest sends, and the host's chunk size for STDIN, FILE_DATA, TCP_DATA. */
export const CHUNK = Constants.CHUNK;

const GUEST_TYPES = new Set<number>(Object.values(GuestMsg));
const HOST_TYPES = new Set<number>(Object.values(HostMsg));

export interface Frame {
  type: number;
  stream: number;
  payload: Buffer;
}

export function encodeFrame(type: number, stream: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  if (payload.length > MAX_PAYLOAD)
    throw new RangeError(`frame payload of ${payload.length} bytes is too large`);
  const header = Buffer.alloc(HEADER_SIZE);
  header.writeUInt32LE(payload.length, 0);
  header.writeUInt8(type, 4);
  header.writeUInt32LE(stream, 5);
  return payload.length === 0 ? header : Buffer.concat([header, payload]);
}

export interface ExecRequest {
  argv: string[];
  env: string[];
  cwd: string;
  user: string;
  tty: boolean;
  stdin: boolean;
  mkdirCwd: boolean;
  rows?: number;
  cols?: number;
}

/** A NUL-terminated string field. A NUL inside is the caller's input error, never a protocol one. */
function cstr(s: string, what: string): Buffer {
  if (s.includes("\0")) throw new InvalidArgumentError(`${what} contains a NUL byte`);
  return Buffer.from(`${s}\0`, "utf8");
}

/**
 * The EXEC payload. Its limits (65535 arguments, 65535 variables, 1 MiB in all) are the only
 * definition of how big a command may be: front ends call this before booting to refuse early.
 */
export function encodeExec(req: ExecRequest): Buffer {
  if (req.argv.length === 0) throw new InvalidArgumentError("no command given");
  if (req.argv.length > 0xffff)
    throw new InvalidArgumentError(`${req.argv.length} arguments: at most 65535 fit in one command`);
  if (req.env.length > 0xffff)
    throw new InvalidArgumentError(
      `${req.env.length} environment variables: at most 65535 fit in one command`,
    );
  const head = Buffer.alloc(12);
  const flags =
    (req.tty ? ExecFlags.TTY : 0) |
    (req.stdin ? ExecFlags.STDIN : 0) |
    (req.mkdirCwd ? ExecFlags.MKDIR_CWD : 0);
  head.writeUInt32LE(flags, 0);
  head.writeUInt16LE(clampU16(req.rows ?? 24), 4);
  head.writeUInt16LE(clampU16(req.cols ?? 80), 6);
  head.writeUInt16LE(req.argv.length, 8);
  head.writeUInt16LE(req.env.length, 10);
  const parts = [head, cstr(req.user, "user"), cstr(req.cwd, "working directory")];
  for (const a of req.argv) parts.push(cstr(a, "argument"));
  for (const e of req.env) parts.push(cstr(e, "environment variable"));
  const payload = Buffer.concat(parts);
  if (payload.length > MAX_PAYLOAD) {
    throw new InvalidArgumentError(
      `the command line and environment take ${payload.length} bytes; at most ${MAX_PAYLOAD - 12} fit in one command`,
      "pass large data through stdin or a file (write_file) instead",
    );
  }
  return payload;
}

/** Reads an EXEC payload (the exec relay receives them from other matchlock processes). */
export function decodeExec(p: Buffer): ExecRequest {
  if (p.length < 12) throw new AgentProtocolError("EXEC payload too short");
  const flags = p.readUInt32LE(0);
  const argc = p.readUInt16LE(8);
  const envc = p.readUInt16LE(10);
  const strings: string[] = [];
  let off = 12;
  for (let i = 0; i < 2 + argc + envc; i++) {
    const end = p.indexOf(0, off);
    if (end < 0) throw new AgentProtocolError("EXEC payload: string without NUL");
    strings.push(p.subarray(off, end).toString("utf8"));
    off = end + 1;
  }
  if (argc < 1) throw new AgentProtocolError("EXEC payload: no argv");
  return {
    user: strings[0] ?? "",
    cwd: strings[1] ?? "",
    argv: strings.slice(2, 2 + argc),
    env: strings.slice(2 + argc),
    tty: (flags & ExecFlags.TTY) !== 0,
    stdin: (flags & ExecFlags.STDIN) !== 0,
    mkdirCwd: (flags & ExecFlags.MKDIR_CWD) !== 0,
    rows: p.readUInt16LE(4),
    cols: p.readUInt16LE(6),
  };
}

/** LIST_DIR entry bytes for `entries` (the relay re-encodes what the agent sent). */
export function encodeDirEntries(entries: DirEntry[]): Buffer {
  return Buffer.concat(
    entries.map((e) => {
      const head = Buffer.alloc(24);
      head.writeUInt32LE(e.mode, 0);
      head.writeBigUInt64LE(BigInt(e.size), 4);
      const sec = Math.floor(e.mtimeMs / 1000);
      head.writeBigInt64LE(BigInt(sec), 12);
      head.writeUInt32LE(Math.min(999_999_999, Math.round((e.mtimeMs - sec * 1000) * 1e6)), 20);
      return Buffer.concat([head, Buffer.from(`${e.name}\0`)]);
    }),
  );
}

export function encodeExit(exitCode: number, signal: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeInt32LE(exitCode, 0);
  b.writeInt32LE(signal, 4);
  return b;
}

export function encodeResult(errno: number, message: string): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32LE(errno, 0);
  return Buffer.concat([b, Buffer.from(message, "utf8")]);
}

/** A terminal dimension the guest can use: 1–65535 (NaN, which no size is, becomes 1). */
export function clampU16(n: number): number {
  return Number.isNaN(n) ? 1 : Math.max(1, Math.min(0xffff, Math.trunc(n)));
}

export function encodeResize(rows: number, cols: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt16LE(clampU16(rows), 0);
  b.writeUInt16LE(clampU16(cols), 2);
  return b;
}

export function encodeU16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(n & 0xffff, 0);
  return b;
}

export function encodeU32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0, 0);
  return b;
}

export function encodeI32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32LE(n, 0);
  return b;
}

/** WRITE_FILE flag (above the mode bits): a symlink at `path` is replaced, not written through. */
export const WRITE_REPLACE_LINK = Constants.WRITE_REPLACE_LINK;

export function encodeWriteFile(path: string, mode: number, flags = 0): Buffer {
  return Buffer.concat([encodeU32((mode & 0o7777) | flags), cstr(path, "path")]);
}

export function encodePath(path: string): Buffer {
  return cstr(path, "path");
}

/** Payload readers: each validates the size the guest claims before reading. */
export function readExit(p: Buffer): { exitCode: number; signal: number } {
  if (p.length !== 8) throw new AgentProtocolError(`EXIT frame of ${p.length} bytes (want 8)`);
  return { exitCode: p.readInt32LE(0), signal: p.readInt32LE(4) };
}

export function readU32(p: Buffer, what: string): number {
  if (p.length !== 4) throw new AgentProtocolError(`${what} frame of ${p.length} bytes (want 4)`);
  return p.readUInt32LE(0);
}

export function readI32(p: Buffer, what: string): number {
  if (p.length !== 4) throw new AgentProtocolError(`${what} frame of ${p.length} bytes (want 4)`);
  return p.readInt32LE(0);
}

export function readResult(p: Buffer): { errno: number; message: string } {
  if (p.length < 4) throw new AgentProtocolError(`RESULT frame of ${p.length} bytes (want ≥ 4)`);
  return { errno: p.readInt32LE(0), message: p.subarray(4).toString("utf8") };
}

export interface DirEntry {
  name: string;
  mode: number;
  size: number;
  mtimeMs: number;
  isDir: boolean;
}

const S_IFMT = 0o170000;
const S_IFDIR = 0o040000;

/** Parses LIST_DIR DATA bytes (already concatenated) into entries. */
export function readDirEntries(buf: Buffer): DirEntry[] {
  const out: DirEntry[] = [];
  let off = 0;
  while (off < buf.length) {
    if (buf.length - off < 25) throw new AgentProtocolError("truncated directory entry");
    const mode = buf.readUInt32LE(off);
    const size = Number(buf.readBigUInt64LE(off + 4));
    const sec = Number(buf.readBigInt64LE(off + 12));
    const nsec = buf.readUInt32LE(off + 20);
    const end = buf.indexOf(0, off + 24);
    if (end < 0) throw new AgentProtocolError("directory entry name without NUL");
    const name = buf.subarray(off + 24, end).toString("utf8");
    out.push({
      name,
      mode,
      size,
      mtimeMs: sec * 1000 + Math.floor(nsec / 1e6),
      isDir: (mode & S_IFMT) === S_IFDIR,
    });
    off = end + 1;
  }
  return out;
}

/**
 * Splits a byte stream into frames. Bounded: a frame claiming more than MAX_PAYLOAD or of a type
 * the peer may not send is a protocol error (the guest is untrusted). By default it reads what a
 * guest sends; `from: "host"` reads what a host sends (the exec relay serves host-side clients).
 */
export class FrameDecoder {
  /** The frame being assembled, allocated at its exact size once its header is known. */
  private partial: Buffer | undefined;
  private filled = 0;
  /** A header split across reads. */
  private readonly head = Buffer.alloc(HEADER_SIZE);
  private headFilled = 0;
  private readonly allowed: Set<number>;
  private readonly peer: string;

  constructor(from: "guest" | "host" = "guest") {
    this.allowed = from === "guest" ? GUEST_TYPES : HOST_TYPES;
    this.peer = from === "guest" ? "guest" : "client";
  }

  /** Bytes received and held for a frame not yet complete (at most one frame's worth). */
  get buffered(): number {
    return this.partial ? this.filled : this.headFilled;
  }

  /**
   * Whole frames in `data` are returned as views of it (no copy); a frame split across reads is
   * copied into one buffer of its size, so a frame trickled byte by byte costs its size, no more.
   */
  push(data: Buffer): Frame[] {
    const frames: Frame[] = [];
    let off = 0;
    while (off < data.length) {
      if (this.partial) {
        const n = Math.min(this.partial.length - this.filled, data.length - off);
        data.copy(this.partial, this.filled, off, off + n);
        this.filled += n;
        off += n;
        if (this.filled === this.partial.length) {
          frames.push(frameOf(this.partial));
          this.partial = undefined;
        }
      } else if (this.headFilled > 0 || data.length - off < HEADER_SIZE) {
        const n = Math.min(HEADER_SIZE - this.headFilled, data.length - off);
        data.copy(this.head, this.headFilled, off, off + n);
        this.headFilled += n;
        off += n;
        if (this.headFilled < HEADER_SIZE) break;
        this.headFilled = 0;
        this.startPartial(this.head, this.check(this.head), HEADER_SIZE, frames);
      } else {
        const len = this.check(data.subarray(off, off + HEADER_SIZE));
        const end = off + HEADER_SIZE + len;
        if (end <= data.length) {
          frames.push(frameOf(data.subarray(off, end)));
          off = end;
        } else {
          this.startPartial(data.subarray(off), len, data.length - off, frames);
          off = data.length;
        }
      }
    }
    return frames;
  }

  /** Validates a header; returns the payload length. The guest is untrusted: violations throw. */
  private check(head: Buffer): number {
    const len = head.readUInt32LE(0);
    const type = head.readUInt8(4);
    if (len > MAX_PAYLOAD) {
      throw new AgentProtocolError(`${this.peer} sent a frame of ${len} bytes (limit ${MAX_PAYLOAD})`);
    }
    if (!this.allowed.has(type)) {
      throw new AgentProtocolError(`${this.peer} sent unknown frame type 0x${type.toString(16)}`);
    }
    return len;
  }

  /** Begins assembling a frame of `len` payload bytes from its first `have` bytes in `start`. */
  private startPartial(start: Buffer, len: number, have: number, frames: Frame[]): void {
    const frame = Buffer.allocUnsafe(HEADER_SIZE + len);
    start.copy(frame, 0, 0, have);
    if (have === frame.length) frames.push(frameOf(frame));
    else {
      this.partial = frame;
      this.filled = have;
    }
  }
}

function frameOf(whole: Buffer): Frame {
  return { type: whole.readUInt8(4), stream: whole.readUInt32LE(5), payload: whole.subarray(HEADER_SIZE) };
}
