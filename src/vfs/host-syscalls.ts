import { constants } from "node:os";
import { loadLibc } from "../host/libc.ts";
import type { Attr } from "./fuse-abi.ts";
import { type Errno, FsError } from "./provider.ts";

/**
 * The *at system calls the host_fs provider needs and Node does not expose (openat2, statx with
 * AT_SYMLINK_NOFOLLOW on a directory fd, mkdirat, renameat2, linkat, utimensat...), through koffi
 * (the project's FFI: maintained, prebuilt binaries from npm, already used by src/net/original-dst.ts).
 *
 * Calls are synchronous: each is one short system call on a name in an already-open directory. Bulk
 * data (read/write/fsync of file contents) goes through Node's asynchronous fs on the returned fds.
 * Every failure throws FsError with the errno's name.
 */

export const AT_FDCWD = -100;
export const AT_SYMLINK_NOFOLLOW = 0x100;
export const AT_REMOVEDIR = 0x200;
export const AT_EMPTY_PATH = 0x1000;

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_ACCMODE = 3;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_NOCTTY = 0o400;
export const O_TRUNC = 0o1000;
export const O_APPEND = 0o2000;
export const O_NONBLOCK = 0o4000;
export const O_DSYNC = 0o10000;
export const O_SYNC = 0o4010000;
export const O_DIRECTORY = 0o200000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
export const O_PATH = 0o10000000;

export const RESOLVE_NO_XDEV = 0x01;
export const RESOLVE_NO_MAGICLINKS = 0x02;
export const RESOLVE_NO_SYMLINKS = 0x04;
export const RESOLVE_BENEATH = 0x08;

/** Resolution used for every host path: below the root, no symlink anywhere, no /proc magic links. */
export const RESOLVE_CONTAINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;

export const UTIME_NOW = (1 << 30) - 1;
export const UTIME_OMIT = (1 << 30) - 2;

const SYS_openat2 = 437; // same number on x86-64 and arm64 (new syscalls share the table)
const STATX_BASIC_STATS = 0x7ff;
const STATX_SIZE = 256;

type Fn = (...args: unknown[]) => unknown;

interface Lib {
  syscall4: Fn;
  statx: Fn;
  mkdirat: Fn;
  mknodat: Fn;
  unlinkat: Fn;
  renameat2: Fn;
  symlinkat: Fn;
  readlinkat: Fn;
  linkat: Fn;
  fchownat: Fn;
  fchmodat: Fn;
  utimensat: Fn;
  fallocate: Fn;
  lseek: Fn;
  close: Fn;
  getxattr: Fn;
  setxattr: Fn;
  listxattr: Fn;
  removexattr: Fn;
  getdents64: Fn;
  errno: () => number;
}

let lib: Lib | undefined;

function load(): Lib {
  if (lib) return lib;
  const c = loadLibc();
  lib = {
    syscall4: c.func("long syscall(long nr, int dirfd, const char *path, void *how, size_t size)"),
    statx: c.func("int statx(int dirfd, const char *path, int flags, unsigned int mask, void *buf)"),
    mkdirat: c.func("int mkdirat(int dirfd, const char *path, uint32_t mode)"),
    mknodat: c.func("int mknodat(int dirfd, const char *path, uint32_t mode, uint64_t dev)"),
    unlinkat: c.func("int unlinkat(int dirfd, const char *path, int flags)"),
    renameat2: c.func(
      "int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags)",
    ),
    symlinkat: c.func("int symlinkat(const char *target, int dirfd, const char *path)"),
    readlinkat: c.func("intptr_t readlinkat(int dirfd, const char *path, void *buf, size_t size)"),
    linkat: c.func(
      "int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags)",
    ),
    fchownat: c.func("int fchownat(int dirfd, const char *path, uint32_t uid, uint32_t gid, int flags)"),
    fchmodat: c.func("int fchmodat(int dirfd, const char *path, uint32_t mode, int flags)"),
    utimensat: c.func("int utimensat(int dirfd, const char *path, void *times, int flags)"),
    fallocate: c.func("int fallocate(int fd, int mode, int64_t offset, int64_t len)"),
    lseek: c.func("int64_t lseek(int fd, int64_t offset, int whence)"),
    close: c.func("int close(int fd)"),
    getxattr: c.func("intptr_t getxattr(const char *path, const char *name, void *value, size_t size)"),
    setxattr: c.func("int setxattr(const char *path, const char *name, void *value, size_t size, int flags)"),
    listxattr: c.func("intptr_t listxattr(const char *path, void *list, size_t size)"),
    removexattr: c.func("int removexattr(const char *path, const char *name)"),
    getdents64: c.func("intptr_t getdents64(int fd, void *buf, size_t count)"),
    errno: c.errno,
  };
  return lib;
}

