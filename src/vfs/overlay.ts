import { type Attr, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG } from "./fuse-abi.ts";
import {
  type Caller,
  components,
  type DirEntry,
  type FileHandle,
  FsError,
  joinPath,
  type Provider,
  RENAME_FLAGS,
  type SetAttr,
  type StatFs,
  splitPath,
} from "./provider.ts";

/**
 * A copy-on-write view (Matchlock's `overlay` mount, without its deep copy at create): reads fall
 * through to `lower` (the host folder, never written: give it read-only), every change goes to
 * `upper` (a per-VM directory). Nothing is copied up front; a file is copied up on its first write
 * (or setattr, xattr change, link), a directory when something is created inside it.
 *
 * Deletions are recorded in upper as AUFS-style whiteouts: an empty file `.wh.<name>` hides <name>
 * of lower, and `.wh..wh..opq` in an upper directory hides all of lower's directory there (after
 * rmdir + mkdir, or a directory renamed over a lower one). Names starting with `.wh.` are therefore
 * reserved: the guest cannot see or create them (EPERM).
 *
 * Limits (see docs/vfs.md): renaming a directory that exists in lower is EXDEV (like kernel overlayfs
 * without redirect_dir; mv falls back to copy + delete); RENAME_EXCHANGE is EINVAL; a file opened
 * read-only before its copy-up keeps reading the lower copy.
 */

export const WHITEOUT_PREFIX = ".wh.";
export const OPAQUE = ".wh..wh..opq";
const COPYUP_TMP = ".wh..wh..copyup.";

const O_ACCMODE = 3;
const O_WRONLY = 1;
const O_CREAT = 0o100;
const O_EXCL = 0o200;
const O_TRUNC = 0o1000;
const ROOT: Caller = { uid: 0, gid: 0, pid: 0 };
const CHUNK = 1024 * 1024;
const LOWER_INO_TAG = 1n << 62n;

interface Resolved {
  /** The entry the guest sees. */
  attr: Attr;
  upper: Attr | undefined;
  /** lower's entry at this path, when it is part of the view (not hidden by a whiteout or opaque dir). */
  lower: Attr | undefined;
  /** For a directory: whether lower's directory contributes entries (not opaque). */
  lowerListed: boolean;
}

function isDir(a: Attr | undefined): boolean {
  return a !== undefined && (a.mode & S_IFMT) === S_IFDIR;
}

async function tryGet(p: Provider, path: string): Promise<Attr | undefined> {
  try {
    return await p.getattr(path);
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === "ENOENT" || code === "ENOTDIR" || code === "ELOOP") return undefined;
    throw e;
  }
}

function reserved(name: string): boolean {
  return name.startsWith(WHITEOUT_PREFIX);
}

/**
 * What the host had at a path when the guest first changed it (undefined: nothing there): told once
 * per path, before the change. `matchlock apply` refuses to overwrite a host file that changed since.
 */
export type BaseRecorder = (path: string, lower: Attr | undefined) => void;

export class OverlayProvider implements Provider {
  private readonly lower: Provider;
  private readonly upper: Provider;
  private readonly copying = new Map<string, Promise<void>>();
  private readonly onBase: BaseRecorder | undefined;
  private readonly based = new Set<string>();

  constructor(lower: Provider, upper: Provider, onBase?: BaseRecorder) {
    this.lower = lower;
    this.upper = upper;
    this.onBase = onBase;
  }

  private async recordBase(path: string, lower?: Attr | null): Promise<void> {
    if (!this.onBase || this.based.has(path)) return;
    this.based.add(path);
    this.onBase(path, lower === null ? await tryGet(this.lower, path) : lower);
  }

  async close(): Promise<void> {
    await this.lower.close?.();
    await this.upper.close?.();
  }

  private whiteout(path: string): string {
    const { dir, name } = splitPath(path);
    return joinPath(dir, WHITEOUT_PREFIX + name);
  }

  private async resolve(path: string): Promise<Resolved> {
    const r = await this.tryResolve(path);
    if (!r) throw new FsError("ENOENT");
    return r;
  }

