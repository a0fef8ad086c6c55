import { fdatasync, fstatSync, fsync, ftruncate, openSync, read, statfs, write } from "node:fs";
import { promisify } from "node:util";
import { type Attr, decodeUtf8, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK } from "./fuse-abi.ts";
import * as sys from "./host-syscalls.ts";
import {
  type Caller,
  type DirEntry,
  type FileHandle,
  FsError,
  type Provider,
  RENAME_FLAGS,
  type SetAttr,
  type StatFs,
  splitPath,
} from "./provider.ts";

/**
 * A live, read-write view of a host folder (Matchlock's `host_fs` mount).
 *
 * Containment (docs/vfs.md): the provider holds an O_PATH fd on the root and reaches every path with
 * openat2(root, path, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS), so no symlink
 * is followed anywhere (the guest kernel resolves the guest's symlinks itself, one LOOKUP at a time)
 * and no `..` or absolute path climbs out. Operations on the last component go through the *at calls
 * on that parent fd with AT_SYMLINK_NOFOLLOW (or on an fd from openat2 with the same resolution), so
 * a component swapped for a symlink between two calls fails with ELOOP instead of being followed.
 *
 * Policy on what the guest may create on the host (the server runs as root): no set-uid bits, no
 * set-gid on files, no device nodes, extended attributes in the `user.` namespace only. When the
 * server runs as root, new files belong to the calling guest uid/gid (as virtiofsd does).
 */

const pread = promisify(read);
const pwrite = promisify(write);
const pfsync = promisify(fsync);
const pfdatasync = promisify(fdatasync);
const pftruncate = promisify(ftruncate);
const pstatfs = promisify(statfs);

const OPEN_PASS = sys.O_ACCMODE | sys.O_APPEND | sys.O_TRUNC | sys.O_DSYNC | sys.O_SYNC;
/** Flags every host open gets: no fd leak to children, no controlling tty, never block on a FIFO. */
const OPEN_ALWAYS = sys.O_CLOEXEC | sys.O_NOFOLLOW | sys.O_NOCTTY | sys.O_NONBLOCK;

export interface HostFsOptions {
  /** Refuse every change with EROFS (Matchlock's `readonly`). Prefer wrapping in ReadOnlyProvider. */
  readOnly?: boolean;
  /** Give new files the caller's uid/gid (default: when the process runs as root). */
  chownToCaller?: boolean;
  /** Where host errors are reported (one line each). */
  log?: (line: string) => void;
}

/** Which names the guest may use as extended attributes on host files. */
function allowedXattr(name: string): boolean {
  return name.startsWith("user.");
}

function safeMode(mode: number): number {
  const type = mode & S_IFMT;
  return type === S_IFDIR ? mode & 0o3777 : mode & 0o1777;
}

export class HostFsProvider implements Provider {
  readonly root: string;
  private rootFd: number;
  private readonly chown: boolean;

  constructor(root: string, options: HostFsOptions = {}) {
    if (!sys.openat2Available()) {
      throw new FsError("ENOSYS", "openat2(2) is not available: host_fs mounts need Linux 5.6 or newer");
    }
    this.root = root;
    this.rootFd = openSync(root, sys.O_PATH | sys.O_DIRECTORY | sys.O_CLOEXEC);
    if ((fstatSync(this.rootFd).mode & S_IFMT) !== S_IFDIR) {
      sys.close(this.rootFd);
      throw new FsError("ENOTDIR", root);
    }
    this.chown = options.chownToCaller ?? process.getuid?.() === 0;
  }

  async close(): Promise<void> {
    if (this.rootFd >= 0) sys.close(this.rootFd);
    this.rootFd = -1;
  }

  private rel(path: string): string {
    return path === "/" ? "." : path.slice(1);
  }

  /** An fd on `path` (no symlink followed anywhere): O_PATH by default. */
  private openPath(path: string, flags = sys.O_PATH, mode = 0): number {
    return sys.openat2(this.rootFd, this.rel(path), flags | sys.O_CLOEXEC, mode, sys.RESOLVE_CONTAINED);
  }

  /**
   * Runs fn on (parent directory fd, last name). For the root itself, fn gets the root's /proc fd
   * path with AT_FDCWD and must follow it (nofollow = 0).
   */
  private at<T>(path: string, fn: (dirfd: number, name: string, nofollow: number) => T): T {
    if (path === "/") return fn(sys.AT_FDCWD, sys.fdPath(this.rootFd), 0);
    const { dir, name } = splitPath(path);
    const dfd = this.openPath(dir, sys.O_PATH | sys.O_DIRECTORY);
    try {
      return fn(dfd, name, sys.AT_SYMLINK_NOFOLLOW);
    } finally {
      sys.close(dfd);
    }
  }

  private own(dirfd: number, name: string, caller: Caller): void {
    if (this.chown) sys.fchownat(dirfd, name, caller.uid, caller.gid, sys.AT_SYMLINK_NOFOLLOW);
  }

