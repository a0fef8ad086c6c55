import { canonicalVfsOp, VFS_OPS, type VfsOp } from "../api/vfs-ops.ts";
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
 * VFS interception (Matchlock's `vfs.interception`): rules on file operations, applied in front of the
 * workspace's provider. A `before` rule (the default phase) whose ops and path glob match decides the
 * operation: `block` answers EPERM, `allow` lets it through (the first matching rule wins). After an
 * operation, `onEvent` gets a file event when events are on (`emit_events`) or an `after` rule matches.
 *
 * Paths are the guest's (the workspace path + the path inside it), matched with Go's filepath.Match
 * syntax (`*` and `?` never cross a `/`, `[a-z]`, `[^x]`, `\` escapes), as Matchlock does. The
 * matcher is hand-written: picomatch and minimatch implement shell globs (dotfiles not matched by `*`,
 * `**`, braces), which would make the same rule match differently than in Matchlock. (The SDK's
 * local callback rules do use minimatch: Matchlock's TypeScript SDK matches those that way.)
 */

export { VFS_OPS, type VfsOp } from "../api/vfs-ops.ts";

export interface VfsRule {
  name?: string;
  phase?: "before" | "after";
  ops?: string[];
  path?: string;
  action?: "allow" | "block";
  timeout_ms?: number;
}

export interface FileEvent {
  op: VfsOp;
  /** The guest path. */
  path: string;
  /** Bytes read or written, else the file's size after the op (0 when unknown). */
  size: number;
  mode: number;
  uid: number;
  gid: number;
}

export interface InterceptOptions {
  rules: VfsRule[];
  /** The guest path of the provider's root (the workspace), to match and report guest paths. */
  prefix: string;
  emitEvents?: boolean;
  onEvent?: (event: FileEvent) => void;
}

interface Compiled {
  before: boolean;
  ops: Set<VfsOp> | undefined;
  path: RegExp | undefined;
  block: boolean;
}

/** Go's filepath.Match pattern as a RegExp over a whole path; throws on a malformed pattern. */
export function globToRegExp(pattern: string): RegExp {
  let re = "^";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i] as string;
    if (c === "*") re += "[^/]*";
    else if (c === "?") re += "[^/]";
    else if (c === "\\") {
      const next = pattern[++i];
      if (next === undefined) throw new Error(`bad pattern ${JSON.stringify(pattern)}: trailing \\`);
      re += next.replace(/[.*+?^${}()|[\]\\/-]/g, "\\$&");
    } else if (c === "[") {
      const end = pattern.indexOf("]", i + 2);
      if (end < 0) throw new Error(`bad pattern ${JSON.stringify(pattern)}: unclosed [`);
      let body = pattern.slice(i + 1, end);
      const negate = body.startsWith("^");
      if (negate) body = body.slice(1);
      if (body === "") throw new Error(`bad pattern ${JSON.stringify(pattern)}: empty class`);
      re += `[${negate ? "^/" : ""}${body.replace(/[\]\\/]/g, "\\$&")}]`;
      i = end;
    } else {
      re += c.replace(/[.*+?^${}()|[\]\\/-]/g, "\\$&");
    }
  }
  return new RegExp(`${re}$`, "u");
}

/** Checks and compiles rules; errors name the rule and field. */
export function compileRules(rules: VfsRule[]): Compiled[] {
  return rules.map((r, i) => {
    const who = `vfs.interception.rules[${i}]${r.name ? ` (${r.name})` : ""}`;
    if (r.phase !== undefined && r.phase !== "before" && r.phase !== "after") {
      throw new Error(`${who}.phase: must be "before" or "after"`);
    }
    if (r.action !== undefined && r.action !== "allow" && r.action !== "block") {
      throw new Error(`${who}.action: must be "allow" or "block"`);
    }
    let ops: Set<VfsOp> | undefined;
    if (r.ops && r.ops.length > 0) {
      ops = new Set();
      for (const o of r.ops) {
        const op = canonicalVfsOp(o);
        if (op === undefined) {
          throw new Error(`${who}.ops: unknown op ${JSON.stringify(o)} (one of ${VFS_OPS.join(", ")})`);
        }
        ops.add(op);
      }
    }
    let path: RegExp | undefined;
    try {
      path = r.path ? globToRegExp(r.path) : undefined;
    } catch (e) {
      throw new Error(`${who}.path: ${(e as Error).message}`);
    }
    return { before: r.phase !== "after", ops, path, block: r.action === "block" };
  });
}

const O_ACCMODE = 3;
const O_TRUNC = 0o1000;

export class InterceptProvider implements Provider {
  private readonly inner: Provider;
  private readonly rules: Compiled[];
  private readonly prefix: string;
  private readonly emitEvents: boolean;
  private readonly onEvent: ((e: FileEvent) => void) | undefined;

  constructor(inner: Provider, options: InterceptOptions) {
    this.inner = inner;
    this.rules = compileRules(options.rules);
    this.prefix = options.prefix.replace(/\/+$/, "");
    this.emitEvents = options.emitEvents ?? false;
    this.onEvent = options.onEvent;
  }

  private guest(path: string): string {
    return path === "/" ? this.prefix || "/" : `${this.prefix}${path}`;
  }

  private matches(r: Compiled, op: VfsOp, guestPath: string): boolean {
    return (!r.ops || r.ops.has(op)) && (!r.path || r.path.test(guestPath));
  }

  /** Throws EPERM when the first before rule matching op on path blocks it. */
  private check(op: VfsOp, path: string): void {
    const g = this.guest(path);
    for (const r of this.rules) {
      if (!r.before || !this.matches(r, op, g)) continue;
      if (r.block) throw new FsError("EPERM", `blocked by a vfs interception rule: ${op} ${g}`);
      return;
    }
  }

  /** Runs fn unless a before rule blocks it; then reports the event. */
  private async run<T>(op: VfsOp, path: string, fn: () => Promise<T>, size?: (v: T) => number): Promise<T> {
    const g = this.guest(path);
    this.check(op, path);
    const v = await fn();
    if (this.onEvent && (this.emitEvents || this.rules.some((r) => !r.before && this.matches(r, op, g)))) {
      const a = await this.inner.getattr(path).catch(() => undefined);
      this.onEvent({
        op,
        path: g,
        size: size ? size(v) : (a?.size ?? 0),
        mode: a?.mode ?? 0,
        uid: a?.uid ?? 0,
        gid: a?.gid ?? 0,
      });
    }
    return v;
  }

  private wrap(path: string, file: FileHandle): FileHandle {
    return {
      read: (o, l) =>
        this.run(
          "read",
          path,
          () => file.read(o, l),
          (b) => b.length,
        ),
      write: (o, d) =>
        this.run(
          "write",
          path,
          () => file.write(o, d),
          (n) => n,
        ),
      getattr: () => file.getattr(),
      truncate: (s) => this.run("truncate", path, () => file.truncate(s)),
      fsync: (d) => this.run("sync", path, () => file.fsync(d)),
      release: () => this.run("close", path, () => file.release()),
      allocate: (m, o, l) => this.run("write", path, () => file.allocate(m, o, l)),
      seek: (o, w) => file.seek(o, w),
    };
  }

  getattr(path: string): Promise<Attr> {
    return this.run("stat", path, () => this.inner.getattr(path));
  }
  readdir(path: string): Promise<DirEntry[]> {
    return this.run("readdir", path, () => this.inner.readdir(path));
  }
  readlink(path: string): Promise<string> {
    return this.run("readlink", path, () => this.inner.readlink(path));
  }
  async open(path: string, flags: number): Promise<FileHandle> {
    const op: VfsOp = flags & O_TRUNC && (flags & O_ACCMODE) !== 0 ? "truncate" : "open";
    return this.wrap(path, await this.run(op, path, () => this.inner.open(path, flags)));
  }
  async create(path: string, flags: number, mode: number, caller: Caller): Promise<FileHandle> {
    return this.wrap(
      path,
      await this.run("create", path, () => this.inner.create(path, flags, mode, caller)),
    );
  }
  mkdir(path: string, mode: number, caller: Caller): Promise<void> {
    return this.run("mkdir", path, () => this.inner.mkdir(path, mode, caller));
  }
  mknod(path: string, mode: number, rdev: number, caller: Caller): Promise<void> {
    return this.run("create", path, () => this.inner.mknod(path, mode, rdev, caller));
  }
  symlink(target: string, path: string, caller: Caller): Promise<void> {
    return this.run("symlink", path, () => this.inner.symlink(target, path, caller));
  }
  link(oldPath: string, newPath: string): Promise<void> {
    return this.run("create", newPath, () => this.inner.link(oldPath, newPath));
  }
  unlink(path: string): Promise<void> {
    return this.run("remove", path, () => this.inner.unlink(path));
  }
  rmdir(path: string): Promise<void> {
    return this.run("remove", path, () => this.inner.rmdir(path));
  }
  async rename(oldPath: string, newPath: string, flags: number): Promise<void> {
    // Both names are checked: moving a file out of, or into, a guarded path.
    this.check("rename", oldPath);
    await this.run("rename", newPath, () => this.inner.rename(oldPath, newPath, flags));
  }
  async setattr(path: string, set: SetAttr, caller: Caller): Promise<void> {
    const other = Object.keys(set).some((k) => k !== "size");
    if (set.size !== undefined && other) this.check("chmod", path);
    await this.run(set.size !== undefined ? "truncate" : "chmod", path, () =>
      this.inner.setattr(path, set, caller),
    );
  }
  statfs(path: string): Promise<StatFs> {
    return this.inner.statfs(path);
  }
  getxattr(path: string, name: string): Promise<Buffer> {
    return this.run("stat", path, () => this.inner.getxattr(path, name));
  }
  listxattr(path: string): Promise<string[]> {
    return this.run("stat", path, () => this.inner.listxattr(path));
  }
  setxattr(path: string, name: string, value: Buffer, flags: number): Promise<void> {
    return this.run("chmod", path, () => this.inner.setxattr(path, name, value, flags));
  }
  removexattr(path: string, name: string): Promise<void> {
    return this.run("chmod", path, () => this.inner.removexattr(path, name));
  }
  async fsyncdir(path: string): Promise<void> {
    await this.run("sync", path, async () => this.inner.fsyncdir?.(path));
  }
  async close(): Promise<void> {
    await this.inner.close?.();
  }
}