  /** The merged view of `path`, walking from the root (undefined: not there). */
  private async tryResolve(path: string): Promise<Resolved | undefined> {
    const up = await this.upper.getattr("/");
    let cur: Resolved = { attr: up, upper: up, lower: await tryGet(this.lower, "/"), lowerListed: true };
    if (cur.lower && !isDir(cur.lower)) cur.lower = undefined;
    cur.lowerListed = cur.lower !== undefined && (await tryGet(this.upper, `/${OPAQUE}`)) === undefined;
    let at = "/";
    for (const name of components(path)) {
      if (!isDir(cur.attr)) throw new FsError("ENOTDIR");
      if (reserved(name)) return undefined;
      const next = joinPath(at, name);
      const upper = cur.upper ? await tryGet(this.upper, next) : undefined;
      let lower: Attr | undefined;
      if (cur.lowerListed && (await tryGet(this.upper, this.whiteout(next))) === undefined) {
        lower = await tryGet(this.lower, next);
      }
      if (upper && lower && isDir(upper) !== isDir(lower)) lower = undefined;
      const attr = upper ?? (lower ? { ...lower, ino: lower.ino | LOWER_INO_TAG } : undefined);
      if (!attr) return undefined;
      let lowerListed = false;
      if (lower && isDir(lower)) {
        lowerListed = !upper || (await tryGet(this.upper, joinPath(next, OPAQUE))) === undefined;
      }
      cur = { attr, upper, lower, lowerListed };
      at = next;
    }
    return cur;
  }

  async getattr(path: string): Promise<Attr> {
    return (await this.resolve(path)).attr;
  }

  async readlink(path: string): Promise<string> {
    const r = await this.resolve(path);
    return r.upper ? this.upper.readlink(path) : this.lower.readlink(path);
  }

  async readdir(path: string): Promise<DirEntry[]> {
    const r = await this.resolve(path);
    if (!isDir(r.attr)) throw new FsError("ENOTDIR");
    const out = new Map<string, DirEntry>();
    const hidden = new Set<string>();
    if (r.upper) {
      for (const e of await this.upper.readdir(path)) {
        if (reserved(e.name)) {
          if (e.name !== OPAQUE) hidden.add(e.name.slice(WHITEOUT_PREFIX.length));
          continue;
        }
        out.set(e.name, e);
      }
    }
    if (r.lowerListed) {
      for (const e of await this.lower.readdir(path)) {
        if (reserved(e.name) || hidden.has(e.name) || out.has(e.name)) continue;
        out.set(e.name, e.ino === undefined ? e : { ...e, ino: e.ino | LOWER_INO_TAG });
      }
    }
    return [...out.values()];
  }

  /** Makes sure `path` exists in upper (copying file data unless `noData`), its parents first. */
  private async copyUp(path: string, noData = false): Promise<Resolved> {
    const r = await this.resolve(path);
    if (r.upper) return r;
    const busy = this.copying.get(path);
    if (busy) {
      await busy;
      return this.resolve(path);
    }
    const job = this.doCopyUp(path, r, noData);
    this.copying.set(path, job);
    try {
      await job;
    } finally {
      this.copying.delete(path);
    }
    return this.resolve(path);
  }

  private async doCopyUp(path: string, r: Resolved, noData: boolean): Promise<void> {
    const lower = r.lower as Attr;
    if (path !== "/") await this.copyUp(splitPath(path).dir);
    await this.recordBase(path, lower);
    const type = lower.mode & S_IFMT;
    const owner: Caller = { uid: lower.uid, gid: lower.gid, pid: 0 };
    if (type === S_IFDIR) {
      await this.upper.mkdir(path, lower.mode & 0o7777, owner);
    } else if (type === S_IFLNK) {
      await this.upper.symlink(await this.lower.readlink(path), path, owner);
    } else if (type === S_IFREG) {
      // Copied under a reserved temporary name, then renamed: a half copy is never visible.
      const { dir } = splitPath(path);
      const tmp = joinPath(dir, `${COPYUP_TMP}${process.pid}.${Math.random().toString(36).slice(2)}`);
      const dst = await this.upper.create(tmp, O_WRONLY | O_EXCL, lower.mode & 0o7777, owner);
      try {
        if (!noData) {
          const src = await this.lower.open(path, 0);
          try {
            for (let off = 0; ; off += CHUNK) {
              const chunk = await src.read(off, CHUNK);
              if (chunk.length === 0) break;
              await dst.write(off, chunk);
            }
          } finally {
            await src.release();
          }
        }
      } catch (e) {
        await dst.release().catch(() => {});
        await this.upper.unlink(tmp).catch(() => {});
        throw e;
      }
      await dst.release();
      await this.upper.rename(tmp, path, 1);
    } else {
      await this.upper.mknod(path, lower.mode, lower.rdev, owner);
    }
    for (const name of await this.lower.listxattr(path).catch(() => [] as string[])) {
      const value = await this.lower.getxattr(path, name).catch(() => undefined);
      if (value) await this.upper.setxattr(path, name, value, 0).catch(() => {});
    }
    await this.upper.setattr(path, { atime: lower.atime, mtime: lower.mtime }, ROOT).catch(() => {});
  }

