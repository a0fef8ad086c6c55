import {
  type Attr,
  PATH_MAX,
  S_IFDIR,
  S_IFIFO,
  S_IFLNK,
  S_IFMT,
  S_IFREG,
  S_IFSOCK,
  type Timespec,
  XATTR_SIZE_MAX,
} from "./fuse-abi.ts";
import {
  type Caller,
  components,
  type DirEntry,
  type FileHandle,
  FsError,
  nowTimespec,
  type Provider,
  RENAME_FLAGS,
  type SetAttr,
  type StatFs,
  splitPath,
  XATTR_CREATE,
  XATTR_REPLACE,
} from "./provider.ts";

/**
 * An in-memory tree (Matchlock's `memory` mount): lost when the process exits. Its size is bounded
 * (`maxBytes` of file data, `maxNodes` inodes): past them, ENOSPC, so a guest cannot grow the host
 * process without limit.
 */

interface MemNode {
  ino: bigint;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  atime: Timespec;
  mtime: Timespec;
  ctime: Timespec;
  rdev: number;
  /** File bytes: data[0, size) is the content; capacity grows by doubling. */
  data?: Buffer;
  size: number;
  children?: Map<string, MemNode>;
  target?: string;
  xattrs: Map<string, Buffer>;
  /** Open handles: an unlinked file lives (and counts) until the last is released. */
  opens: number;
  freed: boolean;
}

export interface MemoryOptions {
  maxBytes?: number;
  maxNodes?: number;
}

const O_ACCMODE = 3;
const O_WRONLY = 1;
const O_RDWR = 2;
const O_APPEND = 0o2000;
const O_TRUNC = 0o1000;
const O_EXCL = 0o200;

export class MemoryProvider implements Provider {
  private nextIno = 1n;
  private bytes = 0;
  private nodes = 0;
  private readonly maxBytes: number;
  private readonly maxNodes: number;
  private readonly root: MemNode;

  constructor(options: MemoryOptions = {}) {
    this.maxBytes = options.maxBytes ?? 512 * 1024 * 1024;
    this.maxNodes = options.maxNodes ?? 1_000_000;
    this.root = this.newNode(S_IFDIR | 0o755, { uid: 0, gid: 0, pid: 0 });
    this.root.nlink = 2;
  }

  private newNode(mode: number, caller: Caller): MemNode {
    if (this.nodes >= this.maxNodes) throw new FsError("ENOSPC", "memory provider: too many inodes");
    this.nodes++;
    const t = nowTimespec();
    const n: MemNode = {
      ino: this.nextIno++,
      mode,
      uid: caller.uid,
      gid: caller.gid,
      nlink: 1,
      atime: t,
      mtime: t,
      ctime: t,
      rdev: 0,
      size: 0,
      xattrs: new Map(),
      opens: 0,
      freed: false,
    };
    if ((mode & S_IFMT) === S_IFDIR) {
      n.children = new Map();
      n.nlink = 2;
    }
    return n;
  }

  private find(path: string): MemNode {
    let n = this.root;
    for (const c of components(path)) {
      if (!n.children) throw new FsError("ENOTDIR");
      const next = n.children.get(c);
      if (!next) throw new FsError("ENOENT");
      n = next;
    }
    return n;
  }

  private dirOf(path: string): { dir: MemNode; name: string } {
    const { dir, name } = splitPath(path);
    const d = this.find(dir);
    if (!d.children) throw new FsError("ENOTDIR");
    return { dir: d, name };
  }

  private attrOf(n: MemNode): Attr {
    return {
      ino: n.ino,
      size: n.size,
      blocks: Math.ceil(n.size / 512),
      atime: n.atime,
      mtime: n.mtime,
      ctime: n.ctime,
      mode: n.mode,
      nlink: n.nlink,
      uid: n.uid,
      gid: n.gid,
      rdev: n.rdev,
      blksize: 4096,
    };
  }

