import type { Attr } from "./fuse-abi.ts";
import {
  type Caller,
  type DirEntry,
  type FileHandle,
  FsError,
  type Provider,
  type SetAttr,
  type StatFs,
} from "./provider.ts";

/**
 * A mount of one file (Matchlock's single-file mounts, `-v ./config.json:/workspace/config.json`):
 * the mount's root is the entry `name` of `inner` (a provider of the file's parent directory), and
 * nothing else of that directory is reachable. For host_fs, inner is a HostFsProvider of the parent
 * (so the name resolves beneath it, never through a symlink); for overlay, an OverlayProvider of the
 * parent (the copy-up lands in the upper directory under the same name).
 */

export class SingleFileProvider implements Provider {
  private readonly inner: Provider;
  private readonly name: string;

  constructor(inner: Provider, name: string) {
    if (name === "" || name === "." || name === ".." || name.includes("/")) throw new FsError("EINVAL", name);
    this.inner = inner;
    this.name = name;
  }

  /** The only path there is: the root, which is the file. */
  private map(path: string): string {
    if (path !== "/") throw new FsError("ENOTDIR");
    return `/${this.name}`;
  }

  async getattr(path: string): Promise<Attr> {
    return await this.inner.getattr(this.map(path));
  }
  async setattr(path: string, set: SetAttr, caller: Caller): Promise<void> {
    return await this.inner.setattr(this.map(path), set, caller);
  }
  async readlink(path: string): Promise<string> {
    return await this.inner.readlink(this.map(path));
  }
  async readdir(path: string): Promise<DirEntry[]> {
    this.map(path);
    throw new FsError("ENOTDIR");
  }
  async open(path: string, flags: number): Promise<FileHandle> {
    return await this.inner.open(this.map(path), flags);
  }
  async statfs(path: string): Promise<StatFs> {
    return await this.inner.statfs(this.map(path));
  }
  async getxattr(path: string, name: string): Promise<Buffer> {
    return await this.inner.getxattr(this.map(path), name);
  }
  async setxattr(path: string, name: string, value: Buffer, flags: number): Promise<void> {
    return await this.inner.setxattr(this.map(path), name, value, flags);
  }
  async listxattr(path: string): Promise<string[]> {
    return await this.inner.listxattr(this.map(path));
  }
  async removexattr(path: string, name: string): Promise<void> {
    return await this.inner.removexattr(this.map(path), name);
  }
  /** Everything that would add or remove a name: there is no directory to do it in. */
  private async noNames(path: string): Promise<never> {
    this.map(path);
    throw new FsError(path === "/" ? "EBUSY" : "ENOTDIR");
  }
  async create(path: string, _flags?: number, _mode?: number, _caller?: Caller): Promise<FileHandle> {
    return await this.noNames(path);
  }
  async mkdir(path: string, _mode?: number, _caller?: Caller): Promise<void> {
    return await this.noNames(path);
  }
  async mknod(path: string, _mode?: number, _rdev?: number, _caller?: Caller): Promise<void> {
    return await this.noNames(path);
  }
  async symlink(_target: string, path: string, _caller?: Caller): Promise<void> {
    return await this.noNames(path);
  }
  async link(_oldPath: string, newPath: string): Promise<void> {
    return await this.noNames(newPath);
  }
  async unlink(path: string): Promise<void> {
    return await this.noNames(path);
  }
  async rmdir(path: string): Promise<void> {
    return await this.noNames(path);
  }
  async rename(oldPath: string, _newPath?: string, _flags?: number): Promise<void> {
    return await this.noNames(oldPath);
  }
  async close(): Promise<void> {
    await this.inner.close?.();
  }
}