  async getattr(path: string): Promise<Attr> {
    if (path === "/") return sys.statx(this.rootFd, "", sys.AT_EMPTY_PATH);
    return this.at(path, (dfd, name) => sys.statx(dfd, name));
  }

  async setattr(path: string, set: SetAttr, _caller: Caller): Promise<void> {
    if (set.size !== undefined) {
      const fd = this.openPath(path, sys.O_WRONLY | sys.O_NOFOLLOW | sys.O_NONBLOCK | sys.O_NOCTTY);
      try {
        await pftruncate(fd, set.size);
      } finally {
        sys.close(fd);
      }
    }
    if (set.mode !== undefined) {
      // fchmodat cannot refuse a final symlink; an O_PATH fd opened without following can.
      const fd = this.openPath(path);
      try {
        const type = sys.statx(fd, "", sys.AT_EMPTY_PATH).mode & S_IFMT;
        sys.fchmodat(sys.AT_FDCWD, sys.fdPath(fd), safeMode(type | set.mode));
      } finally {
        sys.close(fd);
      }
    }
    if (set.uid !== undefined || set.gid !== undefined) {
      this.at(path, (dfd, name, nf) => sys.fchownat(dfd, name, set.uid ?? -1, set.gid ?? -1, nf));
    }
    if (set.atime !== undefined || set.mtime !== undefined) {
      this.at(path, (dfd, name, nf) => sys.utimensat(dfd, name, set.atime, set.mtime, nf));
    }
  }

  async readlink(path: string): Promise<string> {
    const raw = this.at(path, (dfd, name) => sys.readlinkat(dfd, name));
    return decodeUtf8(raw) ?? raw.toString("latin1");
  }

  async readdir(path: string): Promise<DirEntry[]> {
    const fd = this.openPath(path, sys.O_RDONLY | sys.O_DIRECTORY);
    try {
      const out: DirEntry[] = [];
      for (const d of sys.readdirFd(fd)) {
        const name = decodeUtf8(d.name);
        if (name === undefined) continue; // not UTF-8: not representable to the guest (docs/vfs.md)
        out.push({ name, type: d.type << 12, ino: d.ino });
      }
      return out;
    } finally {
      sys.close(fd);
    }
  }

  async open(path: string, flags: number): Promise<FileHandle> {
    return new HostFile(this.openPath(path, (flags & OPEN_PASS) | OPEN_ALWAYS));
  }

  async create(path: string, flags: number, mode: number, caller: Caller): Promise<FileHandle> {
    return this.at(path, (dfd, name) => {
      const fd = sys.openat2(
        dfd,
        name,
        (flags & (OPEN_PASS | sys.O_EXCL)) | sys.O_CREAT | OPEN_ALWAYS,
        safeMode(S_IFREG | mode),
        sys.RESOLVE_CONTAINED,
      );
      try {
        this.own(dfd, name, caller);
      } catch (e) {
        sys.close(fd);
        throw e;
      }
      return new HostFile(fd);
    });
  }

  async mkdir(path: string, mode: number, caller: Caller): Promise<void> {
    this.at(path, (dfd, name) => {
      sys.mkdirat(dfd, name, safeMode(S_IFDIR | mode));
      this.own(dfd, name, caller);
    });
  }

  async mknod(path: string, mode: number, _rdev: number, caller: Caller): Promise<void> {
    const type = mode & S_IFMT;
    if (type !== S_IFREG && type !== S_IFIFO && type !== S_IFSOCK)
      throw new FsError("EPERM", "no device nodes");
    this.at(path, (dfd, name) => {
      sys.mknodat(dfd, name, type | safeMode(mode), 0);
      this.own(dfd, name, caller);
    });
  }

  async symlink(target: string, path: string, caller: Caller): Promise<void> {
    // The target is stored as text and never followed by the host.
    this.at(path, (dfd, name) => {
      sys.symlinkat(target, dfd, name);
      this.own(dfd, name, caller);
    });
  }

  async link(oldPath: string, newPath: string): Promise<void> {
    if (oldPath === "/") throw new FsError("EPERM");
    // linkat without AT_SYMLINK_FOLLOW: the new name is a link to the old entry itself (a symlink
    // stays a symlink), and both names are resolved beneath the root.
    this.at(oldPath, (ofd, oname) => {
      sys.statx(ofd, oname); // ENOENT for a missing source first, as link(2) does
      this.at(newPath, (nfd, nname) => sys.linkat(ofd, oname, nfd, nname, 0));
    });
  }

  async unlink(path: string): Promise<void> {
    if (path === "/") throw new FsError("EBUSY");
    this.at(path, (dfd, name) => sys.unlinkat(dfd, name, 0));
  }

