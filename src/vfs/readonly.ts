import type { Attr } from "./fuse-abi.ts";
import { type DirEntry, type FileHandle, FsError, type Provider, type StatFs } from "./provider.ts";

/** A provider seen read-only (Matchlock's `readonly` mounts): every change is EROFS. */

const O_ACCMODE = 3;
const O_TRUNC = 0o1000;

function erofs(): never {
  throw new FsError("EROFS");
}

export class ReadOnlyProvider implements Provider {
  private readonly inner: Provider;
  constructor(inner: Provider) {
    this.inner = inner;
  }

  getattr(path: string): Promise<Attr> {
    return this.inner.getattr(path);
  }
  readlink(path: string): Promise<string> {
    return this.inner.readlink(path);
  }
  readdir(path: string): Promise<DirEntry[]> {
    return this.inner.readdir(path);
  }
  async open(path: string, flags: number): Promise<FileHandle> {
    if ((flags & O_ACCMODE) !== 0 || flags & O_TRUNC) erofs();
    const file = await this.inner.open(path, flags);
    return {
      read: (o, l) => file.read(o, l),
      write: async () => erofs(),
      getattr: () => file.getattr(),
      truncate: async () => erofs(),
      fsync: async () => {},
      release: () => file.release(),
      allocate: async () => erofs(),
      seek: (o, w) => file.seek(o, w),
    };
  }
  async fsyncdir(): Promise<void> {}
  statfs(path: string): Promise<StatFs> {
    return this.inner.statfs(path);
  }
  getxattr(path: string, name: string): Promise<Buffer> {
    return this.inner.getxattr(path, name);
  }
  listxattr(path: string): Promise<string[]> {
    return this.inner.listxattr(path);
  }
  async setattr(): Promise<void> {
    erofs();
  }
  async create(): Promise<FileHandle> {
    erofs();
  }
  async mkdir(): Promise<void> {
    erofs();
  }
  async mknod(): Promise<void> {
    erofs();
  }
  async symlink(): Promise<void> {
    erofs();
  }
  async link(): Promise<void> {
    erofs();
  }
  async unlink(): Promise<void> {
    erofs();
  }
  async rmdir(): Promise<void> {
    erofs();
  }
  async rename(): Promise<void> {
    erofs();
  }
  async setxattr(): Promise<void> {
    erofs();
  }
  async removexattr(): Promise<void> {
    erofs();
  }
  async close(): Promise<void> {
    await this.inner.close?.();
  }
}
