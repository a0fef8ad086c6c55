/**
 * The FUSE wire ABI (Linux `include/uapi/linux/fuse.h`, `man 4 fuse`): opcodes, INIT flags, the
 * layouts of the structs we read and write, and a bounds-checked reader. Everything is little-endian
 * (the guest and host are both x86-64 or both arm64; FUSE uses the host byte order and we only run
 * little-endian machines).
 *
 * Nothing here throws anything but `FuseDecodeError`, which the server turns into an error reply:
 * a malformed message from the (untrusted) guest never takes the server down.
 */

export const FUSE_KERNEL_VERSION = 7;
/** The newest 7.x minor whose message layouts this server knows; INIT answers min(kernel's, this). */
export const FUSE_MAX_MINOR = 31;
/** The oldest minor we accept: 7.12 gave fuse_create_in its umask and fuse_write_in its 40 bytes. */
export const FUSE_MIN_MINOR = 12;

export const FUSE_ROOT_ID = 1n;

export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  GETLK: 31,
  SETLK: 32,
  SETLKW: 33,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  BMAP: 37,
  DESTROY: 38,
  IOCTL: 39,
  POLL: 40,
  NOTIFY_REPLY: 41,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  READDIRPLUS: 44,
  RENAME2: 45,
  LSEEK: 46,
  COPY_FILE_RANGE: 47,
  SYNCFS: 50,
  TMPFILE: 51,
  STATX: 52,
} as const;

/** INIT flags (fuse_init_in.flags / fuse_init_out.flags). */
export const Init = {
  ASYNC_READ: 1 << 0,
  POSIX_LOCKS: 1 << 1,
  FILE_OPS: 1 << 2,
  ATOMIC_O_TRUNC: 1 << 3,
  EXPORT_SUPPORT: 1 << 4,
  BIG_WRITES: 1 << 5,
  DONT_MASK: 1 << 6,
  SPLICE_WRITE: 1 << 7,
  SPLICE_MOVE: 1 << 8,
  SPLICE_READ: 1 << 9,
  FLOCK_LOCKS: 1 << 10,
  HAS_IOCTL_DIR: 1 << 11,
  AUTO_INVAL_DATA: 1 << 12,
  DO_READDIRPLUS: 1 << 13,
  READDIRPLUS_AUTO: 1 << 14,
  ASYNC_DIO: 1 << 15,
  WRITEBACK_CACHE: 1 << 16,
  NO_OPEN_SUPPORT: 1 << 17,
  PARALLEL_DIROPS: 1 << 18,
  HANDLE_KILLPRIV: 1 << 19,
  POSIX_ACL: 1 << 20,
  ABORT_ERROR: 1 << 21,
  MAX_PAGES: 1 << 22,
  CACHE_SYMLINKS: 1 << 23,
  NO_OPENDIR_SUPPORT: 1 << 24,
  EXPLICIT_INVAL_DATA: 1 << 25,
  MAP_ALIGNMENT: 1 << 26,
  SUBMOUNTS: 1 << 27,
  HANDLE_KILLPRIV_V2: 1 << 28,
  SETXATTR_EXT: 1 << 29,
  INIT_EXT: 1 << 30,
} as const;

/** fuse_setattr_in.valid bits. */
export const Fattr = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
  ATIME: 1 << 4,
  MTIME: 1 << 5,
  FH: 1 << 6,
  ATIME_NOW: 1 << 7,
  MTIME_NOW: 1 << 8,
  LOCKOWNER: 1 << 9,
  CTIME: 1 << 10,
  KILL_SUIDGID: 1 << 11,
} as const;

export const FUSE_GETATTR_FH = 1;
/** fuse_open_out.open_flags */
export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_KEEP_CACHE = 1 << 1;
export const FOPEN_NONSEEKABLE = 1 << 2;
/** renameat2 flags */
export const RENAME_NOREPLACE = 1;
export const RENAME_EXCHANGE = 2;
export const RENAME_WHITEOUT = 4;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
export const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
export const ATTR_OUT_SIZE = 16 + ATTR_SIZE;
export const DIRENT_HEADER_SIZE = 24;
export const INIT_OUT_SIZE = 64;
export const KSTATFS_SIZE = 80;

/** The longest name component Linux allows (NAME_MAX); longer ones are refused before any provider sees them. */
export const NAME_MAX = 255;
/** The longest symlink target we store or return (PATH_MAX). */
export const PATH_MAX = 4096;
export const XATTR_NAME_MAX = 255;
export const XATTR_SIZE_MAX = 65536;

