import { execFile } from "node:child_process";
import { constants, createReadStream, readdirSync, realpathSync } from "node:fs";
import { type FileHandle, lchown, link, lutimes, mkdir, open, realpath, rm, symlink } from "node:fs/promises";
import { join, posix } from "node:path";
import { pipeline, type Readable } from "node:stream";
import { promisify } from "node:util";
import { createGunzip, createZstdDecompress } from "node:zlib";
import * as tar from "tar-stream";
import { InvalidArgumentError, MatchlockError, messageOf } from "../api/errors.ts";
import { MalformedTarError, PaxXattrScanner, type RawXattr } from "./pax.ts";

/**
 * The hardened layer applier: OCI/Docker layer tars → a root filesystem directory for `mkfs.ext4 -d`.
 * Layers are hostile input. Every name is normalised and checked, and an in-memory tree of what we
 * created (authoritative: nothing else writes in the staging dir) rejects any entry whose parent path
 * crosses a symlink. As a second line, every parent dir is checked with realpath before we touch it,
 * and leaves are created with O_EXCL/O_NOFOLLOW (or syscalls that never follow a final symlink), so
 * even a bug in the tree cannot write through a link. Symlink targets are stored verbatim and never
 * resolved on the host: they belong to the guest.
 */

export interface ApplyLimits {
  maxBytes: number;
  maxEntries: number;
  maxPathBytes: number;
}
export const DEFAULT_LIMITS: ApplyLimits = {
  maxBytes: 32 * 1024 ** 3,
  maxEntries: 1_000_000,
  maxPathBytes: 4096,
};

export interface SkippedEntry {
  layer: string;
  path: string;
  reason: string;
}
export interface RecordedXattr {
  path: string;
  name: string;
  value: Buffer;
}

/** `sha256:<64 hex>` reads better in one line as `sha256:<12 hex>…`. */
function shortLayer(name: string): string {
  const m = /^([a-z0-9]+):([0-9a-f]{16,})$/.exec(name);
  return m ? `${m[1]}:${m[2]?.slice(0, 12)}…` : name;
}

export class ImageRejectedError extends MatchlockError {
  readonly layer: string;
  readonly entry: string | undefined;
  readonly rule: string;
  constructor(layer: string, entry: string | undefined, rule: string) {
    const where = entry === undefined ? "" : `entry ${JSON.stringify(entry)}: `;
    super("INVALID_ARGUMENT", `layer ${shortLayer(layer)}: ${where}${rule}`, {
      hint: "the image holds an entry matchlock refuses to unpack; use another image or rebuild it without it",
    });
    this.name = "ImageRejectedError";
    this.layer = layer;
    this.entry = entry;
    this.rule = rule;
  }
}

type Kind = "dir" | "file" | "symlink" | "fifo";
interface Node {
  kind: Kind;
  /** The last layer that created or touched this path: whiteouts and opaque dirs only hide lower layers. */
  layer: number;
  children?: Map<string, Node>;
  xattrs?: Array<{ name: string; value: Buffer }>;
}
type Entry = AsyncIterable<unknown> & { header: tar.Header };
type Fail = (rule: string) => ImageRejectedError;
interface Meta {
  mode: number;
  uid: number;
  gid: number;
  mtime: Date;
}

const { O_WRONLY, O_RDONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_DIRECTORY, O_NONBLOCK } = constants;
const WH = ".wh.";
const OPAQUE = ".wh..wh..opq";
const MAX_ID = 2 ** 32 - 2; // (uid_t)-1 means "leave unchanged" to chown
// biome-ignore lint/suspicious/noControlCharactersInRegex: rejecting control characters is the point
const CONTROL = /[\u0000-\u001f\u007f]/;
/**
 * Xattr names reach setfattr's line-based dump format (xattrs.ts): a newline in a name could forge a
 * `# file: /host/path` line and set attributes (file capabilities!) on host files. Real names are
 * printable ASCII (`user.x`, `security.capability`); anything else is dropped with a note.
 */