  private resize(n: MemNode, size: number): void {
    if (size === n.size) return;
    const grow = size - n.size;
    if (grow > 0 && this.bytes + grow > this.maxBytes) throw new FsError("ENOSPC", "memory provider is full");
    const cap = n.data?.length ?? 0;
    if (size > cap) {
      const next = Buffer.alloc(Math.max(size, Math.min(cap * 2, size + 64 * 1024 * 1024)));
      n.data?.copy(next, 0, 0, n.size);
      n.data = next;
    } else if (size < n.size && n.data) {
      n.data.fill(0, size, n.size);
    }
    this.bytes += grow;
    n.size = size;
  }

  private touch(n: MemNode, what: { m?: boolean; c?: boolean }): void {
    const t = nowTimespec();
    if (what.m) n.mtime = t;
    if (what.m || what.c) n.ctime = t;
  }

  private drop(n: MemNode): void {
    n.nlink = (n.mode & S_IFMT) === S_IFDIR ? 0 : n.nlink - 1;
    n.ctime = nowTimespec();
    this.maybeFree(n);
  }

  /** A node with no name and no open handle leaves the budget (its bytes and its inode). */
  private maybeFree(n: MemNode): void {
    if (n.nlink > 0 || n.opens > 0 || n.freed) return;
    n.freed = true;
    this.bytes -= n.size;
    for (const [k, v] of n.xattrs) this.bytes -= k.length + v.length;
    this.nodes--;
    n.data = undefined;
    n.size = 0;
  }

  async getattr(path: string): Promise<Attr> {
    return this.attrOf(this.find(path));
  }

  async setattr(path: string, set: SetAttr, _caller: Caller): Promise<void> {
    this.applySet(this.find(path), set);
  }

  private applySet(n: MemNode, set: SetAttr): void {
    if (set.size !== undefined) {
      if ((n.mode & S_IFMT) === S_IFDIR) throw new FsError("EISDIR");
      if ((n.mode & S_IFMT) === S_IFLNK) throw new FsError("ELOOP");
      if ((n.mode & S_IFMT) !== S_IFREG) throw new FsError("EINVAL");
      this.resize(n, set.size);
      this.touch(n, { m: true });
    }
    if (set.mode !== undefined) {
      if ((n.mode & S_IFMT) === S_IFLNK) throw new FsError("ELOOP"); // as host_fs: modes of links are fixed
      n.mode = (n.mode & S_IFMT) | (set.mode & 0o7777);
    }
    if (set.uid !== undefined) n.uid = set.uid;
    if (set.gid !== undefined) n.gid = set.gid;
    if (set.atime !== undefined) n.atime = set.atime === "now" ? nowTimespec() : set.atime;
    if (set.mtime !== undefined) n.mtime = set.mtime === "now" ? nowTimespec() : set.mtime;
    n.ctime = nowTimespec();
  }

  async readlink(path: string): Promise<string> {
    const n = this.find(path);
    if (n.target === undefined) throw new FsError("EINVAL");
    return n.target;
  }

  async readdir(path: string): Promise<DirEntry[]> {
    const n = this.find(path);
    if (!n.children) throw new FsError("ENOTDIR");
    return [...n.children].map(([name, c]) => ({ name, type: c.mode & S_IFMT, ino: c.ino }));
  }

  async open(path: string, flags: number): Promise<FileHandle> {
    const n = this.find(path);
    if ((n.mode & S_IFMT) === S_IFDIR) {
      if ((flags & O_ACCMODE) !== 0) throw new FsError("EISDIR");
    } else if ((n.mode & S_IFMT) === S_IFLNK) {
      throw new FsError("ELOOP"); // as open(O_NOFOLLOW): the guest kernel resolves symlinks itself
    } else if ((n.mode & S_IFMT) !== S_IFREG) {
      throw new FsError("ENXIO");
    }
    if (flags & O_TRUNC && (flags & O_ACCMODE) !== 0) this.applySet(n, { size: 0 });
    return this.handle(n, flags);
  }

  async create(path: string, flags: number, mode: number, caller: Caller): Promise<FileHandle> {
    const { dir, name } = this.dirOf(path);
    const existing = dir.children?.get(name);
    if (existing) {
      if (flags & O_EXCL) throw new FsError("EEXIST");
      return this.open(path, flags);
    }
    const n = this.newNode(S_IFREG | (mode & 0o7777), caller);
    this.attach(dir, name, n);
    return this.handle(n, flags);
  }