export class FuseDecodeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "FuseDecodeError";
  }
}

export interface InHeader {
  len: number;
  opcode: number;
  unique: bigint;
  nodeid: bigint;
  uid: number;
  gid: number;
  pid: number;
  totalExtlen: number;
}

/** A cursor over one message's bytes; every read checks the bounds and throws FuseDecodeError past the end. */
export class Reader {
  private pos: number;
  private readonly buf: Buffer;
  private readonly end: number;
  constructor(buf: Buffer, start = 0, end = buf.length) {
    this.buf = buf;
    this.pos = start;
    this.end = end;
  }

  get remaining(): number {
    return this.end - this.pos;
  }

  private need(n: number): number {
    if (n < 0 || this.pos + n > this.end) {
      throw new FuseDecodeError(
        `truncated message: need ${n} bytes at ${this.pos}, have ${this.end - this.pos}`,
      );
    }
    const at = this.pos;
    this.pos += n;
    return at;
  }

  u16(): number {
    return this.buf.readUInt16LE(this.need(2));
  }
  u32(): number {
    return this.buf.readUInt32LE(this.need(4));
  }
  i32(): number {
    return this.buf.readInt32LE(this.need(4));
  }
  u64(): bigint {
    return this.buf.readBigUInt64LE(this.need(8));
  }
  /** A u64 that must fit a JS number exactly (offsets, sizes); larger is a decode error. */
  u64n(): number {
    const v = this.u64();
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FuseDecodeError(`value ${v} too large`);
    return Number(v);
  }
  skip(n: number): void {
    this.need(n);
  }
  bytes(n: number): Buffer {
    const at = this.need(n);
    return this.buf.subarray(at, at + n);
  }
  rest(): Buffer {
    return this.bytes(this.remaining);
  }
  /** The raw bytes of a NUL-terminated string (the NUL consumed, not returned); max bounds its length. */
  cbytes(max: number): Buffer {
    const nul = this.buf.indexOf(0, this.pos);
    if (nul < 0 || nul >= this.end) throw new FuseDecodeError("unterminated string");
    if (nul - this.pos > max) throw new FuseDecodeError("string too long");
    const s = this.buf.subarray(this.pos, nul);
    this.pos = nul + 1;
    return s;
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Bytes as UTF-8 text, or undefined when they are not valid UTF-8 (names must be, see docs/vfs.md). */
export function decodeUtf8(b: Uint8Array): string | undefined {
  try {
    return utf8.decode(b);
  } catch {
    return undefined;
  }
}

/**
 * A directory-entry name from the guest: 1..NAME_MAX bytes, valid UTF-8, no '/', not "." or "..".
 * Returns the errno to answer otherwise.
 */
export function checkName(raw: Buffer): { name: string } | { errno: "EINVAL" | "ENAMETOOLONG" } {
  if (raw.length > NAME_MAX) return { errno: "ENAMETOOLONG" };
  const name = decodeUtf8(raw);
  if (name === undefined || name === "" || name === "." || name === ".." || name.includes("/")) {
    return { errno: "EINVAL" };
  }
  return { name };
}

/**
 * The header of a request. The message must hold at least the header and its `len` must equal the
 * message length (the transports deliver exactly one message); otherwise FuseDecodeError.
 */
export function readInHeader(msg: Buffer): InHeader {
  if (msg.length < IN_HEADER_SIZE) throw new FuseDecodeError(`message of ${msg.length} bytes has no header`);
  const r = new Reader(msg, 0, IN_HEADER_SIZE);
  const h: InHeader = {
    len: r.u32(),
    opcode: r.u32(),
    unique: r.u64(),
    nodeid: r.u64(),
    uid: r.u32(),
    gid: r.u32(),
    pid: r.u32(),
    totalExtlen: r.u16(),
  };
  if (h.len !== msg.length)
    throw new FuseDecodeError(`header says ${h.len} bytes, message has ${msg.length}`);
  return h;
}

/** The request's body: after the header, before the extensions (total_extlen counts 8-byte units). */
export function bodyReader(msg: Buffer, h: InHeader): Reader {
  const end = msg.length - h.totalExtlen * 8;
  if (end < IN_HEADER_SIZE) throw new FuseDecodeError("extensions longer than the message");
  return new Reader(msg, IN_HEADER_SIZE, end);
}

/** unique of a message too broken to decode, when at least that much is there (to answer it with an error). */
export function peekUnique(msg: Buffer): bigint | undefined {
  return msg.length >= 16 ? msg.readBigUInt64LE(8) : undefined;
}

export function outMessage(unique: bigint, error: number, payload?: Buffer | Buffer[]): Buffer {
  const parts = payload === undefined ? [] : Array.isArray(payload) ? payload : [payload];
  let len = OUT_HEADER_SIZE;
  for (const p of parts) len += p.length;
  const out = Buffer.allocUnsafe(len);
  out.writeUInt32LE(len, 0);
  out.writeInt32LE(error, 4);
  out.writeBigUInt64LE(unique, 8);
  let at = OUT_HEADER_SIZE;
  for (const p of parts) {
    p.copy(out, at);
    at += p.length;
  }
  return out;
}

/** The attributes the wire carries (struct fuse_attr). Times are seconds + nanoseconds. */
export interface Attr {
  ino: bigint;
  size: number;
  blocks: number;
  atime: Timespec;
  mtime: Timespec;
  ctime: Timespec;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  blksize: number;
}

export interface Timespec {
  sec: number;
  nsec: number;
}

function writeSec(buf: Buffer, v: number, at: number): void {
  buf.writeBigInt64LE(BigInt(Math.trunc(v)), at);
}

export function writeAttr(buf: Buffer, at: number, a: Attr): void {
  buf.writeBigUInt64LE(BigInt.asUintN(64, a.ino), at);
  buf.writeBigUInt64LE(BigInt(Math.max(0, a.size)), at + 8);
  buf.writeBigUInt64LE(BigInt(Math.max(0, a.blocks)), at + 16);
  writeSec(buf, a.atime.sec, at + 24);
  writeSec(buf, a.mtime.sec, at + 32);
  writeSec(buf, a.ctime.sec, at + 40);
  buf.writeUInt32LE(a.atime.nsec >>> 0, at + 48);
  buf.writeUInt32LE(a.mtime.nsec >>> 0, at + 52);
  buf.writeUInt32LE(a.ctime.nsec >>> 0, at + 56);
  buf.writeUInt32LE(a.mode >>> 0, at + 60);
  buf.writeUInt32LE(a.nlink >>> 0, at + 64);
  buf.writeUInt32LE(a.uid >>> 0, at + 68);
  buf.writeUInt32LE(a.gid >>> 0, at + 72);
  buf.writeUInt32LE(a.rdev >>> 0, at + 76);
  buf.writeUInt32LE(a.blksize >>> 0, at + 80);
  buf.writeUInt32LE(0, at + 84); // flags
}

/** Seconds + nanoseconds of a timeout in seconds (entry_valid/attr_valid). */
export function splitTimeout(seconds: number): { sec: bigint; nsec: number } {
  const sec = Math.floor(seconds);
  return { sec: BigInt(sec), nsec: Math.round((seconds - sec) * 1e9) };
}

/** struct fuse_entry_out */
export function entryOut(
  nodeid: bigint,
  generation: bigint,
  attr: Attr,
  entryTtl: number,
  attrTtl: number,
): Buffer {
  const b = Buffer.alloc(ENTRY_OUT_SIZE);
  writeEntryOut(b, 0, nodeid, generation, attr, entryTtl, attrTtl);
  return b;
}

export function writeEntryOut(
  b: Buffer,
  at: number,
  nodeid: bigint,
  generation: bigint,
  attr: Attr,
  entryTtl: number,
  attrTtl: number,
): void {
  const e = splitTimeout(entryTtl);
  const a = splitTimeout(attrTtl);
  b.writeBigUInt64LE(nodeid, at);
  b.writeBigUInt64LE(generation, at + 8);
  b.writeBigUInt64LE(e.sec, at + 16);
  b.writeBigUInt64LE(a.sec, at + 24);
  b.writeUInt32LE(e.nsec, at + 32);
  b.writeUInt32LE(a.nsec, at + 36);
  writeAttr(b, at + 40, attr);
}

/** struct fuse_attr_out */
export function attrOut(attr: Attr, attrTtl: number): Buffer {
  const b = Buffer.alloc(ATTR_OUT_SIZE);
  const a = splitTimeout(attrTtl);
  b.writeBigUInt64LE(a.sec, 0);
  b.writeUInt32LE(a.nsec, 8);
  writeAttr(b, 16, attr);
  return b;
}

/** struct fuse_open_out */
export function openOut(fh: bigint, openFlags: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64LE(fh, 0);
  b.writeUInt32LE(openFlags, 8);
  return b;
}

export function u32Out(v: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(v >>> 0, 0);
  return b;
}

export function u64Out(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, v), 0);
  return b;
}