const XATTR_NAME = /^[!-<>-~]{1,255}$/;
const KNOWN_TYPES = new Set(
  "file contiguous-file directory symlink link fifo character-device block-device".split(" "),
);
const execFileP = promisify(execFile);
const ROOT_META: Omit<Meta, "mtime"> = { mode: 0o755, uid: 0, gid: 0 };

export class RootfsBuilder {
  readonly skipped: SkippedEntry[] = [];
  readonly stats = { entries: 0, bytes: 0 };
  private readonly root: string;
  private readonly limits: ApplyLimits;
  private readonly tree: Node = { kind: "dir", layer: 0, children: new Map() };
  private layers = 0;
  private busy = false;
  /** The raw view of the layer being applied (pax xattr bytes, entry offsets), by entry ordinal. */
  private scanner = new PaxXattrScanner();
  private ordinal = 0;

  constructor(stagingDir: string, limits?: Partial<ApplyLimits>) {
    this.root = realpathSync(stagingDir); // every later realpath check compares against this
    if (readdirSync(this.root).length > 0)
      throw new InvalidArgumentError(`staging dir ${stagingDir} is not empty`);
    this.limits = { ...DEFAULT_LIMITS, ...limits };
  }

  /** Extended attributes seen in pax headers (no Node API sets them); a later step may apply them. */
  get xattrs(): RecordedXattr[] {
    const out: RecordedXattr[] = [];
    const walk = (node: Node, path: string) => {
      for (const x of node.xattrs ?? []) out.push({ path: path || ".", ...x });
      for (const [name, child] of node.children ?? []) walk(child, path ? `${path}/${name}` : name);
    };
    walk(this.tree, "");
    return out;
  }

  /** Applies one decompressed layer tar on top of the previous ones. Layers go one at a time, in order. */
  async applyLayer(input: NodeJS.ReadableStream, layerName: string): Promise<void> {
    if (this.busy) throw new MatchlockError("INTERNAL", "RootfsBuilder.applyLayer called concurrently");
    this.busy = true;
    const layer = ++this.layers;
    const dirTimes = new Map<string, Date>(); // set last: creating children would bump them again
    const ex = tar.extract();
    const src = input as Readable;
    // The scanner sees the raw bytes first and keeps binary xattr values tar-stream would mangle.
    const scanner = new PaxXattrScanner();
    this.scanner = scanner;
    this.ordinal = 0;
    src.on("error", (e) => ex.destroy(e));
    scanner.on("error", (e) => ex.destroy(e));
    src.pipe(scanner).pipe(ex as unknown as NodeJS.WritableStream);
    try {
      for await (const entry of ex as AsyncIterable<Entry>)
        await this.applyEntry(entry, layerName, layer, dirTimes);
      for (const [rel, mtime] of dirTimes) {
        const node = this.lookup(rel === "" ? [] : rel.split("/"));
        if (node?.kind !== "dir") continue;
        const abs = join(this.root, rel);
        await this.verifyDir(
          abs,
          () => new ImageRejectedError(layerName, rel, "directory moved under a symlink"),
        );
        await withFd(abs, O_RDONLY | O_DIRECTORY, (fh) => fh.utimes(mtime, mtime));
      }
    } catch (e) {
      // Our rules and host fs errors (ENOSPC…) pass through; anything else came from the tar parser or zlib.
      if (e instanceof MalformedTarError)
        throw new ImageRejectedError(layerName, undefined, `malformed layer: ${e.message}`);
      if (e instanceof MatchlockError || (e as { syscall?: unknown }).syscall !== undefined) throw e;
      throw new ImageRejectedError(layerName, undefined, `malformed layer: ${messageOf(e)}`);
    } finally {
      src.destroy?.();
      this.busy = false;
    }
  }