/** True when openat2(2) with RESOLVE_BENEATH works here (Linux ≥ 5.6, not blocked by seccomp). */
export function openat2Available(): boolean {
  try {
    const fd = openat2(AT_FDCWD, "/", O_PATH | O_CLOEXEC, 0, 0);
    close(fd);
    return true;
  } catch {
    return false;
  }
}

const errnoNames = new Map<number, Errno>();
for (const [name, n] of Object.entries(constants.errno)) {
  if (!errnoNames.has(n)) errnoNames.set(n, name as Errno);
}

function check(ret: unknown, what: string): number {
  const n = typeof ret === "bigint" ? Number(ret) : (ret as number);
  if (n < 0) {
    const errno = load().errno();
    throw new FsError(errnoNames.get(errno) ?? "EIO", what);
  }
  return n;
}

export function openat2(dirfd: number, path: string, flags: number, mode: number, resolve: number): number {
  const how = Buffer.alloc(24);
  how.writeBigUInt64LE(BigInt(flags), 0);
  how.writeBigUInt64LE(BigInt(mode), 8);
  how.writeBigUInt64LE(BigInt(resolve), 16);
  return check(load().syscall4(SYS_openat2, dirfd, path, how, 24), `openat2 ${path}`);
}

export function close(fd: number): void {
  load().close(fd);
}

function readTs(b: Buffer, at: number): { sec: number; nsec: number } {
  return { sec: Number(b.readBigInt64LE(at)), nsec: b.readUInt32LE(at + 8) };
}

/** statx(2) into our Attr (never follows a final symlink). */
export function statx(dirfd: number, path: string, flags = AT_SYMLINK_NOFOLLOW): Attr {
  const b = Buffer.alloc(STATX_SIZE);
  check(load().statx(dirfd, path, flags | AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS, b), `statx ${path}`);
  const size = Number(b.readBigUInt64LE(40));
  return {
    ino: b.readBigUInt64LE(32),
    size,
    blocks: Number(b.readBigUInt64LE(48)),
    atime: readTs(b, 64),
    mtime: readTs(b, 112),
    ctime: readTs(b, 96),
    mode: b.readUInt16LE(28),
    nlink: b.readUInt32LE(16),
    uid: b.readUInt32LE(20),
    gid: b.readUInt32LE(24),
    rdev:
      ((b.readUInt32LE(128) & 0xfff) << 8) |
      (b.readUInt32LE(132) & 0xff) |
      ((b.readUInt32LE(132) & ~0xff) << 12),
    blksize: b.readUInt32LE(4),
  };
}

export function mkdirat(dirfd: number, name: string, mode: number): void {
  check(load().mkdirat(dirfd, name, mode), `mkdirat ${name}`);
}

export function mknodat(dirfd: number, name: string, mode: number, dev: number): void {
  check(load().mknodat(dirfd, name, mode, dev), `mknodat ${name}`);
}

export function unlinkat(dirfd: number, name: string, flags: number): void {
  check(load().unlinkat(dirfd, name, flags), `unlinkat ${name}`);
}

export function renameat2(
  oldfd: number,
  oldName: string,
  newfd: number,
  newName: string,
  flags: number,
): void {
  check(load().renameat2(oldfd, oldName, newfd, newName, flags), `renameat2 ${oldName} ${newName}`);
}

export function symlinkat(target: string, dirfd: number, name: string): void {
  check(load().symlinkat(target, dirfd, name), `symlinkat ${name}`);
}

export function readlinkat(dirfd: number, name: string): Buffer {
  const b = Buffer.alloc(4097);
  const n = check(load().readlinkat(dirfd, name, b, b.length), `readlinkat ${name}`);
  if (n >= b.length) throw new FsError("ENAMETOOLONG", `readlinkat ${name}`);
  return b.subarray(0, n);
}

export function linkat(oldfd: number, oldName: string, newfd: number, newName: string, flags: number): void {
  check(load().linkat(oldfd, oldName, newfd, newName, flags), `linkat ${oldName} ${newName}`);
}

export function fchownat(dirfd: number, name: string, uid: number, gid: number, flags: number): void {
  check(load().fchownat(dirfd, name, uid >>> 0, gid >>> 0, flags), `fchownat ${name}`);
}