  private attach(dir: MemNode, name: string, n: MemNode): void {
    dir.children?.set(name, n);
    if (n.children) dir.nlink++;
    this.touch(dir, { m: true });
  }

  private handle(n: MemNode, flags: number): FileHandle {
    const writable = (flags & O_ACCMODE) === O_WRONLY || (flags & O_ACCMODE) === O_RDWR;
    const append = (flags & O_APPEND) !== 0;
    n.opens++;
    let released = false;
    return {
      read: async (offset, length) => {
        if (offset >= n.size || !n.data) return Buffer.alloc(0);
        return Buffer.from(n.data.subarray(offset, Math.min(n.size, offset + length)));
      },
      write: async (offset, data) => {
        if (!writable) throw new FsError("EBADF");
        if (data.length === 0) return 0;
        const at = append ? n.size : offset;
        if (at + data.length > n.size) this.resize(n, at + data.length);
        data.copy(n.data as Buffer, at);
        this.touch(n, { m: true });
        return data.length;
      },
      getattr: async () => this.attrOf(n),
      truncate: async (size) => this.applySet(n, { size }),
      fsync: async () => {},
      release: async () => {
        if (released) return;
        released = true;
        n.opens--;
        this.maybeFree(n);
      },
      allocate: async (mode, offset, length) => {
        if (mode !== 0) throw new FsError("EOPNOTSUPP");
        if (offset + length > n.size) this.resize(n, offset + length);
      },
      seek: async (offset, whence) => {
        if (offset >= n.size) throw new FsError("ENXIO");
        return whence === 3 ? offset : n.size; // SEEK_DATA: all data; SEEK_HOLE: the end
      },
    };
  }

  async mkdir(path: string, mode: number, caller: Caller): Promise<void> {
    const { dir, name } = this.dirOf(path);
    if (dir.children?.has(name)) throw new FsError("EEXIST");
    this.attach(dir, name, this.newNode(S_IFDIR | (mode & 0o7777), caller));
  }

  async mknod(path: string, mode: number, rdev: number, caller: Caller): Promise<void> {
    const type = mode & S_IFMT;
    if (type !== S_IFREG && type !== S_IFIFO && type !== S_IFSOCK) throw new FsError("EPERM");
    const { dir, name } = this.dirOf(path);
    if (dir.children?.has(name)) throw new FsError("EEXIST");
    const n = this.newNode(type | (mode & 0o7777), caller);
    n.rdev = rdev;
    this.attach(dir, name, n);
  }

  async symlink(target: string, path: string, caller: Caller): Promise<void> {
    if (target.length > PATH_MAX) throw new FsError("ENAMETOOLONG");
    const { dir, name } = this.dirOf(path);
    if (dir.children?.has(name)) throw new FsError("EEXIST");
    const n = this.newNode(S_IFLNK | 0o777, caller);
    n.target = target;
    n.size = Buffer.byteLength(target);
    this.attach(dir, name, n);
  }

  async link(oldPath: string, newPath: string): Promise<void> {
    const n = this.find(oldPath);
    const { dir, name } = this.dirOf(newPath);
    if (dir.children?.has(name)) throw new FsError("EEXIST");
    if (n.children) throw new FsError("EPERM");
    n.nlink++;
    this.touch(n, { c: true });
    this.attach(dir, name, n);
  }

  async unlink(path: string): Promise<void> {
    const { dir, name } = this.dirOf(path);
    const n = dir.children?.get(name);
    if (!n) throw new FsError("ENOENT");
    if (n.children) throw new FsError("EISDIR");
    dir.children?.delete(name);
    this.touch(dir, { m: true });
    this.drop(n);
  }

  async rmdir(path: string): Promise<void> {
    if (path === "/") throw new FsError("EBUSY");
    const { dir, name } = this.dirOf(path);
    const n = dir.children?.get(name);
    if (!n) throw new FsError("ENOENT");
    if (!n.children) throw new FsError("ENOTDIR");
    if (n.children.size > 0) throw new FsError("ENOTEMPTY");
    dir.children?.delete(name);
    dir.nlink--;
    this.touch(dir, { m: true });
    this.drop(n);
  }

