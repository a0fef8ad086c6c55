import { constants } from "node:os";
import type { Attr, StatFs } from "./fuse-abi.ts";

/**
 * What a file system behind the FUSE server must do. Paths are absolute inside the provider
 * ("/" is its root, components joined by "/", each a checked name: never "", "." or ".."). Every
 * operation is lstat-like: a provider never follows a symlink on its own (the guest kernel resolves
 * symlinks itself, with READLINK then LOOKUPs). Failures are FsError (or a Node error with an errno
 * `code`); the server turns both into the errno the guest sees.
 */

export type { Attr, StatFs, Timespec } from "./fuse-abi.ts";

/** Who asks (the guest process's uid/gid/pid from the request header). */
export interface Caller {
  uid: number;
  gid: number;
  pid: number;
}

/** A time to set: a value, or "now" (UTIME_NOW). */
export type TimeSet = { sec: number; nsec: number } | "now";

export interface SetAttr {
  mode?: number;
  uid?: number;
  gid?: number;
  size?: number;
  atime?: TimeSet;
  mtime?: TimeSet;
}

export interface DirEntry {
  name: string;
  /** S_IF* bits of the entry (0 when unknown). */
  type: number;
  ino?: bigint;
}

/**
 * An open file. The server keeps it in its handle table between OPEN/CREATE and RELEASE. No flush:
 * writes reach the provider at once, so close(2) has nothing left to report (the server answers
 * FLUSH with ENOSYS, which makes the kernel stop sending it).
 */
export interface FileHandle {
  read(offset: number, length: number): Promise<Buffer>;
  /** Returns the number of bytes written. */
  write(offset: number, data: Buffer): Promise<number>;
  getattr(): Promise<Attr>;
  truncate(size: number): Promise<void>;
  fsync(datasync: boolean): Promise<void>;
  release(): Promise<void>;
  /** fallocate(2); providers that cannot answer EOPNOTSUPP. */
  allocate(mode: number, offset: number, length: number): Promise<void>;
  /** lseek(2) for SEEK_DATA (3) / SEEK_HOLE (4). */
  seek(offset: number, whence: number): Promise<number>;
}

export interface Provider {
  getattr(path: string): Promise<Attr>;
  setattr(path: string, set: SetAttr, caller: Caller): Promise<void>;
  readlink(path: string): Promise<string>;
  readdir(path: string): Promise<DirEntry[]>;
  /** flags: the open(2) flags the guest passed (O_ACCMODE, O_APPEND, O_TRUNC...). */
  open(path: string, flags: number): Promise<FileHandle>;
  /** Creates a regular file (O_EXCL honoured) and opens it. */
  create(path: string, flags: number, mode: number, caller: Caller): Promise<FileHandle>;
  mkdir(path: string, mode: number, caller: Caller): Promise<void>;
  mknod(path: string, mode: number, rdev: number, caller: Caller): Promise<void>;
  symlink(target: string, path: string, caller: Caller): Promise<void>;
  link(oldPath: string, newPath: string): Promise<void>;
  unlink(path: string): Promise<void>;
  rmdir(path: string): Promise<void>;
  /** flags: RENAME_NOREPLACE | RENAME_EXCHANGE (renameat2). */
  rename(oldPath: string, newPath: string, flags: number): Promise<void>;
  statfs(path: string): Promise<StatFs>;
  getxattr(path: string, name: string): Promise<Buffer>;
  /** flags: XATTR_CREATE (1) | XATTR_REPLACE (2). */
  setxattr(path: string, name: string, value: Buffer, flags: number): Promise<void>;
  listxattr(path: string): Promise<string[]>;
  removexattr(path: string, name: string): Promise<void>;
  /** Makes a directory's entries durable (fsync of the directory), when the provider has a disk. */
  fsyncdir?(path: string): Promise<void>;
  /** Frees what the provider holds (fds); the server calls it on DESTROY / close. */
  close?(): Promise<void>;
}

export type Errno = keyof typeof constants.errno;

/** A file-system error carrying the errno name the guest gets ("ENOENT", "EROFS"...). */
export class FsError extends Error {
  readonly code: Errno;
  constructor(code: Errno, message?: string) {
    super(message === undefined ? code : `${code}: ${message}`);
    this.name = "FsError";
    this.code = code;
  }
}

export const XATTR_CREATE = 1;
export const XATTR_REPLACE = 2;

/** The errno number to answer for any thrown value; unknown errors are EIO. */
export function errnoOf(e: unknown): number {
  const code = (e as { code?: unknown } | null)?.code;
  if (typeof code === "string") {
    const n = (constants.errno as Record<string, number>)[code];
    if (typeof n === "number") return n;
  }
  return constants.errno.EIO;
}

/** Joins a provider path and one checked name. */
export function joinPath(dir: string, name: string): string {
  return dir === "/" ? `/${name}` : `${dir}/${name}`;
}

/** Parent directory and last name of a provider path ("/" has no parent). */
export function splitPath(path: string): { dir: string; name: string } {
  const i = path.lastIndexOf("/");
  return { dir: i <= 0 ? "/" : path.slice(0, i), name: path.slice(i + 1) };
}

/** The components of a provider path ("/" → []). */
export function components(path: string): string[] {
  return path === "/" ? [] : path.slice(1).split("/");
}

/**
 * Checks a provider path coming from outside the server (tests, the SDK's file API): absolute, no
 * empty, "." or ".." component, no NUL. The server builds paths from checked names only.
 */
export function checkPath(path: string): string {
  if (path === "/") return path;
  if (!path.startsWith("/") || path.includes("\0"))
    throw new FsError("EINVAL", `bad path ${JSON.stringify(path)}`);
  for (const c of components(path)) {
    if (c === "" || c === "." || c === "..") throw new FsError("EINVAL", `bad path ${JSON.stringify(path)}`);
  }
  return path;
}

export function nowTimespec(): { sec: number; nsec: number } {
  const ms = Date.now();
  return { sec: Math.floor(ms / 1000), nsec: (ms % 1000) * 1e6 };
}

/** The renameat2 flags a provider accepts: RENAME_NOREPLACE | RENAME_EXCHANGE. */
export const RENAME_FLAGS = 1 | 2;
