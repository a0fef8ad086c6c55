import { existsSync, readFileSync } from "node:fs";
import { mkdir, open } from "node:fs/promises";
import { dirname, join, posix } from "node:path";
import { pipeline as pipe, Readable } from "node:stream";
import { createGunzip, createZstdDecompress } from "node:zlib";
import * as tar from "tar-stream";
import * as v from "valibot";
import { InvalidArgumentError, MatchlockError, messageOf } from "../api/errors.ts";
import { OciConfigSchema } from "./oci-config.ts";

/**
 * Image archives: `docker save` output (manifest.json + config + layer tars) and OCI image layouts
 * (index.json + blobs/sha256/…), as tar files, plain or gzip/zstd-compressed (as `docker load`
 * takes them). The outer tar is unpacked into a private scratch dir first — regular files only, names
 * checked — then read as a layout. Archives are untrusted: every way one can be broken (not a tar,
 * truncated, bad compression, entries that collide, JSON of the wrong shape) is an
 * InvalidArgumentError naming what is wrong, never a stack trace.
 */

const XZ_MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);

export interface ArchiveLimits {
  maxBytes: number;
  maxEntries: number;
}

export const DEFAULT_ARCHIVE_LIMITS: ArchiveLimits = { maxBytes: 64 * 1024 ** 3, maxEntries: 100_000 };

export interface ArchiveImage {
  format: "docker-save" | "oci-layout";
  /** Files inside the scratch dir. */
  configPath: string;
  layerPaths: string[];
  layerMediaTypes: string[];
  /** Tags recorded in the archive (docker save's RepoTags). */
  repoTags: string[];
}

const HINT = "give `docker save` output or an OCI image layout, as a tar (plain, gzip or zstd)";
/** Longest entry name we unpack: PATH_MAX, with components of at most NAME_MAX. */
const MAX_NAME_BYTES = 4096;

function reject(entry: string, rule: string): InvalidArgumentError {
  return new InvalidArgumentError(`image archive entry ${JSON.stringify(entry)}: ${rule}`, HINT);
}

function malformed(why: string): InvalidArgumentError {
  return new InvalidArgumentError(`the image archive is not a valid tar: ${why}`, HINT);
}

