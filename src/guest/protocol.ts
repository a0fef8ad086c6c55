import { AgentProtocolError } from "../api/errors.ts";

/** Frame codec of the agent protocol (docs/agent-protocol.md). */

export const HEADER_SIZE = 9;
export const MAX_PAYLOAD = 1024 * 1024;
/** Bytes of STDIN the host sends ahead of the guest's acknowledgements, per stream. */
export const STDIN_WINDOW = 256 * 1024;

export const HostMsg = {
  EXEC: 0x01,
  STDIN: 0x02,
  RESIZE: 0x03,
  SIGNAL: 0x04,
  WRITE_FILE: 0x05,
  FILE_DATA: 0x06,
  READ_FILE: 0x07,
  LIST_DIR: 0x08,
  PING: 0x09,
  SHUTDOWN: 0x0a,
} as const;

export const GuestMsg = {
  READY: 0x80,
  STDOUT: 0x81,
  STDERR: 0x82,
  EXIT: 0x83,
  ERROR: 0x84,
  STARTED: 0x85,
  STDIN_ACK: 0x86,
  DATA: 0x87,
  RESULT: 0x88,
  PONG: 0x89,
  LOG: 0x8a,
} as const;

const GUEST_TYPES = new Set<number>(Object.values(GuestMsg));

export interface Frame {
  type: number;
  stream: number;
  payload: Buffer;
}

export const ExecFlags = { TTY: 1, STDIN: 2, MKDIR_CWD: 4 } as const;

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

function cstr(s: string, what: string): Buffer {
  if (s.includes("\0")) throw new AgentProtocolError(`${what} contains a NUL byte`);
  return Buffer.from(`${s}\0`, "utf8");
}

export function encodeExec(req: ExecRequest): Buffer {
  if (req.argv.length === 0) throw new RangeError("exec needs at least one argument");
  if (req.argv.length > 0xffff || req.env.length > 0xffff) throw new RangeError("too many arguments");
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
  if (payload.length > MAX_PAYLOAD) throw new RangeError("command line and environment exceed 1 MiB");
  return payload;
}

export function clampU16(n: number): number {
  return Math.max(1, Math.min(0xffff, Math.trunc(n)));
}

export function encodeResize(rows: number, cols: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt16LE(clampU16(rows), 0);
  b.writeUInt16LE(clampU16(cols), 2);
  return b;
}

export function encodeU32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0, 0);
  return b;
}

export function encodeWriteFile(path: string, mode: number): Buffer {
  return Buffer.concat([encodeU32(mode & 0o7777), cstr(path, "path")]);
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
 * the guest may not send is a protocol error (the guest is untrusted).
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;

  push(data: Buffer): Frame[] {
    this.chunks.push(data);
    this.buffered += data.length;
    const frames: Frame[] = [];
    while (this.buffered >= HEADER_SIZE) {
      const head = this.peek(HEADER_SIZE);
      const len = head.readUInt32LE(0);
      const type = head.readUInt8(4);
      if (len > MAX_PAYLOAD)
        throw new AgentProtocolError(`guest sent a frame of ${len} bytes (limit ${MAX_PAYLOAD})`);
      if (!GUEST_TYPES.has(type))
        throw new AgentProtocolError(`guest sent unknown frame type 0x${type.toString(16)}`);
      if (this.buffered < HEADER_SIZE + len) break;
      const whole = this.take(HEADER_SIZE + len);
      frames.push({ type, stream: whole.readUInt32LE(5), payload: whole.subarray(HEADER_SIZE) });
    }
    return frames;
  }

  private peek(n: number): Buffer {
    if ((this.chunks[0]?.length ?? 0) < n) this.chunks = [Buffer.concat(this.chunks)];
    return (this.chunks[0] as Buffer).subarray(0, n);
  }

  private take(n: number): Buffer {
    const first = this.chunks[0] as Buffer;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      const all = Buffer.concat(this.chunks);
      out = all.subarray(0, n);
      this.chunks = all.length > n ? [all.subarray(n)] : [];
    }
    this.buffered -= n;
    return out;
  }
}