  async rename(oldPath: string, newPath: string, flags: number): Promise<void> {
    if (flags & ~RENAME_FLAGS) throw new FsError("EINVAL");
    const from = this.dirOf(oldPath);
    const to = this.dirOf(newPath);
    const n = from.dir.children?.get(from.name);
    if (!n) throw new FsError("ENOENT");
    const target = to.dir.children?.get(to.name);
    // The order of Linux's checks (do_renameat2, then vfs_rename).
    if (flags & 1 && target) throw new FsError("EEXIST");
    if (n.children && newPath.startsWith(`${oldPath}/`)) throw new FsError("EINVAL");
    if (oldPath.startsWith(`${newPath}/`)) throw new FsError(flags & 2 ? "EINVAL" : "ENOTEMPTY");
    if (flags & 2) {
      // RENAME_EXCHANGE
      if (!target) throw new FsError("ENOENT");
      if (target === n) return;
      from.dir.children?.set(from.name, target);
      to.dir.children?.set(to.name, n);
      if (from.dir !== to.dir && (n.children ? 1 : 0) !== (target.children ? 1 : 0)) {
        const d = n.children ? 1 : -1;
        from.dir.nlink -= d;
        to.dir.nlink += d;
      }
      this.touch(from.dir, { m: true });
      this.touch(to.dir, { m: true });
      return;
    }
    if (target === n) return;
    if (target) {
      if (n.children && !target.children) throw new FsError("ENOTDIR");
      if (!n.children && target.children) throw new FsError("EISDIR");
      if (target.children && target.children.size > 0) throw new FsError("ENOTEMPTY");
      if (target.children) to.dir.nlink--;
      this.drop(target);
    }
    from.dir.children?.delete(from.name);
    if (n.children) from.dir.nlink--;
    to.dir.children?.set(to.name, n);
    if (n.children) to.dir.nlink++;
    this.touch(from.dir, { m: true });
    this.touch(to.dir, { m: true });
    this.touch(n, { c: true });
  }

  async statfs(_path: string): Promise<StatFs> {
    const bsize = 4096;
    const blocks = Math.ceil(this.maxBytes / bsize);
    const free = Math.max(0, blocks - Math.ceil(this.bytes / bsize));
    return {
      blocks,
      bfree: free,
      bavail: free,
      files: this.maxNodes,
      ffree: this.maxNodes - this.nodes,
      bsize,
      namelen: 255,
      frsize: bsize,
    };
  }

  async getxattr(path: string, name: string): Promise<Buffer> {
    const v = this.find(path).xattrs.get(name);
    if (!v) throw new FsError("ENODATA");
    return v;
  }

  async setxattr(path: string, name: string, value: Buffer, flags: number): Promise<void> {
    const n = this.find(path);
    if ((n.mode & S_IFMT) === S_IFLNK) throw new FsError("EPERM"); // Linux: no user.* xattrs on symlinks
    if (value.length > XATTR_SIZE_MAX) throw new FsError("E2BIG");
    const has = n.xattrs.has(name);
    if (flags & XATTR_CREATE && has) throw new FsError("EEXIST");
    if (flags & XATTR_REPLACE && !has) throw new FsError("ENODATA");
    if (!has && n.xattrs.size >= 128) throw new FsError("ENOSPC");
    // Extended attributes count against the same byte budget as file data.
    const grow = value.length + name.length - (has ? (n.xattrs.get(name)?.length ?? 0) + name.length : 0);
    if (this.bytes + grow > this.maxBytes) throw new FsError("ENOSPC", "memory provider is full");
    this.bytes += grow;
    n.xattrs.set(name, Buffer.from(value));
    this.touch(n, { c: true });
  }

  async listxattr(path: string): Promise<string[]> {
    return [...this.find(path).xattrs.keys()];
  }

  async removexattr(path: string, name: string): Promise<void> {
    const n = this.find(path);
    const v = n.xattrs.get(name);
    if (!v) throw new FsError("ENODATA");
    n.xattrs.delete(name);
    this.bytes -= v.length + name.length;
    this.touch(n, { c: true });
  }
}