  async rmdir(path: string): Promise<void> {
    if (path === "/") throw new FsError("EBUSY");
    this.at(path, (dfd, name) => sys.unlinkat(dfd, name, sys.AT_REMOVEDIR));
  }

  async rename(oldPath: string, newPath: string, flags: number): Promise<void> {
    if (flags & ~RENAME_FLAGS) throw new FsError("EINVAL");
    if (oldPath === "/" || newPath === "/") throw new FsError("EBUSY");
    this.at(oldPath, (ofd, oname) =>
      this.at(newPath, (nfd, nname) => sys.renameat2(ofd, oname, nfd, nname, flags)),
    );
  }

  async fsyncdir(path: string): Promise<void> {
    const fd = this.openPath(path, sys.O_RDONLY | sys.O_DIRECTORY);
    try {
      await pfsync(fd);
    } finally {
      sys.close(fd);
    }
  }

  async statfs(_path: string): Promise<StatFs> {
    const s = await pstatfs(sys.fdPath(this.rootFd));
    return {
      blocks: s.blocks,
      bfree: s.bfree,
      bavail: s.bavail,
      files: s.files,
      ffree: s.ffree,
      bsize: s.bsize,
      namelen: 255,
      frsize: s.bsize,
    };
  }

  private isSymlink(path: string): boolean {
    try {
      return (this.at(path, (dfd, name) => sys.statx(dfd, name)).mode & S_IFMT) === S_IFLNK;
    } catch {
      return false;
    }
  }

  /** fn on the /proc path of an O_PATH fd of `path`; a symlink (ELOOP) gets `onSymlink`. */
  private withProcPath<T>(path: string, fn: (p: string) => T, onSymlink: () => T): T {
    let fd: number;
    try {
      fd = this.openPath(path);
    } catch (e) {
      // ELOOP for the last component being a symlink gets the symlink answer; ELOOP from a symlink
      // used as a directory on the way stays ELOOP.
      if (e instanceof FsError && e.code === "ELOOP" && this.isSymlink(path)) return onSymlink();
      throw e;
    }
    try {
      return fn(sys.fdPath(fd));
    } finally {
      sys.close(fd);
    }
  }

  async getxattr(path: string, name: string): Promise<Buffer> {
    if (!allowedXattr(name)) {
      await this.getattr(path);
      throw new FsError("ENODATA");
    }
    return this.withProcPath(
      path,
      (p) => sys.getxattr(p, name),
      () => {
        throw new FsError("ENODATA");
      },
    );
  }

  async setxattr(path: string, name: string, value: Buffer, flags: number): Promise<void> {
    if (!allowedXattr(name)) throw new FsError("EOPNOTSUPP", `xattr ${name} outside user.*`);
    this.withProcPath(
      path,
      (p) => sys.setxattr(p, name, value, flags),
      () => {
        throw new FsError("EPERM");
      },
    );
  }

  async listxattr(path: string): Promise<string[]> {
    return this.withProcPath(
      path,
      (p) => sys.listxattr(p).filter(allowedXattr),
      () => [],
    );
  }

  async removexattr(path: string, name: string): Promise<void> {
    if (!allowedXattr(name)) throw new FsError("EOPNOTSUPP");
    this.withProcPath(
      path,
      (p) => sys.removexattr(p, name),
      () => {
        throw new FsError("EPERM");
      },
    );
  }
}

/** An open host file: its fd came from openat2 beneath the root, data moves with Node's async fs. */
export class HostFile implements FileHandle {
  private fd: number;
  constructor(fd: number) {
    this.fd = fd;
  }

  private live(): number {
    if (this.fd < 0) throw new FsError("EBADF");
    return this.fd;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const b = Buffer.allocUnsafe(length);
    let got = 0;
    while (got < length) {
      const { bytesRead } = await pread(this.live(), b, got, length - got, offset + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    return b.subarray(0, got);
  }

  async write(offset: number, data: Buffer): Promise<number> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await pwrite(this.live(), data, done, data.length - done, offset + done);
      if (bytesWritten === 0) break;
      done += bytesWritten;
    }
    return done;
  }

  async getattr(): Promise<Attr> {
    return sys.statx(this.live(), "", sys.AT_EMPTY_PATH);
  }

  async truncate(size: number): Promise<void> {
    await pftruncate(this.live(), size);
  }

  async fsync(datasync: boolean): Promise<void> {
    await (datasync ? pfdatasync(this.live()) : pfsync(this.live()));
  }

  async release(): Promise<void> {
    const fd = this.fd;
    this.fd = -1;
    // close(2) of a local file is a few µs: no thread-pool round trip for it.
    if (fd >= 0) sys.close(fd);
  }

  async allocate(mode: number, offset: number, length: number): Promise<void> {
    sys.fallocate(this.live(), mode, offset, length);
  }

  async seek(offset: number, whence: number): Promise<number> {
    return sys.lseek(this.live(), offset, whence);
  }
}
