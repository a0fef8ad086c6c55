import { type Attr, S_IFDIR } from "./fuse-abi.ts";
import {
  type Caller,
  checkPath,
  components,
  type DirEntry,
  type FileHandle,
  FsError,
  nowTimespec,
  type Provider,
  type SetAttr,
  type StatFs,
} from "./provider.ts";

/**
 * The workspace as the guest sees it: one FUSE mount whose tree is composed of providers mounted at
 * paths inside it (Matchlock's MountRouter). The longest mount path containing a path serves it;
 * directories above a mount that no provider has are synthesised (read-only, listing the mounts
 * below). Renames and links across two mounts are EXDEV (the guest's mv then copies); a mount point
 * itself cannot be removed or renamed (EBUSY).
 *
 * Inode numbers: each mount's are mixed with its index (bits 52..63) so two mounts' files do not
 * share an inode number (tar, cp -a and du treat equal numbers as hard links).
 */

export interface Mount {
  /** Where in the workspace, "/" for the workspace root itself. */
  path: string;
  provider: Provider;
}

interface Routed {
  index: number;
  mount: Mount;
  /** The path inside the mount's provider. */
  inner: string;
}

const SYNTH_TAG = 0xfffn << 52n;

export class MountRouter implements Provider {
  private readonly mounts: Mount[];
  private readonly synthIno = new Map<string, bigint>();
  private readonly created = nowTimespec();

  constructor(mounts: Mount[]) {
    const seen = new Set<string>();
    for (const m of mounts) {
      checkPath(m.path);
      if (seen.has(m.path)) throw new FsError("EINVAL", `two mounts at ${m.path}`);
      seen.add(m.path);
    }
    // Longest first, so the first match is the deepest mount.
    this.mounts = [...mounts].sort((a, b) => b.path.length - a.path.length);
  }

  async close(): Promise<void> {
    for (const m of this.mounts) await m.provider.close?.();
  }

  private route(path: string): Routed | undefined {
    for (let i = 0; i < this.mounts.length; i++) {
      const m = this.mounts[i] as Mount;
      if (m.path === "/") return { index: i, mount: m, inner: path };
      if (path === m.path) return { index: i, mount: m, inner: "/" };
      if (path.startsWith(`${m.path}/`)) return { index: i, mount: m, inner: path.slice(m.path.length) };
    }
    return undefined;
  }

  private must(path: string): Routed {
    const r = this.route(path);
    if (!r) throw new FsError(this.isSynth(path) ? "EROFS" : "ENOENT");
    return r;
  }

  /** A strict ancestor of some mount path (so it must appear as a directory). */
  private isSynth(path: string): boolean {
    const prefix = path === "/" ? "/" : `${path}/`;
    return this.mounts.some((m) => m.path !== path && m.path.startsWith(prefix));
  }

  private isMountPoint(path: string): boolean {
    return path !== "/" && this.mounts.some((m) => m.path === path);
  }

  private synthAttr(path: string): Attr {
    let ino = this.synthIno.get(path);
    if (ino === undefined) {
      ino = SYNTH_TAG | BigInt(this.synthIno.size + 1);
      this.synthIno.set(path, ino);
    }
    return {
      ino,
      size: 0,
      blocks: 0,
      atime: this.created,
      mtime: this.created,
      ctime: this.created,
      mode: S_IFDIR | 0o755,
      nlink: 2,
      uid: 0,
      gid: 0,
      rdev: 0,
      blksize: 4096,
    };
  }

  private tag(r: Routed, a: Attr): Attr {
    return { ...a, ino: a.ino ^ (BigInt(r.index) << 52n) };
  }

  async getattr(path: string): Promise<Attr> {
    const r = this.route(path);
    if (r) {
      try {
        return this.tag(r, await r.mount.provider.getattr(r.inner));
      } catch (e) {
        const code = (e as { code?: string }).code;
        if (!this.isSynth(path) || (code !== "ENOENT" && code !== "ENOTDIR")) throw e;
      }
    }
    if (this.isSynth(path)) return this.synthAttr(path);
    throw new FsError("ENOENT");
  }

  async readdir(path: string): Promise<DirEntry[]> {
    const out = new Map<string, DirEntry>();
    const r = this.route(path);
    let found = false;
    if (r) {
      try {
        for (const e of await r.mount.provider.readdir(r.inner)) {
          out.set(e.name, e.ino === undefined ? e : { ...e, ino: e.ino ^ (BigInt(r.index) << 52n) });
        }
        found = true;
      } catch (e) {
        if (!this.isSynth(path)) throw e;
      }
    }
    const depth = components(path).length;
    const prefix = path === "/" ? "/" : `${path}/`;
    for (const m of this.mounts) {
      if (m.path === path || !m.path.startsWith(prefix)) continue;
      const name = components(m.path)[depth] as string;
      const child = path === "/" ? `/${name}` : `${path}/${name}`;
      out.set(name, { name, type: S_IFDIR, ino: (await this.getattr(child).catch(() => undefined))?.ino });
      found = true;
    }
    if (!found) throw new FsError("ENOENT");
    return [...out.values()];
  }