  /** Gets the parent of a new name ready in upper; returns whether a whiteout was there (and removes it). */
  private async prepareNew(path: string): Promise<boolean> {
    const { dir, name } = splitPath(path);
    if (reserved(name)) throw new FsError("EPERM", `names starting with ${WHITEOUT_PREFIX} are reserved`);
    const parent = await this.resolve(dir);
    if (!isDir(parent.attr)) throw new FsError("ENOTDIR");
    if (await this.tryResolve(path)) throw new FsError("EEXIST");
    await this.copyUp(dir);
    await this.recordBase(path, null);
    const wh = this.whiteout(path);
    if (await tryGet(this.upper, wh)) {
      await this.upper.unlink(wh);
      return true;
    }
    return false;
  }

  private async addWhiteout(path: string): Promise<void> {
    await this.copyUp(splitPath(path).dir);
    await this.recordBase(path, null);
    const f = await this.upper.create(this.whiteout(path), O_WRONLY | O_CREAT, 0o600, ROOT);
    await f.release();
  }

  async setattr(path: string, set: SetAttr, caller: Caller): Promise<void> {
    await this.copyUp(path, set.size === 0);
    await this.upper.setattr(path, set, caller);
  }

  async open(path: string, flags: number): Promise<FileHandle> {
    const write = (flags & O_ACCMODE) !== 0 || (flags & O_TRUNC) !== 0;
    if (!write) {
      const r = await this.resolve(path);
      return r.upper ? this.upper.open(path, flags) : this.lower.open(path, flags);
    }
    await this.copyUp(path, (flags & O_TRUNC) !== 0);
    return this.upper.open(path, flags);
  }

  async create(path: string, flags: number, mode: number, caller: Caller): Promise<FileHandle> {
    const existing = await this.tryResolve(path);
    if (existing) {
      if (flags & O_EXCL) throw new FsError("EEXIST");
      return this.open(path, flags & ~O_CREAT);
    }
    await this.prepareNew(path);
    return this.upper.create(path, flags | O_EXCL, mode, caller);
  }

  async mkdir(path: string, mode: number, caller: Caller): Promise<void> {
    const hadWhiteout = await this.prepareNew(path);
    await this.upper.mkdir(path, mode, caller);
    if (hadWhiteout) {
      const f = await this.upper.create(joinPath(path, OPAQUE), O_WRONLY | O_CREAT, 0o600, ROOT);
      await f.release();
    }
  }

  async mknod(path: string, mode: number, rdev: number, caller: Caller): Promise<void> {
    await this.prepareNew(path);
    await this.upper.mknod(path, mode, rdev, caller);
  }

  async symlink(target: string, path: string, caller: Caller): Promise<void> {
    await this.prepareNew(path);
    await this.upper.symlink(target, path, caller);
  }

  async link(oldPath: string, newPath: string): Promise<void> {
    const r = await this.resolve(oldPath);
    const { dir } = splitPath(newPath);
    if (!isDir((await this.resolve(dir)).attr)) throw new FsError("ENOTDIR");
    if (await this.tryResolve(newPath)) throw new FsError("EEXIST");
    if (isDir(r.attr)) throw new FsError("EPERM");
    await this.copyUp(oldPath);
    await this.prepareNew(newPath);
    await this.upper.link(oldPath, newPath);
  }

  async unlink(path: string): Promise<void> {
    const r = await this.resolve(path);
    if (isDir(r.attr)) throw new FsError("EISDIR");
    if (r.upper) await this.upper.unlink(path);
    if (r.lower) await this.addWhiteout(path);
  }