/** The archive's bytes, decompressed if its first bytes say gzip or zstd. */
async function decompressed(input: Readable): Promise<Readable> {
  const it = input[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  const head: Buffer[] = [];
  let size = 0;
  let ended = false;
  while (size < 4 && !ended) {
    const r = await it.next();
    if (r.done) ended = true;
    else {
      head.push(r.value);
      size += r.value.length;
    }
  }
  async function* all(): AsyncGenerator<Buffer> {
    yield* head;
    for (let r = ended ? undefined : await it.next(); r && !r.done; r = await it.next()) yield r.value;
  }
  const magic = Buffer.concat(head);
  const src = Readable.from(all());
  const noop = () => {}; // errors reach the consumer through the last stream
  if (magic[0] === 0x1f && magic[1] === 0x8b) return pipe(src, createGunzip(), noop);
  if (magic.length >= 4 && magic.readUInt32LE(0) === 0xfd2fb528)
    return pipe(src, createZstdDecompress(), noop);
  // xz by its whole 6-byte magic: one byte alone matched 1 in 256 garbage archives.
  if (magic.subarray(0, 3).toString("latin1") === "BZh" || magic.subarray(0, 6).equals(XZ_MAGIC))
    throw new InvalidArgumentError("the image archive is bzip2 or xz-compressed: decompress it first", HINT);
  return src;
}

/**
 * What went wrong, as the user's error: the archive's own faults (tar or compression errors,
 * entries that collide on disk) are InvalidArgumentErrors; a host fault (ENOSPC, EACCES) is ours.
 */
function archiveError(e: unknown, entry: string | undefined): MatchlockError {
  if (e instanceof MatchlockError) return e;
  const code = (e as { code?: unknown }).code;
  if (typeof code === "string" && code.startsWith("Z_"))
    return new InvalidArgumentError(`the image archive's compression is broken: ${messageOf(e)}`, HINT);
  if (entry !== undefined && (code === "EEXIST" || code === "ENOTDIR" || code === "EISDIR"))
    return reject(entry, "appears twice, or as both a file and a directory");
  if ((e as { syscall?: unknown }).syscall !== undefined)
    return new MatchlockError("INTERNAL", `unpacking the image archive: ${messageOf(e)}`, { cause: e });
  return malformed(tarProblem(messageOf(e)));
}

/** tar-stream's messages, in the user's terms (its "needs to be gunzipped?" guess is wrong here: we gunzip). */
function tarProblem(message: string): string {
  if (message.startsWith("Invalid tar header")) return "a header is damaged, or the data is not a tar at all";
  if (message === "Unexpected end of data") return "it ends in the middle of an entry (truncated?)";
  return message;
}

/** An entry name → its path in the scratch dir, or why it is refused. */
function entryPath(raw: string): string {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: rejecting control characters is the point
  if (/[\u0000-\u001f\u007f]/.test(raw)) throw reject(raw, "control character in name");
  let depth = 0;
  for (const c of raw.split("/")) {
    depth += c === ".." ? -1 : c === "" || c === "." ? 0 : 1;
    if (depth < 0) throw reject(raw, 'path escapes the archive ("..")');
  }
  const name = posix.normalize(`/${raw}`).slice(1);
  if (Buffer.byteLength(name) > MAX_NAME_BYTES || name.split("/").some((c) => Buffer.byteLength(c) > 255))
    throw reject(raw, "name too long");
  return name;
}

/**
 * Copies an entry's data to a new file. By hand, not with stream.pipeline: tar-stream's entries are
 * streamx streams, and pipeline never settles on one that tar-stream already destroyed (a truncated
 * archive), which left the import waiting forever.
 */
async function writeEntry(entry: AsyncIterable<unknown>, out: string): Promise<void> {
  await mkdir(dirname(out), { recursive: true });
  const fh = await open(out, "wx", 0o600); // "wx": a name that appears twice is refused, never overwritten
  try {
    for await (const chunk of entry) {
      const buf = chunk as Buffer;
      for (let off = 0; off < buf.length; ) off += (await fh.write(buf, off)).bytesWritten;
    }
  } finally {
    await fh.close();
  }
}

/** Unpacks the archive's regular files under `dir`; symlinks (old docker save dedupe) become aliases. */
export async function unpackArchive(
  input: Readable,
  dir: string,
  limits = DEFAULT_ARCHIVE_LIMITS,
): Promise<Map<string, string>> {
  const aliases = new Map<string, string>();
  let entries = 0;
  let bytes = 0;
  let current: string | undefined;
  let source: Readable | undefined;
  let tarError: Error | undefined;
  try {
    source = await decompressed(input);
    const extract = tar.extract();
    // When tar-stream fails, the entry being read fails with a bare "Stream was destroyed": keep the cause.
    extract.on("error", (e: Error) => {
      tarError = e;
    });
    source.on("error", (e) => extract.destroy(e));
    source.pipe(extract as unknown as NodeJS.WritableStream);
    for await (const entry of extract) {
      const header = entry.header;
      current = header.name;
      if (++entries > limits.maxEntries) throw reject(current, `more than ${limits.maxEntries} entries`);
      const name = entryPath(current);
      if (header.type === "symlink") {
        const target = posix.normalize(posix.join(posix.dirname(`/${name}`), header.linkname ?? "")).slice(1);
        aliases.set(name, target); // resolved inside dir only: never created on disk
      } else if (header.type !== "directory" && name !== "") {
        if (header.type !== "file" && header.type !== "contiguous-file")
          throw reject(current, `unexpected entry type ${header.type ?? "unknown"} in an image archive`);
        bytes += header.size ?? 0;
        if (bytes > limits.maxBytes) throw reject(current, `archive larger than ${limits.maxBytes} bytes`);
        await writeEntry(entry, join(dir, name));
        continue;
      }
      // tar-stream never ends a directory's stream when its header claims data: do not wait for it.
      if (header.type !== "directory") entry.resume();
    }
  } catch (e) {
    throw archiveError(tarError ?? e, current);
  } finally {
    source?.destroy();
    input.destroy(); // stop reading a refused archive (stdin may still be flowing)
  }
  if (entries === 0)
    throw new InvalidArgumentError(
      "the image archive is empty (expected a docker save or OCI layout tar)",
      HINT,
    );
  return aliases;
}

function resolveIn(dir: string, aliases: Map<string, string>, rel: string, what: string): string {
  let name = posix.normalize(`/${rel}`).slice(1);
  for (let hops = 0; aliases.has(name) && hops < 16; hops++) name = aliases.get(name) as string;
  if (name.startsWith("..")) throw reject(rel, `${what} path escapes the archive`);
  const p = join(dir, name);
  if (!existsSync(p)) throw reject(rel, `${what} is missing from the archive`);
  return p;
}

/** Reads and checks a JSON document of the archive against its schema: one error naming the field. */
function readJson<T extends v.GenericSchema>(path: string, what: string, schema: T): v.InferOutput<T> {
  let doc: unknown;
  try {
    doc = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new InvalidArgumentError(`${what} is not valid JSON: ${messageOf(e)}`, HINT);
  }
  const r = v.safeParse(schema, doc);
  if (r.success) return r.output;
  const issue = r.issues[0];
  const at = issue?.path?.map((p) => String(p.key)).join(".");
  throw new InvalidArgumentError(`${what}${at ? ` at ${at}` : ""}: ${issue?.message ?? "wrong shape"}`, HINT);
}

const strings = v.array(v.string());
/** docker save's manifest.json: one entry per image. */
const DockerManifest = v.array(
  v.looseObject({ Config: v.string(), RepoTags: v.nullish(strings), Layers: strings }),
);
const Descriptor = v.looseObject({
  mediaType: v.optional(v.string()),
  digest: v.string(),
  platform: v.optional(v.looseObject({ os: v.optional(v.string()), architecture: v.optional(v.string()) })),
});
type Descriptor = v.InferOutput<typeof Descriptor>;
const OciIndex = v.looseObject({ manifests: v.array(Descriptor) });
const OciManifest = v.looseObject({ config: Descriptor, layers: v.array(Descriptor) });
/** A blob a descriptor points to is an index (nested, multi-arch) when it has `manifests`. */
const ManifestsKey = v.looseObject({ manifests: v.optional(v.unknown()) });

function blobPath(dir: string, aliases: Map<string, string>, digest: string, what: string): string {
  if (!/^sha256:[a-f0-9]{64}$/.test(digest)) {
    throw new InvalidArgumentError(`${what}: invalid digest ${JSON.stringify(digest)}`, HINT);
  }
  return resolveIn(dir, aliases, `blobs/sha256/${digest.slice(7)}`, what);
}

/** Reads an unpacked archive. docker save's manifest.json wins when both layouts are present. */
export function readArchive(dir: string, aliases: Map<string, string>, arch = "amd64"): ArchiveImage {
  const image = existsSync(join(dir, "manifest.json"))
    ? readDockerSave(dir, aliases)
    : readOciLayout(dir, aliases, arch);
  readJson(image.configPath, "the image config", OciConfigSchema);
  return image;
}

function readDockerSave(dir: string, aliases: Map<string, string>): ArchiveImage {
  const m = readJson(join(dir, "manifest.json"), "manifest.json", DockerManifest);
  const img = m[0];
  if (!img) throw new InvalidArgumentError("manifest.json lists no image", HINT);
  if (m.length > 1)
    throw new InvalidArgumentError(`the archive holds ${m.length} images; import one at a time`);
  const layerPaths = img.Layers.map((l) => resolveIn(dir, aliases, l, "layer"));
  return {
    format: "docker-save",
    configPath: resolveIn(dir, aliases, img.Config, "config"),
    layerPaths,
    layerMediaTypes: layerPaths.map(() => "application/vnd.docker.image.rootfs.diff.tar"),
    repoTags: img.RepoTags ?? [],
  };
}

function readOciLayout(dir: string, aliases: Map<string, string>, arch: string): ArchiveImage {
  const indexPath = join(dir, "index.json");
  if (!existsSync(indexPath)) {
    throw new InvalidArgumentError(
      "not an image archive: no manifest.json (docker save) or index.json (OCI layout)",
      HINT,
    );
  }
  let desc = pickManifest(readJson(indexPath, "index.json", OciIndex).manifests, arch, "index.json");
  for (let depth = 0; depth < 4; depth++) {
    const what = `manifest ${desc.digest}`;
    const path = blobPath(dir, aliases, desc.digest, "manifest");
    if (readJson(path, what, ManifestsKey).manifests !== undefined) {
      desc = pickManifest(readJson(path, what, OciIndex).manifests, arch, `index ${desc.digest}`);
      continue;
    }
    const doc = readJson(path, what, OciManifest);
    return {
      format: "oci-layout",
      configPath: blobPath(dir, aliases, doc.config.digest, "config"),
      layerPaths: doc.layers.map((l) => blobPath(dir, aliases, l.digest, "layer")),
      layerMediaTypes: doc.layers.map((l) => l.mediaType ?? ""),
      repoTags: [],
    };
  }
  throw new InvalidArgumentError("index.json: nested indexes go too deep", HINT);
}

function pickManifest(list: Descriptor[], arch: string, where: string): Descriptor {
  if (list.length === 0) throw new InvalidArgumentError(`${where} lists no manifest`, HINT);
  const forUs = list.filter(
    (d) => !d.platform || (d.platform.os === "linux" && d.platform.architecture === arch),
  );
  const pick = forUs[0];
  if (!pick) {
    const have = list.map((d) => `${d.platform?.os}/${d.platform?.architecture}`).join(", ");
    throw new InvalidArgumentError(`${where} has no linux/${arch} image (it has ${have})`);
  }
  return pick;
}