  async setattr(path: string, set: SetAttr, caller: Caller): Promise<void> {
    const r = this.must(path);
    await r.mount.provider.setattr(r.inner, set, caller);
  }
  async readlink(path: string): Promise<string> {
    const r = this.must(path);
    return r.mount.provider.readlink(r.inner);
  }
  async open(path: string, flags: number): Promise<FileHandle> {
    const r = this.must(path);
    const file = await r.mount.provider.open(r.inner, flags);
    return this.tagged(r, file);
  }
  async create(path: string, flags: number, mode: number, caller: Caller): Promise<FileHandle> {
    const r = this.must(path);
    return this.tagged(r, await r.mount.provider.create(r.inner, flags, mode, caller));
  }

  private tagged(r: Routed, file: FileHandle): FileHandle {
    if (r.index === 0) return file;
    return {
      read: (o, l) => file.read(o, l),
      write: (o, d) => file.write(o, d),
      getattr: async () => this.tag(r, await file.getattr()),
      truncate: (s) => file.truncate(s),
      fsync: (d) => file.fsync(d),
      release: () => file.release(),
      allocate: (m, o, l) => file.allocate(m, o, l),
      seek: (o, w) => file.seek(o, w),
    };
  }

  async mkdir(path: string, mode: number, caller: Caller): Promise<void> {
    if (this.isMountPoint(path) || this.isSynth(path)) throw new FsError("EEXIST");
    const r = this.must(path);
    await r.mount.provider.mkdir(r.inner, mode, caller);
  }
  async mknod(path: string, mode: number, rdev: number, caller: Caller): Promise<void> {
    if (this.isMountPoint(path) || this.isSynth(path)) throw new FsError("EEXIST");
    const r = this.must(path);
    await r.mount.provider.mknod(r.inner, mode, rdev, caller);
  }
  async symlink(target: string, path: string, caller: Caller): Promise<void> {
    if (this.isMountPoint(path) || this.isSynth(path)) throw new FsError("EEXIST");
    const r = this.must(path);
    await r.mount.provider.symlink(target, r.inner, caller);
  }

  private pair(a: string, b: string): { from: Routed; to: Routed } {
    if (this.isMountPoint(a) || this.isSynth(a) || this.isMountPoint(b) || this.isSynth(b)) {
      throw new FsError("EBUSY");
    }
    const from = this.must(a);
    const to = this.must(b);
    if (from.mount !== to.mount) throw new FsError("EXDEV");
    return { from, to };
  }

  async link(oldPath: string, newPath: string): Promise<void> {
    const { from, to } = this.pair(oldPath, newPath);
    await from.mount.provider.link(from.inner, to.inner);
  }
  async rename(oldPath: string, newPath: string, flags: number): Promise<void> {
    const { from, to } = this.pair(oldPath, newPath);
    await from.mount.provider.rename(from.inner, to.inner, flags);
  }
  async unlink(path: string): Promise<void> {
    if (this.isMountPoint(path) || this.isSynth(path)) throw new FsError("EBUSY");
    const r = this.must(path);
    await r.mount.provider.unlink(r.inner);
  }
  async rmdir(path: string): Promise<void> {
    if (this.isMountPoint(path) || this.isSynth(path)) throw new FsError("EBUSY");
    const r = this.must(path);
    await r.mount.provider.rmdir(r.inner);
  }
  async fsyncdir(path: string): Promise<void> {
    const r = this.route(path);
    try {
      if (r) await r.mount.provider.fsyncdir?.(r.inner);
    } catch (e) {
      if (!this.isSynth(path)) throw e; // a synthesised directory has nothing to sync
    }
  }
  async statfs(path: string): Promise<StatFs> {
    const r = this.route(path) ?? this.route("/");
    if (!r) {
      return { blocks: 0, bfree: 0, bavail: 0, files: 0, ffree: 0, bsize: 4096, namelen: 255, frsize: 4096 };
    }
    return r.mount.provider.statfs(r.inner);
  }
  async getxattr(path: string, name: string): Promise<Buffer> {
    const r = this.route(path);
    if (!r) throw new FsError(this.isSynth(path) ? "ENODATA" : "ENOENT");
    return r.mount.provider.getxattr(r.inner, name);
  }
  async listxattr(path: string): Promise<string[]> {
    const r = this.route(path);
    if (!r) {
      if (this.isSynth(path)) return [];
      throw new FsError("ENOENT");
    }
    return r.mount.provider.listxattr(r.inner);
  }
  async setxattr(path: string, name: string, value: Buffer, flags: number): Promise<void> {
    const r = this.must(path);
    await r.mount.provider.setxattr(r.inner, name, value, flags);
  }
  async removexattr(path: string, name: string): Promise<void> {
    const r = this.must(path);
    await r.mount.provider.removexattr(r.inner, name);
  }
}