  private async applyEntry(entry: Entry, layerName: string, layer: number, dirTimes: Map<string, Date>) {
    const h = entry.header;
    const fail: Fail = (rule) => new ImageRejectedError(layerName, h.name, rule);
    const raw = this.scanner.scanned(this.ordinal++);
    // tar-stream sets byteOffset (not in its types). Both readers must find this entry's data at the
    // same byte, or the headers can be read two ways and the xattrs we kept may belong to another entry.
    if (raw === undefined || raw.offset !== (h as tar.Header & { byteOffset?: number }).byteOffset)
      throw fail("malformed layer: its tar headers can be read two ways");
    if (++this.stats.entries > this.limits.maxEntries) {
      throw fail(`too many entries (limit maxEntries = ${this.limits.maxEntries})`);
    }
    const comps = this.parsePath(h.name, fail, "name");
    const name = comps.at(-1);
    const type = h.type as string | null;

    if (name?.startsWith(WH)) {
      await this.whiteout(comps, layerName, layer, fail);
      return this.drain(entry, fail);
    }
    if (!KNOWN_TYPES.has(type ?? ""))
      throw fail(`unsupported entry type ${JSON.stringify(type ?? "unknown typeflag")}`);
    if (name === undefined && type !== "directory") throw fail("entry replaces the root directory");
    if (type === "character-device" || type === "block-device") {
      // Neutralised: never created, but it still replaces what a lower layer had at that path.
      const parent = await this.walk(comps.slice(0, -1), fail, "parent", undefined);
      if (parent?.children?.has(name as string)) await this.remove(parent, comps, fail);
      this.skipped.push({ layer: layerName, path: comps.join("/"), reason: "device node" });
      return this.drain(entry, fail);
    }
    const meta = this.meta(h, fail);
    const xattrs = this.xattrsOf(h, layerName, comps, raw.xattrs);

    if (name === undefined) {
      // "./": the root itself. Only its metadata can change.
      await withFd(this.root, O_RDONLY | O_DIRECTORY, (fh) => setOwnerMode(fh, meta));
      dirTimes.set("", meta.mtime);
      this.tree.xattrs = xattrs;
      return this.drain(entry, fail);
    }

    // Validate link targets before anything is removed, so a rejected entry changes nothing.
    let target: string[] | undefined;
    if (type === "link") {
      target = this.parsePath(h.linkname ?? "", fail, "hardlink target");
      if (comps.every((c, i) => target?.[i] === c))
        throw fail("hardlink to itself or into the path it replaces");
      const tDir = await this.walk(target.slice(0, -1), fail, "hardlink target", undefined);
      const t = tDir?.children?.get(target.at(-1) ?? "");
      if (t?.kind !== "file") throw fail("hardlink target is not an earlier regular file of the image");
    } else if (type === "symlink") {
      const l = h.linkname ?? "";
      if (l === "" || CONTROL.test(l)) throw fail("symlink target is empty or has a control character");
      // symlink(2) takes at most PATH_MAX - 1 bytes.
      const max = Math.min(this.limits.maxPathBytes, 4095);
      if (Buffer.byteLength(l) > max) throw fail(`symlink target longer than ${max} bytes`);
    }

    const parent = (await this.walk(comps.slice(0, -1), fail, "parent", layer)) as Node;
    const abs = join(this.root, ...comps);
    const existing = parent.children?.get(name);
    if (existing?.kind === "dir" && type === "directory") {
      // A dir over a dir keeps the contents and takes the new metadata.
      await withFd(abs, O_RDONLY | O_DIRECTORY, (fh) => setOwnerMode(fh, meta));
      dirTimes.set(comps.join("/"), meta.mtime);
      existing.layer = layer;
      existing.xattrs = xattrs;
      return this.drain(entry, fail);
    }
    if (existing) await this.remove(parent, comps, fail);

    let kind: Kind;
    switch (type) {
      case "directory":
        kind = "dir";
        await mkdir(abs, 0o700);
        await withFd(abs, O_RDONLY | O_DIRECTORY, (fh) => setOwnerMode(fh, meta));
        dirTimes.set(comps.join("/"), meta.mtime);
        break;
      case "symlink":
        kind = "symlink";
        await symlink(h.linkname as string, abs); // verbatim; symlink(2) never follows the new name
        await lchown(abs, meta.uid, meta.gid);
        await lutimes(abs, meta.mtime, meta.mtime);
        break;
      case "link": {
        kind = "file";
        const tAbs = join(this.root, ...(target as string[]));
        await this.verifyDir(join(tAbs, ".."), fail);
        await link(tAbs, abs); // link(2) does not dereference a symlink source on Linux
        break;
      }
      case "fifo":
        kind = "fifo";
        try {
          await execFileP("mkfifo", ["-m", "600", "--", abs]);
        } catch (e) {
          this.skipped.push({ layer: layerName, path: comps.join("/"), reason: `fifo: ${messageOf(e)}` });
          return this.drain(entry, fail);
        }
        // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        await withFd(abs, O_RDONLY | O_NONBLOCK, async (fh) => {
          await setOwnerMode(fh, meta);
          await fh.utimes(meta.mtime, meta.mtime);
        });
        break;
      default: {
        kind = "file";
        const size = h.size ?? 0;
        if (this.stats.bytes + size > this.limits.maxBytes) throw this.tooBig(fail);
        await withFd(abs, O_WRONLY | O_CREAT | O_EXCL, async (fh) => {
          await this.drain(entry, fail, fh); // streamed chunk by chunk, never buffered whole
          await setOwnerMode(fh, meta);
          await fh.utimes(meta.mtime, meta.mtime);
        });
      }
    }
    const node: Node = { kind, layer };
    if (kind === "dir") node.children = new Map();
    if (xattrs) node.xattrs = xattrs;
    parent.children?.set(name, node);
    if (kind !== "file" || type === "link") await this.drain(entry, fail);
  }

  /** `.wh.NAME` hides NAME of lower layers; `.wh..wh..opq` hides everything lower in its dir. */
  private async whiteout(comps: string[], layerName: string, layer: number, fail: Fail) {
    const base = comps.at(-1) as string;
    const dirComps = comps.slice(0, -1);
    const dir = await this.walk(dirComps, fail, "whiteout parent", undefined);
    if (base.startsWith(`${WH}${WH}`)) {
      if (base !== OPAQUE) {
        this.skipped.push({ layer: layerName, path: comps.join("/"), reason: "aufs metadata" });
        return;
      }
      const clear = async (node: Node, at: string[]) => {
        for (const [n, child] of [...(node.children ?? [])]) {
          if (child.layer < layer) await this.remove(node, [...at, n], fail);
          else if (child.kind === "dir") await clear(child, [...at, n]);
        }
      };
      if (dir) await clear(dir, dirComps);
      return;
    }
    const victim = base.slice(WH.length);
    if (victim === "" || victim === "." || victim === "..") throw fail("invalid whiteout name");
    const node = dir?.children?.get(victim);
    if (dir && node && node.layer < layer) await this.remove(dir, [...dirComps, victim], fail);
  }

  /** A tar name → path components under the root ([] = the root), or a rejection naming the rule. */
  private parsePath(raw: string, fail: Fail, what: string): string[] {
    if (raw === "") throw fail(`empty ${what}`);
    if (CONTROL.test(raw)) throw fail(`${what} contains a control character (NUL, newline…)`);
    // normalize("/"+raw) would silently clamp "/../x" to "/x": count the depth first.
    let depth = 0;
    for (const c of raw.split("/")) {
      if (c === "..") depth--;
      else if (c !== "" && c !== ".") depth++;
      if (depth < 0) throw fail(`path escapes the root ("..")`);
    }
    const comps = posix
      .normalize(`/${raw}`)
      .split("/")
      .filter((c) => c !== "");
    if (comps.some((c) => Buffer.byteLength(c) > 255)) throw fail("path component longer than 255 bytes");
    if (Buffer.byteLength(comps.join("/")) > this.limits.maxPathBytes) {
      throw fail(`path longer than maxPathBytes (${this.limits.maxPathBytes})`);
    }
    return comps;
  }

  /**
   * Walks to the node at `comps`, refusing to cross a symlink or a non-directory. With `createLayer`
   * set, missing dirs are created (0755 root) and every dir on the way is marked as touched by that
   * layer; without it, a missing component yields undefined.
   */
  private async walk(comps: string[], fail: Fail, what: string, createLayer: number | undefined) {
    let node = this.tree;
    for (let i = 0; i < comps.length; i++) {
      const c = comps[i] as string;
      let next = node.children?.get(c);
      if (next === undefined) {
        if (createLayer === undefined) return undefined;
        const abs = join(this.root, ...comps.slice(0, i + 1));
        await this.verifyDir(join(abs, ".."), fail);
        await mkdir(abs);
        await withFd(abs, O_RDONLY | O_DIRECTORY, (fh) => setOwnerMode(fh, ROOT_META));
        next = { kind: "dir", layer: createLayer, children: new Map() };
        node.children?.set(c, next);
      }
      if (next.kind === "symlink")
        throw fail(`${what} traverses a symlink ("${comps.slice(0, i + 1).join("/")}")`);
      if (next.kind !== "dir")
        throw fail(`${what} is not a directory ("${comps.slice(0, i + 1).join("/")}")`);
      if (createLayer !== undefined) next.layer = createLayer;
      node = next;
    }
    if (comps.length > 0) await this.verifyDir(join(this.root, ...comps), fail);
    return node;
  }

  /** The node at `comps` if every parent is a real directory, else undefined. */
  private lookup(comps: string[]): Node | undefined {
    let node: Node | undefined = this.tree;
    for (const c of comps) {
      if (node?.kind !== "dir") return undefined;
      node = node.children?.get(c);
    }
    return node;
  }

  /** Defence in depth: the dir must be exactly where the tree says, with no symlink on the way. */
  private async verifyDir(abs: string, fail: Fail) {
    // No cache on purpose: a cache is one more piece of state that could be wrong.
    if (abs === this.root) return;
    let real: string;
    try {
      real = await realpath(abs);
    } catch {
      real = "";
    }
    if (real !== abs) throw fail(`parent is not a plain directory inside the staging dir ("${abs}")`);
  }

  private async remove(parent: Node, comps: string[], fail: Fail) {
    const abs = join(this.root, ...comps);
    await this.verifyDir(join(abs, ".."), fail);
    await rm(abs, { recursive: true, force: true }); // rm unlinks symlinks, never follows them
    parent.children?.delete(comps.at(-1) as string);
  }

  /** Reads an entry's data to the end, counting it against maxBytes, into `fh` if given. */
  private async drain(entry: Entry, fail: Fail, fh?: FileHandle) {
    // tar-stream gives a directory no data, but its stream only ends if the header says size 0: a
    // hostile "dir/" claiming bytes would make us wait forever.
    if (entry.header.type === "directory") return;
    for await (const chunk of entry) {
      const buf = chunk as Buffer;
      this.stats.bytes += buf.byteLength;
      if (this.stats.bytes > this.limits.maxBytes) throw this.tooBig(fail);
      for (let off = 0; fh && off < buf.byteLength; ) off += (await fh.write(buf, off)).bytesWritten;
    }
  }

  private tooBig(fail: Fail) {
    return fail(`file content over maxBytes (${this.limits.maxBytes} bytes across all layers)`);
  }

  private meta(h: tar.Header, fail: Fail): Meta {
    // tar-stream applies pax path/linkpath/size only; large ids and precise times arrive in pax too.
    const pax = (h.pax ?? {}) as Record<string, string>;
    const uid = pax.uid !== undefined ? Number(pax.uid) : h.uid;
    const gid = pax.gid !== undefined ? Number(pax.gid) : h.gid;
    for (const id of [uid, gid]) {
      if (!Number.isSafeInteger(id) || id < 0 || id > MAX_ID) throw fail(`invalid owner id ${id}`);
    }
    const secs = pax.mtime !== undefined ? Number(pax.mtime) : h.mtime.getTime() / 1000;
    const mtime = new Date(Number.isFinite(secs) ? secs * 1000 : 0);
    return { mode: (h.mode ?? 0o644) & 0o7777, uid, gid, mtime };
  }

  private xattrsOf(h: tar.Header, layerName: string, comps: string[], raw: RawXattr[]) {
    const out: Array<{ name: string; value: Buffer }> = [];
    const path = comps.join("/") || ".";
    const skip = (reason: string) => this.skipped.push({ layer: layerName, path, reason });
    const keep = (name: string, value: Buffer) => {
      if (XATTR_NAME.test(name)) out.push({ name, value });
      else
        skip(
          `xattr name ${JSON.stringify(name)} refused (printable ASCII without spaces or '=', at most 255)`,
        );
    };
    for (const [k, v] of Object.entries((h.pax ?? {}) as Record<string, string>)) {
      if (k.startsWith("SCHILY.xattr.")) {
        const name = k.slice("SCHILY.xattr.".length);
        const exact = raw.find((x) => x.name === name);
        // tar-stream decodes pax values as UTF-8: non-UTF-8 bytes (binary capabilities) are lost to U+FFFD.
        if (exact) keep(name, exact.value);
        else if (v.includes("\uFFFD"))
          skip(`xattr ${JSON.stringify(name)}: binary value lost by the tar parser`);
        else keep(name, Buffer.from(v, "utf8"));
      } else if (k.startsWith("LIBARCHIVE.xattr.")) {
        // libarchive writes the name URL-encoded and the value base64: lossless.
        let name: string;
        try {
          name = decodeURIComponent(k.slice(17));
        } catch {
          skip(`bad xattr key ${JSON.stringify(k)}`);
          continue;
        }
        keep(name, Buffer.from(v, "base64"));
      }
    }
    return out.length > 0 ? out : undefined;
  }
}

