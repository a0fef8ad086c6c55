import { constants } from "node:os";
import {
  type Attr,
  attrOut,
  bodyReader,
  checkName,
  decodeUtf8,
  direntSize,
  direntType,
  ENTRY_OUT_SIZE,
  entryOut,
  Fattr,
  FUSE_GETATTR_FH,
  FUSE_KERNEL_VERSION,
  FUSE_MAX_MINOR,
  FUSE_MIN_MINOR,
  FUSE_ROOT_ID,
  FuseDecodeError,
  type InHeader,
  Init,
  initOut,
  notifyInvalEntry,
  notifyInvalInode,
  Op,
  openOut,
  outMessage,
  PATH_MAX,
  peekUnique,
  type Reader,
  readInHeader,
  readInitIn,
  S_IFDIR,
  S_IFMT,
  splitTimeout,
  statfsOut,
  u32Out,
  u64Out,
  writeDirent,
  writeEntryOut,
  XATTR_NAME_MAX,
  XATTR_SIZE_MAX,
} from "./fuse-abi.ts";
import {
  type Caller,
  type DirEntry,
  errnoOf,
  type FileHandle,
  FsError,
  joinPath,
  type Provider,
  type SetAttr,
} from "./provider.ts";

/**
 * The FUSE request dispatcher: one request message in (fuse_in_header + body, exactly the bytes the
 * guest kernel wrote to /dev/fuse), one reply message out (fuse_out_header + body), or nothing for
 * the requests that take no reply (FORGET, BATCH_FORGET, INTERRUPT). Transport-independent: the VM
 * relay (virtio-serial) and the test harness (/dev/fuse on the host) both call `handle`.
 *
 * Requests are answered concurrently (each `handle` is its own promise) and in any order: the kernel
 * matches replies by `unique`. The server keeps the node table (nodeid → parent + name, lookup
 * counts) and the handle table (fh → open file or directory snapshot); providers only see paths.
 *
 * Nodeids are never reused (a 64-bit counter), so every node has generation 1.
 */

export interface FuseServerOptions {
  provider: Provider;
  /** Seconds the kernel may cache a name → node answer (default 1: host folders change under us). */
  entryTimeout?: number;
  /** Seconds the kernel may cache "no such name" (default: entryTimeout; 0 answers ENOENT instead). */
  negativeTimeout?: number;
  /** Seconds the kernel may cache attributes (default 1). */
  attrTimeout?: number;
  /** Largest WRITE payload (default and maximum 128 KiB... up to 1 MiB). */
  maxWrite?: number;
  /** Bounds on the tables (a guest cannot grow them without limit): ENFILE / EMFILE past them. */
  maxNodes?: number;
  maxHandles?: number;
  /** Directory entries held for open directories, in total (ENOMEM past it). */
  maxDirEntries?: number;
  /** One line per unexpected host error (naming the op and path); default: stderr. */
  log?: (line: string) => void;
}

interface Node {
  id: bigint;
  parent: Node | undefined;
  name: string;
  lookups: number;
  /** S_IFMT bits when it was looked up: a name whose type changed gets a new node. */
  type: number;
  /** More names of the same file (hard links made through LINK); parent/name is the primary one. */
  aliases: { parent: Node; name: string }[] | undefined;
  /** Unlinked, replaced or detached: its path is no longer valid. */
  gone: boolean;
  children: Map<string, Node> | undefined;
}

type Handle =
  | { kind: "file"; file: FileHandle; node: Node }
  | { kind: "dir"; node: Node; entries: DirEntry[] | undefined };

const E = constants.errno;
const NO_REPLY = Symbol("no reply");
const GENERATION = 1n;
const MAX_READ = 1024 * 1024;
/** Errors that are ordinary answers, not worth a log line. */
const QUIET = new Set<number>([
  E.ENOENT,
  E.EEXIST,
  E.ENOTEMPTY,
  E.ENODATA,
  E.ENOTDIR,
  E.EISDIR,
  E.ENOSYS,
  E.ERANGE,
  E.EXDEV,
  E.EROFS,
  E.EINVAL,
  E.ENAMETOOLONG,
  E.EOPNOTSUPP,
  E.ENXIO,
  E.EBUSY,
]);
const OP_NAMES = new Map<number, string>(Object.entries(Op).map(([k, v]) => [v, k]));