export interface StatFs {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

/** struct fuse_statfs_out (= struct fuse_kstatfs) */
export function statfsOut(s: StatFs): Buffer {
  const b = Buffer.alloc(KSTATFS_SIZE);
  const u64 = (v: number, at: number) => b.writeBigUInt64LE(BigInt(Math.max(0, Math.trunc(v))), at);
  u64(s.blocks, 0);
  u64(s.bfree, 8);
  u64(s.bavail, 16);
  u64(s.files, 24);
  u64(s.ffree, 32);
  b.writeUInt32LE(s.bsize >>> 0, 40);
  b.writeUInt32LE(s.namelen >>> 0, 44);
  b.writeUInt32LE(s.frsize >>> 0, 48);
  return b;
}

/** Size of one fuse_dirent (name padded to 8 bytes). */
export function direntSize(nameLen: number): number {
  return (DIRENT_HEADER_SIZE + nameLen + 7) & ~7;
}

export function writeDirent(
  b: Buffer,
  at: number,
  ino: bigint,
  off: bigint,
  type: number,
  name: Buffer,
): number {
  const size = direntSize(name.length);
  b.writeBigUInt64LE(BigInt.asUintN(64, ino), at);
  b.writeBigUInt64LE(off, at + 8);
  b.writeUInt32LE(name.length, at + 16);
  b.writeUInt32LE(type, at + 20);
  name.copy(b, at + 24);
  b.fill(0, at + 24 + name.length, at + size);
  return size;
}

/** The DT_* type of a mode (fuse_dirent.type). */
export function direntType(mode: number): number {
  return (mode & 0o170000) >>> 12;
}

export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFIFO = 0o010000;
export const S_IFSOCK = 0o140000;
export const S_IFCHR = 0o020000;
export const S_IFBLK = 0o060000;

/** The INIT request's fields (fuse_init_in). flags2 only when the kernel set INIT_EXT. */
export interface InitIn {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
}

export function readInitIn(r: Reader): InitIn {
  const major = r.u32();
  const minor = r.u32();
  // Kernels before 7.6 sent only major+minor; we refuse those anyway.
  const maxReadahead = r.remaining >= 4 ? r.u32() : 0;
  const flags = r.remaining >= 4 ? r.u32() : 0;
  return { major, minor, maxReadahead, flags };
}

export interface InitOut {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  timeGran: number;
  maxPages: number;
}

export function initOut(o: InitOut): Buffer {
  const b = Buffer.alloc(INIT_OUT_SIZE);
  b.writeUInt32LE(o.major, 0);
  b.writeUInt32LE(o.minor, 4);
  b.writeUInt32LE(o.maxReadahead, 8);
  b.writeUInt32LE(o.flags >>> 0, 12);
  b.writeUInt16LE(o.maxBackground, 16);
  b.writeUInt16LE(o.congestionThreshold, 18);
  b.writeUInt32LE(o.maxWrite, 20);
  b.writeUInt32LE(o.timeGran, 24);
  b.writeUInt16LE(o.maxPages, 28);
  return b;
}

/** Notification codes (fuse_out_header.error of a message with unique 0, server → kernel). */
export const Notify = {
  INVAL_INODE: 2,
  INVAL_ENTRY: 3,
} as const;

/** FUSE_NOTIFY_INVAL_INODE: drop the attributes and cached pages [off, off+len) of a node (len 0: to the end). */
export function notifyInvalInode(nodeid: bigint, off = 0n, len = 0n): Buffer {
  const b = Buffer.alloc(24);
  b.writeBigUInt64LE(nodeid, 0);
  b.writeBigInt64LE(off, 8);
  b.writeBigInt64LE(len, 16);
  return outMessage(0n, Notify.INVAL_INODE, b);
}

/** FUSE_NOTIFY_INVAL_ENTRY: drop the cached name → node answer (or its absence) of parent/name. */
export function notifyInvalEntry(parent: bigint, name: Buffer): Buffer {
  const b = Buffer.alloc(16 + name.length + 1);
  b.writeBigUInt64LE(parent, 0);
  b.writeUInt32LE(name.length, 8);
  name.copy(b, 16);
  return outMessage(0n, Notify.INVAL_ENTRY, b);
}