/** Opens with O_NOFOLLOW always: a symlink in the final component makes the open fail (ELOOP). */
async function withFd<T>(path: string, flags: number, fn: (fh: FileHandle) => Promise<T>): Promise<T> {
  const fh = await open(path, flags | O_NOFOLLOW, 0o600);
  try {
    return await fn(fh);
  } finally {
    await fh.close();
  }
}

/** chown before chmod: chown clears setuid/setgid even for root. */
async function setOwnerMode(fh: FileHandle, m: Omit<Meta, "mtime">) {
  await fh.chown(m.uid, m.gid);
  await fh.chmod(m.mode);
}

/** A layer blob file → a decompressed tar stream, by magic bytes: gzip, zstd, or plain tar. */
export async function openLayer(path: string): Promise<NodeJS.ReadableStream> {
  const head = Buffer.alloc(6);
  const fh = await open(path, "r");
  try {
    await fh.read(head, 0, 6, 0);
  } finally {
    await fh.close();
  }
  const noop = () => {}; // errors reach the consumer through the last stream
  if (head[0] === 0x1f && head[1] === 0x8b) return pipeline(createReadStream(path), createGunzip(), noop);
  if (head.readUInt32LE(0) === 0xfd2fb528)
    return pipeline(createReadStream(path), createZstdDecompress(), noop);
  const other =
    head.subarray(0, 3).toString("latin1") === "BZh" ? "bzip2" : head[0] === 0xfd ? "xz" : undefined;
  if (other)
    throw new InvalidArgumentError(
      `layer ${path}: ${other} compression is not supported (gzip, zstd or plain tar)`,
    );
  return createReadStream(path);
}