/**
 * The guest controls names and how often errors happen: log lines get control characters escaped
 * (no forged lines or terminal escapes) and are limited to 50 per 10 s, then one line says how many
 * were dropped.
 */
function limitedLog(sink: (line: string) => void): (line: string) => void {
  let windowStart = 0;
  let count = 0;
  let dropped = 0;
  return (line) => {
    const now = Date.now();
    if (now - windowStart > 10_000) {
      if (dropped > 0) sink(`(${dropped} more lines dropped)`);
      windowStart = now;
      count = 0;
      dropped = 0;
    }
    if (++count > 50) {
      dropped++;
      return;
    }
    // biome-ignore lint/suspicious/noControlCharactersInRegex: escaping them is the point
    sink(line.replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`));
  };
}

/** An errno answer from inside a handler. */
class Reply extends Error {
  readonly errno: number;
  constructor(errno: number) {
    super(`errno ${errno}`);
    this.errno = errno;
  }
}

function fail(code: keyof typeof E): never {
  throw new Reply(E[code]);
}

/** Flags we ask for when the kernel offers them. Chosen, not copied: see docs/vfs.md. */
const WANTED_FLAGS =
  Init.ASYNC_READ |
  Init.BIG_WRITES |
  Init.AUTO_INVAL_DATA |
  Init.DO_READDIRPLUS |
  Init.READDIRPLUS_AUTO |
  Init.PARALLEL_DIROPS |
  Init.MAX_PAGES;

export class FuseServer {
  private readonly provider: Provider;
  private readonly entryTtl: number;
  private readonly attrTtl: number;
  private readonly negativeTtl: number;
  private readonly maxWrite: number;
  private readonly maxNodes: number;
  private readonly maxHandles: number;
  private readonly log: (line: string) => void;
  private readonly nodes = new Map<bigint, Node>();
  private readonly handles = new Map<bigint, Handle>();
  private readonly maxDirEntries: number;
  private cachedEntries = 0;
  private nextNode = 2n;
  private nextHandle = 1n;
  private initialized = false;
  private destroyed = false;
  /** The negotiated protocol minor (after INIT). */
  minor = 0;
  /** The INIT flags agreed on (after INIT). */
  flags = 0;

  constructor(options: FuseServerOptions) {
    this.provider = options.provider;
    this.entryTtl = options.entryTimeout ?? 1;
    this.attrTtl = options.attrTimeout ?? 1;
    this.negativeTtl = options.negativeTimeout ?? this.entryTtl;
    this.maxWrite = Math.min(Math.max(options.maxWrite ?? 128 * 1024, 4096), MAX_READ);
    this.maxNodes = options.maxNodes ?? 1_000_000;
    this.maxHandles = options.maxHandles ?? 65_536;
    this.maxDirEntries = options.maxDirEntries ?? 4_000_000;
    this.log = limitedLog(options.log ?? ((line) => process.stderr.write(`matchlock vfs: ${line}\n`)));
    this.nodes.set(FUSE_ROOT_ID, {
      id: FUSE_ROOT_ID,
      parent: undefined,
      name: "",
      lookups: 1,
      type: S_IFDIR,
      gone: false,
      children: new Map(),
      aliases: undefined,
    });
  }

  /** The largest request message the server accepts; the transport should not buffer more. */
  get maxMessageSize(): number {
    return this.maxWrite + 4096 + 256;
  }

  /** Counts for tests and diagnostics. */
  get stats(): { nodes: number; handles: number } {
    return { nodes: this.nodes.size, handles: this.handles.size };
  }

  /**
   * Answers one request. Never throws: a message too short to carry a `unique` is dropped
   * (undefined), anything else malformed gets EINVAL/EIO.
   */
  async handle(msg: Buffer): Promise<Buffer | undefined> {
    let h: InHeader;
    try {
      if (msg.length > this.maxMessageSize)
        throw new FuseDecodeError(`message of ${msg.length} bytes is too big`);
      h = readInHeader(msg);
    } catch (e) {
      const unique = peekUnique(msg);
      this.log(`dropped a malformed request: ${(e as Error).message}`);
      return unique === undefined ? undefined : outMessage(unique, -E.EIO);
    }
    try {
      const r = bodyReader(msg, h);
      const out = await this.dispatch(h, r);
      if (out === NO_REPLY) return undefined;
      return outMessage(h.unique, 0, out);
    } catch (e) {
      if (h.opcode === Op.FORGET || h.opcode === Op.BATCH_FORGET || h.opcode === Op.INTERRUPT)
        return undefined;
      return outMessage(h.unique, -this.errnoFor(e, h), undefined);
    }
  }

  private errnoFor(e: unknown, h: InHeader): number {
    if (e instanceof Reply) return e.errno;
    if (e instanceof FuseDecodeError) {
      this.log(`${OP_NAMES.get(h.opcode) ?? h.opcode}: malformed request: ${e.message}`);
      return E.EINVAL;
    }
    const errno = errnoOf(e);
    if (!QUIET.has(errno) || !(e instanceof FsError || typeof (e as { code?: unknown })?.code === "string")) {
      const node = this.nodes.get(h.nodeid);
      const where = node ? this.tryPath(node) : `node ${h.nodeid}`;
      this.log(`${OP_NAMES.get(h.opcode) ?? h.opcode} ${where}: ${(e as Error)?.message ?? String(e)}`);
    }
    return errno;
  }

  /**
   * Notifications telling the guest kernel to forget what it cached about `path` (a provider path,
   * e.g. a host file changed behind the guest's back): its attributes and pages if the kernel knows
   * the node, and the name in its parent directory. The transport writes them to the kernel like
   * replies (unique 0), never from inside a request's handling. Empty when the kernel knows nothing.
   */
  invalidate(path: string): Buffer[] {
    if (!this.initialized || this.destroyed) return [];
    const out: Buffer[] = [];
    let dir: Node | undefined = this.nodes.get(FUSE_ROOT_ID);
    const parts = path === "/" ? [] : path.slice(1).split("/");
    for (let i = 0; i < parts.length && dir; i++) {
      const name = parts[i] as string;
      if (i === parts.length - 1) out.push(notifyInvalEntry(dir.id, Buffer.from(name)));
      dir = dir.children?.get(name);
    }
    if (dir && this.nodes.has(dir.id)) out.unshift(notifyInvalInode(dir.id));
    return out;
  }

  /** Releases every open handle and the provider (the end of the session). */
  async close(): Promise<void> {
    const all = [...this.handles.values()];
    this.handles.clear();
    this.cachedEntries = 0;
    for (const hd of all) {
      if (hd.kind === "file") await hd.file.release().catch(() => {});
    }
    await this.provider.close?.().catch(() => {});
  }

  // ---- node table ----

  private tryPath(n: Node): string {
    try {
      return this.pathOf(n);
    } catch {
      return `(stale node ${n.id})`;
    }
  }

  private pathOf(n: Node): string {
    const parts: string[] = [];
    let at: Node | undefined = n;
    while (at && at.id !== FUSE_ROOT_ID) {
      if (at.gone) fail("ENOENT");
      parts.push(at.name);
      at = at.parent;
    }
    if (!at) fail("ENOENT");
    return parts.length === 0 ? "/" : `/${parts.reverse().join("/")}`;
  }

  private node(id: bigint): Node {
    const n = this.nodes.get(id);
    if (!n) fail("ENOENT");
    return n;
  }

  /** Drops every name of n: it is gone. */
  private detach(n: Node): void {
    for (const l of n.aliases ?? [])
      if (l.parent.children?.get(l.name) === n) l.parent.children.delete(l.name);
    n.aliases = undefined;
    n.gone = true;
    if (n.parent?.children?.get(n.name) === n) n.parent.children.delete(n.name);
  }

  /** Drops one name of n; n is gone when it has no name left. */
  private unlinkName(n: Node, parent: Node, name: string): void {
    if (parent.children?.get(name) === n) parent.children.delete(name);
    if (n.parent === parent && n.name === name) {
      const next = n.aliases?.shift();
      if (next) {
        n.parent = next.parent;
        n.name = next.name;
      } else {
        n.gone = true;
      }
    } else if (n.aliases) {
      n.aliases = n.aliases.filter((l) => !(l.parent === parent && l.name === name));
    }
  }

  /** Renames one name of n. */
  private moveName(n: Node, from: Node, oldName: string, to: Node, newName: string): void {
    if (from.children?.get(oldName) === n) from.children.delete(oldName);
    if (n.parent === from && n.name === oldName) {
      n.parent = to;
      n.name = newName;
    } else {
      for (const l of n.aliases ?? []) {
        if (l.parent === from && l.name === oldName) {
          l.parent = to;
          l.name = newName;
        }
      }
    }
    if (!to.children) to.children = new Map();
    to.children.set(newName, n);
  }

  /** The node for parent/name with these attributes, its lookup count raised by one. */
  private remember(parent: Node, name: string, attr: Attr): Node {
    const type = attr.mode & S_IFMT;
    let n = parent.children?.get(name);
    if (n && n.type !== type) {
      this.unlinkName(n, parent, name);
      n = undefined;
    }
    if (!n) {
      if (this.nodes.size >= this.maxNodes) fail("ENFILE");
      n = {
        id: this.nextNode++,
        parent,
        name,
        lookups: 0,
        type,
        gone: false,
        children: type === S_IFDIR ? new Map() : undefined,
        aliases: undefined,
      };
      if (!parent.children) parent.children = new Map();
      parent.children.set(name, n);
      this.nodes.set(n.id, n);
    } else if (!this.nodes.has(n.id)) {
      this.nodes.set(n.id, n);
    }
    n.lookups++;
    return n;
  }

  private forget(id: bigint, count: bigint): void {
    if (id === FUSE_ROOT_ID) return;
    const n = this.nodes.get(id);
    if (!n) return;
    n.lookups -= Number(count > 1_000_000_000n ? 1_000_000_000n : count);
    if (n.lookups > 0) return;
    this.nodes.delete(id);
    // Drop it from the tree, and any forgotten ancestor it was keeping there.
    let at: Node | undefined = n;
    while (
      at &&
      at.id !== FUSE_ROOT_ID &&
      !this.nodes.has(at.id) &&
      (!at.children || at.children.size === 0)
    ) {
      const parent: Node | undefined = at.parent;
      this.detach(at);
      at = parent;
    }
  }

  private negativeEntry(): Buffer {
    const b = Buffer.alloc(ENTRY_OUT_SIZE);
    const t = splitTimeout(this.negativeTtl);
    b.writeBigUInt64LE(t.sec, 16);
    b.writeUInt32LE(t.nsec, 32);
    return b;
  }

  private entry(parent: Node, name: string, attr: Attr): Buffer {
    const n = this.remember(parent, name, attr);
    return entryOut(n.id, GENERATION, attr, this.entryTtl, this.attrTtl);
  }

  private addHandle(hd: Handle): bigint {
    if (this.handles.size >= this.maxHandles) fail("EMFILE");
    const fh = this.nextHandle++;
    this.handles.set(fh, hd);
    return fh;
  }

  private fileHandle(fh: bigint): Handle & { kind: "file" } {
    const hd = this.handles.get(fh);
    if (hd?.kind !== "file") fail("EBADF");
    return hd;
  }

  private dirHandle(fh: bigint): Handle & { kind: "dir" } {
    const hd = this.handles.get(fh);
    if (hd?.kind !== "dir") fail("EBADF");
    return hd;
  }

  private name(r: Reader): string {
    const c = checkName(r.cbytes(PATH_MAX));
    if ("errno" in c) fail(c.errno);
    return c.name;
  }

  private caller(h: InHeader): Caller {
    return { uid: h.uid, gid: h.gid, pid: h.pid };
  }

  /** A directory node and the path of its child `name`. */
  private child(h: InHeader, name: string): { dir: Node; path: string } {
    const dir = this.node(h.nodeid);
    return { dir, path: joinPath(this.pathOf(dir), name) };
  }

  // ---- dispatch ----

  private async dispatch(h: InHeader, r: Reader): Promise<Buffer | Buffer[] | undefined | typeof NO_REPLY> {
    if (h.opcode === Op.INIT) return this.init(r);
    if (!this.initialized || this.destroyed) {
      if (h.opcode === Op.FORGET || h.opcode === Op.BATCH_FORGET || h.opcode === Op.INTERRUPT)
        return NO_REPLY;
      fail("EIO");
    }
    const p = this.provider;
    switch (h.opcode) {
      case Op.LOOKUP: {
        const name = this.name(r);
        const { dir, path } = this.child(h, name);
        let attr: Attr;
        try {
          attr = await p.getattr(path);
        } catch (e) {
          // A negative entry (nodeid 0) the kernel may cache: compilers and interpreters probe
          // many names that do not exist. The guest's own creates invalidate it at once.
          if (this.negativeTtl > 0 && errnoOf(e) === E.ENOENT) return this.negativeEntry();
          throw e;
        }
        return this.entry(dir, name, attr);
      }
      case Op.FORGET:
        this.forget(h.nodeid, r.u64());
        return NO_REPLY;
      case Op.BATCH_FORGET: {
        const count = r.u32();
        r.u32();
        for (let i = 0; i < count && r.remaining >= 16; i++) this.forget(r.u64(), r.u64());
        return NO_REPLY;
      }
      case Op.INTERRUPT:
        // Provider calls cannot be cancelled; the interrupted request is answered when it finishes
        // (allowed by the protocol, see man 4 fuse).
        return NO_REPLY;
      case Op.GETATTR: {
        const flags = r.u32();
        r.u32();
        const fh = r.u64();
        const node = this.node(h.nodeid);
        if (flags & FUSE_GETATTR_FH) {
          const hd = this.handles.get(fh);
          if (hd?.kind === "file") return attrOut(await hd.file.getattr(), this.attrTtl);
        }
        return attrOut(await p.getattr(this.pathOf(node)), this.attrTtl);
      }
      case Op.SETATTR:
        return this.setattr(h, r);
      case Op.READLINK: {
        const target = await p.readlink(this.pathOf(this.node(h.nodeid)));
        return Buffer.from(target);
      }
      case Op.SYMLINK: {
        const name = this.name(r);
        const target = decodeUtf8(r.cbytes(PATH_MAX));
        if (target === undefined || target === "") fail("EINVAL");
        const { dir, path } = this.child(h, name);
        await p.symlink(target, path, this.caller(h));
        return this.entry(dir, name, await p.getattr(path));
      }
      case Op.MKNOD: {
        const mode = r.u32();
        const rdev = r.u32();
        r.u32(); // umask (applied by the kernel: DONT_MASK is not negotiated)
        r.u32();
        const name = this.name(r);
        const { dir, path } = this.child(h, name);
        await p.mknod(path, mode, rdev, this.caller(h));
        return this.entry(dir, name, await p.getattr(path));
      }
      case Op.MKDIR: {
        const mode = r.u32();
        r.u32();
        const name = this.name(r);
        const { dir, path } = this.child(h, name);
        await p.mkdir(path, mode, this.caller(h));
        return this.entry(dir, name, await p.getattr(path));
      }
      case Op.UNLINK:
      case Op.RMDIR: {
        const name = this.name(r);
        const { dir, path } = this.child(h, name);
        if (h.opcode === Op.UNLINK) await p.unlink(path);
        else await p.rmdir(path);
        const n = dir.children?.get(name);
        if (n) this.unlinkName(n, dir, name);
        return undefined;
      }
      case Op.RENAME:
      case Op.RENAME2: {
        const newdir = r.u64();
        const flags = h.opcode === Op.RENAME2 ? r.u32() : 0;
        if (h.opcode === Op.RENAME2) r.u32();
        const oldName = this.name(r);
        const newName = this.name(r);
        const from = this.node(h.nodeid);
        const to = this.node(newdir);
        await p.rename(joinPath(this.pathOf(from), oldName), joinPath(this.pathOf(to), newName), flags);
        this.renamed(from, oldName, to, newName, flags);
        return undefined;
      }
      case Op.LINK: {
        const old = this.node(r.u64());
        const name = this.name(r);
        const { dir, path } = this.child(h, name);
        if (old.type === S_IFDIR) fail("EPERM");
        await p.link(this.pathOf(old), path);
        const attr = await p.getattr(path);
        // The new name is the same file: answer with the old node, so the kernel updates that
        // inode (its link count) instead of making a second one.
        const stale = dir.children?.get(name);
        if (stale) this.unlinkName(stale, dir, name);
        if (!this.nodes.has(old.id) || old.gone) return this.entry(dir, name, attr);
        if (!old.aliases) old.aliases = [];
        if (old.aliases.length < 64) {
          old.aliases.push({ parent: dir, name });
          if (!dir.children) dir.children = new Map();
          dir.children.set(name, old);
        }
        old.lookups++;
        return entryOut(old.id, GENERATION, attr, this.entryTtl, this.attrTtl);
      }
      case Op.OPEN: {
        const flags = r.u32();
        const node = this.node(h.nodeid);
        const file = await p.open(this.pathOf(node), flags);
        return openOut(this.addFile(file, node), 0);
      }
      case Op.CREATE: {
        const flags = r.u32();
        const mode = r.u32();
        r.u32(); // umask
        r.u32(); // open_flags
        const name = this.name(r);
        const { dir, path } = this.child(h, name);
        const file = await p.create(path, flags, mode, this.caller(h));
        let attr: Attr;
        try {
          attr = await file.getattr();
        } catch (e) {
          await file.release().catch(() => {});
          throw e;
        }
        // The handle first: if the table is full, no lookup has been counted for a failed reply.
        const fh = this.addFile(file, dir);
        let n: Node;
        try {
          n = this.remember(dir, name, attr);
        } catch (e) {
          this.handles.delete(fh);
          await file.release().catch(() => {});
          throw e;
        }
        const hd = this.handles.get(fh);
        if (hd?.kind === "file") hd.node = n;
        return [entryOut(n.id, GENERATION, attr, this.entryTtl, this.attrTtl), openOut(fh, 0)];
      }
      case Op.READ: {
        const fh = r.u64();
        const offset = r.u64n();
        const size = Math.min(r.u32(), MAX_READ);
        return this.fileHandle(fh).file.read(offset, size);
      }
      case Op.WRITE: {
        const fh = r.u64();
        const offset = r.u64n();
        const size = r.u32();
        r.skip(4 + 8 + 4 + 4); // write_flags, lock_owner, flags, padding
        if (size > this.maxWrite) fail("EINVAL");
        const data = r.bytes(size);
        return u32Out(await this.fileHandle(fh).file.write(offset, data));
      }
      case Op.STATFS:
        return statfsOut(await p.statfs(this.pathOf(this.node(h.nodeid))));
      case Op.RELEASE: {
        const fh = r.u64();
        const hd = this.fileHandle(fh);
        this.handles.delete(fh);
        await hd.file.release();
        return undefined;
      }
      case Op.FLUSH:
        // Sent on every close(2), which waits for the answer: a synchronous round trip per close
        // for nothing, since providers write through (no buffered data or deferred error to report).
        // ENOSYS makes the kernel stop sending FLUSH on this connection (fc->no_flush).
        throw new Reply(E.ENOSYS);
      case Op.FSYNC: {
        const fh = r.u64();
        const flags = r.u32();
        await this.fileHandle(fh).file.fsync((flags & 1) !== 0);
        return undefined;
      }
      case Op.SETXATTR: {
        const size = r.u32();
        const flags = r.u32();
        if (this.flags & Init.SETXATTR_EXT) r.skip(8);
        const name = this.xattrName(r);
        if (size > XATTR_SIZE_MAX) fail("E2BIG");
        const value = r.bytes(size);
        await p.setxattr(this.pathOf(this.node(h.nodeid)), name, Buffer.from(value), flags);
        return undefined;
      }
      case Op.GETXATTR: {
        const size = r.u32();
        r.u32();
        const name = this.xattrName(r);
        const value = await p.getxattr(this.pathOf(this.node(h.nodeid)), name);
        if (size === 0) return u32Out(value.length);
        if (value.length > size) fail("ERANGE");
        return value;
      }
      case Op.LISTXATTR: {
        const size = r.u32();
        const names = await p.listxattr(this.pathOf(this.node(h.nodeid)));
        const list = Buffer.from(names.map((n) => `${n}\0`).join(""));
        if (size === 0) return u32Out(list.length);
        if (list.length > size) fail("ERANGE");
        return list;
      }
      case Op.REMOVEXATTR: {
        const name = this.xattrName(r);
        await p.removexattr(this.pathOf(this.node(h.nodeid)), name);
        return undefined;
      }
      case Op.OPENDIR: {
        r.u32(); // flags
        const node = this.node(h.nodeid);
        const attr = await p.getattr(this.pathOf(node));
        if ((attr.mode & S_IFMT) !== S_IFDIR) fail("ENOTDIR");
        return openOut(this.addHandle({ kind: "dir", node, entries: undefined }), 0);
      }
      case Op.READDIR:
      case Op.READDIRPLUS:
        return this.readdir(h, r);
      case Op.RELEASEDIR: {
        const fh = r.u64();
        const hd = this.dirHandle(fh);
        this.cachedEntries -= hd.entries?.length ?? 0;
        this.handles.delete(fh);
        return undefined;
      }
      case Op.FSYNCDIR: {
        // git and editors fsync the directory after a rename to make it durable.
        const node = this.node(h.nodeid);
        await p.fsyncdir?.(this.pathOf(node));
        return undefined;
      }
      case Op.SYNCFS:
        return undefined;
      case Op.ACCESS: {
        // The mount uses default_permissions (the guest kernel checks modes); only existence here.
        r.u32(); // mask
        await p.getattr(this.pathOf(this.node(h.nodeid)));
        return undefined;
      }
      case Op.FALLOCATE: {
        const fh = r.u64();
        const offset = r.u64n();
        const length = r.u64n();
        const mode = r.u32();
        await this.fileHandle(fh).file.allocate(mode, offset, length);
        return undefined;
      }
      case Op.LSEEK: {
        const fh = r.u64();
        const offset = r.u64n();
        const whence = r.u32();
        if (whence !== 3 && whence !== 4) fail("EINVAL");
        return u64Out(BigInt(await this.fileHandle(fh).file.seek(offset, whence)));
      }
      case Op.DESTROY:
        this.destroyed = true;
        await this.close();
        return undefined;
      default:
        // GETLK/SETLK/SETLKW (POSIX_LOCKS and FLOCK_LOCKS not negotiated: the guest kernel locks
        // locally), IOCTL, POLL, BMAP, COPY_FILE_RANGE (the kernel falls back to read+write),
        // TMPFILE, STATX, anything newer.
        fail("ENOSYS");
    }
  }

  private addFile(file: FileHandle, node: Node): bigint {
    try {
      return this.addHandle({ kind: "file", file, node });
    } catch (e) {
      void file.release().catch(() => {});
      throw e;
    }
  }

  private xattrName(r: Reader): string {
    const raw = r.cbytes(XATTR_NAME_MAX + 1);
    const name = decodeUtf8(raw);
    if (name === undefined || name === "") fail("EINVAL");
    if (raw.length > XATTR_NAME_MAX) fail("ERANGE");
    return name;
  }

  private init(r: Reader): Buffer {
    const init = readInitIn(r);
    if (init.major > FUSE_KERNEL_VERSION) {
      // A newer major: answer with ours only; the kernel re-sends INIT in our major.
      return initOut({
        major: FUSE_KERNEL_VERSION,
        minor: FUSE_MAX_MINOR,
        maxReadahead: 0,
        flags: 0,
        maxBackground: 0,
        congestionThreshold: 0,
        maxWrite: 0,
        timeGran: 0,
        maxPages: 0,
      });
    }
    if (init.major < FUSE_KERNEL_VERSION || init.minor < FUSE_MIN_MINOR) fail("EPROTO");
    this.minor = Math.min(init.minor, FUSE_MAX_MINOR);
    this.flags = init.flags & WANTED_FLAGS;
    this.initialized = true;
    this.destroyed = false;
    return initOut({
      major: FUSE_KERNEL_VERSION,
      minor: this.minor,
      maxReadahead: Math.min(init.maxReadahead, 128 * 1024),
      flags: this.flags,
      maxBackground: 16,
      congestionThreshold: 12,
      maxWrite: this.maxWrite,
      timeGran: 1,
      maxPages: Math.ceil(this.maxWrite / 4096),
    });
  }

  private async setattr(h: InHeader, r: Reader): Promise<Buffer> {
    const valid = r.u32();
    r.u32();
    const fh = r.u64();
    const size = r.u64n();
    r.u64(); // lock_owner
    const atime = r.u64();
    const mtime = r.u64();
    r.u64(); // ctime
    const atimensec = r.u32();
    const mtimensec = r.u32();
    r.u32(); // ctimensec
    const mode = r.u32();
    r.u32();
    const uid = r.u32();
    const gid = r.u32();
    const node = this.node(h.nodeid);
    const hd = valid & Fattr.FH ? this.handles.get(fh) : undefined;
    const file = hd?.kind === "file" ? hd.file : undefined;
    const set: SetAttr = {};
    if (valid & Fattr.MODE) set.mode = mode & 0o7777;
    if (valid & Fattr.UID) set.uid = uid;
    if (valid & Fattr.GID) set.gid = gid;
    const time = (sec: bigint, nsec: number) => {
      if (nsec >= 1e9) fail("EINVAL");
      return { sec: Number(BigInt.asIntN(64, sec)), nsec };
    };
    if (valid & Fattr.ATIME_NOW) set.atime = "now";
    else if (valid & Fattr.ATIME) set.atime = time(atime, atimensec);
    if (valid & Fattr.MTIME_NOW) set.mtime = "now";
    else if (valid & Fattr.MTIME) set.mtime = time(mtime, mtimensec);
    if (valid & Fattr.SIZE) {
      if (file) await file.truncate(size);
      else set.size = size;
    }
    if (Object.keys(set).length > 0) await this.provider.setattr(this.pathOf(node), set, this.caller(h));
    const attr = file ? await file.getattr() : await this.provider.getattr(this.pathOf(node));
    return attrOut(attr, this.attrTtl);
  }

  private renamed(from: Node, oldName: string, to: Node, newName: string, flags: number): void {
    const moving = from.children?.get(oldName);
    const target = to.children?.get(newName);
    if (flags & 2) {
      // RENAME_EXCHANGE: the two names swap files.
      if (moving) from.children?.delete(oldName);
      if (target) to.children?.delete(newName);
      if (moving) this.moveName(moving, from, oldName, to, newName);
      if (target) this.moveName(target, to, newName, from, oldName);
      return;
    }
    if (target && target !== moving) this.unlinkName(target, to, newName);
    if (moving) this.moveName(moving, from, oldName, to, newName);
  }

  private async readdir(h: InHeader, r: Reader): Promise<Buffer> {
    const fh = r.u64();
    const offset = r.u64n();
    const size = Math.min(r.u32(), MAX_READ);
    const hd = this.dirHandle(fh);
    const plus = h.opcode === Op.READDIRPLUS;
    const dirPath = this.pathOf(hd.node);
    if (offset === 0 || hd.entries === undefined) {
      const listed = await this.provider.readdir(dirPath);
      // Listings are kept per open directory until RELEASEDIR: bounded in total, since a guest can
      // hold many handles open on a big directory.
      this.cachedEntries -= hd.entries?.length ?? 0;
      hd.entries = undefined;
      if (this.cachedEntries + listed.length + 2 > this.maxDirEntries) fail("ENOMEM");
      hd.entries = [{ name: ".", type: S_IFDIR }, { name: "..", type: S_IFDIR }, ...listed];
      this.cachedEntries += hd.entries.length;
    }
    const entries = hd.entries;
    const out = Buffer.alloc(size);
    let at = 0;
    for (let i = offset; i < entries.length; i++) {
      const e = entries[i] as DirEntry;
      const name = Buffer.from(e.name);
      const off = BigInt(i + 1);
      if (!plus) {
        const need = direntSize(name.length);
        if (at + need > size) break;
        at += writeDirent(out, at, e.ino ?? 0xffffffffn, off, direntType(e.type), name);
        continue;
      }
      const need = ENTRY_OUT_SIZE + direntSize(name.length);
      if (at + need > size) break;
      if (e.name === "." || e.name === "..") {
        // The kernel ignores the entry part of "." and ".." (no lookup is counted).
        out.fill(0, at, at + ENTRY_OUT_SIZE);
        at += ENTRY_OUT_SIZE;
        at += writeDirent(out, at, e.ino ?? 0xffffffffn, off, direntType(S_IFDIR), name);
        continue;
      }
      let attr: Attr;
      try {
        attr = await this.provider.getattr(joinPath(dirPath, e.name));
      } catch {
        continue; // gone since the listing: skip it
      }
      if (hd.node.gone) break; // removed meanwhile: send what is counted so far
      let n: Node;
      try {
        n = this.remember(hd.node, e.name, attr);
      } catch {
        break;
      }
      writeEntryOut(out, at, n.id, GENERATION, attr, this.entryTtl, this.attrTtl);
      at += ENTRY_OUT_SIZE;
      at += writeDirent(out, at, attr.ino, off, direntType(attr.mode), name);
    }
    return out.subarray(0, at);
  }
}