  /** Removes an upper directory that the merged view says is empty (only whiteouts may remain in it). */
  private async removeUpperDir(path: string): Promise<void> {
    for (const e of await this.upper.readdir(path)) {
      if (reserved(e.name)) await this.upper.unlink(joinPath(path, e.name));
    }
    await this.upper.rmdir(path);
  }

  async rmdir(path: string): Promise<void> {
    if (path === "/") throw new FsError("EBUSY");
    const r = await this.resolve(path);
    if (!isDir(r.attr)) throw new FsError("ENOTDIR");
    if ((await this.readdir(path)).length > 0) throw new FsError("ENOTEMPTY");
    if (r.upper) await this.removeUpperDir(path);
    if (r.lower) await this.addWhiteout(path);
  }

  async rename(oldPath: string, newPath: string, flags: number): Promise<void> {
    if (flags & ~RENAME_FLAGS) throw new FsError("EINVAL");
    if (flags & 2) throw new FsError("EINVAL", "RENAME_EXCHANGE is not supported on overlay mounts");
    if (oldPath === "/" || newPath === "/") throw new FsError("EBUSY");
    const { name: newName } = splitPath(newPath);
    if (reserved(newName)) throw new FsError("EPERM");
    // Both parents first, then the names, as rename(2) resolves them.
    for (const p of [oldPath, newPath]) {
      if (!isDir((await this.resolve(splitPath(p).dir)).attr)) throw new FsError("ENOTDIR");
    }
    const src = await this.resolve(oldPath);
    const srcDir = isDir(src.attr);
    const dst = await this.tryResolve(newPath);
    // The order of Linux's checks (do_renameat2, then vfs_rename).
    if (flags & 1 && dst) throw new FsError("EEXIST");
    if (srcDir && newPath.startsWith(`${oldPath}/`)) throw new FsError("EINVAL");
    if (oldPath.startsWith(`${newPath}/`)) throw new FsError("ENOTEMPTY");
    if (dst) {
      if (oldPath === newPath) return;
      if (srcDir && !isDir(dst.attr)) throw new FsError("ENOTDIR");
      if (!srcDir && isDir(dst.attr)) throw new FsError("EISDIR");
      if (isDir(dst.attr) && (await this.readdir(newPath)).length > 0) throw new FsError("ENOTEMPTY");
    }
    if (srcDir && src.lower) throw new FsError("EXDEV", "directory from the host folder: copy instead");
    await this.copyUp(oldPath);
    await this.copyUp(splitPath(newPath).dir);
    if (dst?.upper && isDir(dst.attr)) {
      for (const e of await this.upper.readdir(newPath)) {
        if (reserved(e.name)) await this.upper.unlink(joinPath(newPath, e.name));
      }
    }
    const wh = this.whiteout(newPath);
    if (await tryGet(this.upper, wh)) await this.upper.unlink(wh);
    await this.upper.rename(oldPath, newPath, 0);
    if (src.lower) await this.addWhiteout(oldPath);
    if (srcDir && dst?.lower) {
      const f = await this.upper.create(joinPath(newPath, OPAQUE), O_WRONLY | O_CREAT, 0o600, ROOT);
      await f.release();
    }
  }

  async fsyncdir(path: string): Promise<void> {
    const r = await this.resolve(path);
    if (r.upper) await this.upper.fsyncdir?.(path);
  }

  async statfs(path: string): Promise<StatFs> {
    void path;
    return this.upper.statfs("/");
  }

  async getxattr(path: string, name: string): Promise<Buffer> {
    const r = await this.resolve(path);
    return r.upper ? this.upper.getxattr(path, name) : this.lower.getxattr(path, name);
  }

  async listxattr(path: string): Promise<string[]> {
    const r = await this.resolve(path);
    return r.upper ? this.upper.listxattr(path) : this.lower.listxattr(path);
  }

  async setxattr(path: string, name: string, value: Buffer, flags: number): Promise<void> {
    await this.copyUp(path);
    await this.upper.setxattr(path, name, value, flags);
  }

  async removexattr(path: string, name: string): Promise<void> {
    await this.copyUp(path);
    await this.upper.removexattr(path, name);
  }
}