export function fchmodat(dirfd: number, name: string, mode: number): void {
  check(load().fchmodat(dirfd, name, mode, 0), `fchmodat ${name}`);
}

/** utimensat(2); a side left undefined is UTIME_OMIT, "now" is UTIME_NOW. */
export function utimensat(
  dirfd: number,
  name: string,
  atime: { sec: number; nsec: number } | "now" | undefined,
  mtime: { sec: number; nsec: number } | "now" | undefined,
  flags: number,
): void {
  const ts = Buffer.alloc(32);
  const put = (t: typeof atime, at: number) => {
    if (t === undefined) ts.writeBigInt64LE(BigInt(UTIME_OMIT), at + 8);
    else if (t === "now") ts.writeBigInt64LE(BigInt(UTIME_NOW), at + 8);
    else {
      ts.writeBigInt64LE(BigInt(t.sec), at);
      ts.writeBigInt64LE(BigInt(t.nsec), at + 8);
    }
  };
  put(atime, 0);
  put(mtime, 16);
  check(load().utimensat(dirfd, name, ts, flags), `utimensat ${name}`);
}

export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  check(load().fallocate(fd, mode, offset, length), "fallocate");
}

export function lseek(fd: number, offset: number, whence: number): number {
  return check(load().lseek(fd, offset, whence), "lseek");
}

/** The magic /proc path of an fd: operating on it reaches exactly the file the fd holds. */
export function fdPath(fd: number): string {
  return `/proc/self/fd/${fd}`;
}

export function getxattr(path: string, name: string): Buffer {
  const l = load();
  for (let attempt = 0; attempt < 4; attempt++) {
    const size = check(l.getxattr(path, name, null, 0), `getxattr ${name}`);
    const b = Buffer.alloc(size);
    const ret = l.getxattr(path, name, b, size) as number;
    if (ret >= 0) return b.subarray(0, ret);
    if (l.errno() !== constants.errno.ERANGE) check(ret, `getxattr ${name}`);
  }
  throw new FsError("EIO", `getxattr ${name}: value keeps changing size`);
}

export function setxattr(path: string, name: string, value: Buffer, flags: number): void {
  check(load().setxattr(path, name, value, value.length, flags), `setxattr ${name}`);
}

export function listxattr(path: string): string[] {
  const l = load();
  for (let attempt = 0; attempt < 4; attempt++) {
    const size = check(l.listxattr(path, null, 0), "listxattr");
    if (size === 0) return [];
    const b = Buffer.alloc(size);
    const ret = l.listxattr(path, b, size) as number;
    if (ret >= 0) {
      return b
        .subarray(0, ret)
        .toString()
        .split("\0")
        .filter((s) => s !== "");
    }
    if (l.errno() !== constants.errno.ERANGE) check(ret, "listxattr");
  }
  throw new FsError("EIO", "listxattr: list keeps changing size");
}

export function removexattr(path: string, name: string): void {
  check(load().removexattr(path, name), `removexattr ${name}`);
}

export interface RawDirent {
  ino: bigint;
  /** DT_* type (S_IF* >> 12), 0 when the file system does not say. */
  type: number;
  name: Buffer;
}

/** Every entry of an open directory fd except "." and "..", read with getdents64(2). */
export function readdirFd(fd: number, maxEntries = 1_000_000): RawDirent[] {
  const l = load();
  const buf = Buffer.alloc(64 * 1024);
  const out: RawDirent[] = [];
  for (;;) {
    const n = check(l.getdents64(fd, buf, buf.length), "getdents64");
    if (n === 0) return out;
    for (let at = 0; at < n; ) {
      const reclen = buf.readUInt16LE(at + 16);
      if (reclen < 20 || at + reclen > n) throw new FsError("EIO", "getdents64: bad record");
      const nameStart = at + 19;
      const nul = buf.indexOf(0, nameStart);
      const name = Buffer.from(buf.subarray(nameStart, nul < 0 || nul > at + reclen ? at + reclen : nul));
      const dot = name.length === 1 && name[0] === 0x2e;
      const dotdot = name.length === 2 && name[0] === 0x2e && name[1] === 0x2e;
      if (!dot && !dotdot) {
        if (out.length >= maxEntries) throw new FsError("EFBIG", "directory has too many entries");
        out.push({ ino: buf.readBigUInt64LE(at), type: buf.readUInt8(at + 18), name });
      }
      at += reclen;
    }
  }
}
