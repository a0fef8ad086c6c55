import { createWriteStream, existsSync, readFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { dirname, join, posix } from "node:path";
import type { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import * as tar from "tar-stream";
import { InvalidArgumentError } from "../api/errors.ts";

/**
 * Image archives: `docker save` output (manifest.json + config + layer tars) and OCI image layouts
 * (index.json + blobs/sha256/…), as tar files. The outer tar is unpacked into a private scratch dir
 * first — regular files only, names checked — then read as a layout.
 */

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

function reject(entry: string, rule: string): InvalidArgumentError {
  return new InvalidArgumentError(`image archive entry "${entry}": ${rule}`);
}

/** Unpacks the archive's regular files under `dir`; symlinks (old docker save dedupe) become aliases. */
export async function unpackArchive(
  input: Readable,
  dir: string,
  limits = DEFAULT_ARCHIVE_LIMITS,
): Promise<Map<string, string>> {
  const aliases = new Map<string, string>();
  const extract = tar.extract();
  let entries = 0;
  let bytes = 0;
  const done = new Promise<void>((resolve, reject_) => {
    extract.on("entry", (header, stream, next) => {
      const fail = (e: Error) => {
        stream.resume();
        reject_(e);
        extract.destroy(e);
      };
      entries++;
      const raw = header.name;
      if (entries > limits.maxEntries) return fail(reject(raw, `more than ${limits.maxEntries} entries`));
      // biome-ignore lint/suspicious/noControlCharactersInRegex: rejecting control characters is the point
      if (/[\u0000-\u001f\u007f]/.test(raw))
        return fail(reject(JSON.stringify(raw), "control character in name"));
      const name = posix.normalize(`/${raw}`).slice(1);
      if (name.startsWith("..") || name.includes("/../"))
        return fail(reject(raw, 'path escapes the archive ("..")'));
      if (header.type === "directory" || name === "") {
        stream.resume();
        stream.on("end", next);
        return;
      }
      if (header.type === "symlink") {
        const target = posix.normalize(posix.join(posix.dirname(`/${name}`), header.linkname ?? "")).slice(1);
        if (target.startsWith("..")) return fail(reject(raw, "symlink points outside the archive"));
        aliases.set(name, target);
        stream.resume();
        stream.on("end", next);
        return;
      }
      if (header.type !== "file" && header.type !== "contiguous-file") {
        return fail(reject(raw, `unexpected entry type ${header.type} in an image archive`));
      }
      bytes += header.size ?? 0;
      if (bytes > limits.maxBytes) return fail(reject(raw, `archive larger than ${limits.maxBytes} bytes`));
      const out = join(dir, name);
      mkdir(dirname(out), { recursive: true })
        .then(() => pipeline(stream, createWriteStream(out, { flags: "wx", mode: 0o600 })))
        .then(() => next(), fail);
    });
    extract.on("finish", () => resolve());
    extract.on("error", (e) => reject_(e));
  });
  input.on("error", (e) => extract.destroy(e));
  input.pipe(extract);
  await done;
  if (entries === 0)
    throw new InvalidArgumentError("the image archive is empty (expected a docker save or OCI layout tar)");
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

function readJson(path: string, what: string): unknown {
  try {
    return JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new InvalidArgumentError(`${what} is not valid JSON: ${(e as Error).message}`);
  }
}

interface Descriptor {
  mediaType?: string;
  digest?: string;
  platform?: { os?: string; architecture?: string };
}

function blobPath(dir: string, aliases: Map<string, string>, digest: unknown, what: string): string {
  if (typeof digest !== "string" || !/^sha256:[a-f0-9]{64}$/.test(digest)) {
    throw new InvalidArgumentError(`${what}: invalid digest ${JSON.stringify(digest)}`);
  }
  return resolveIn(dir, aliases, `blobs/sha256/${digest.slice(7)}`, what);
}

/** Reads an unpacked archive. docker save's manifest.json wins when both layouts are present. */
export function readArchive(dir: string, aliases: Map<string, string>, arch = "amd64"): ArchiveImage {
  const dockerManifest = join(dir, "manifest.json");
  if (existsSync(dockerManifest)) {
    const m = readJson(dockerManifest, "manifest.json") as Array<{
      Config?: string;
      RepoTags?: string[];
      Layers?: string[];
    }>;
    if (!Array.isArray(m) || m.length === 0) throw new InvalidArgumentError("manifest.json lists no image");
    if (m.length > 1)
      throw new InvalidArgumentError(`the archive holds ${m.length} images; import one at a time`);
    const img = m[0] as { Config?: string; RepoTags?: string[]; Layers?: string[] };
    if (typeof img.Config !== "string" || !Array.isArray(img.Layers)) {
      throw new InvalidArgumentError("manifest.json: an image needs Config and Layers");
    }
    const layerPaths = img.Layers.map((l) => resolveIn(dir, aliases, String(l), "layer"));
    return {
      format: "docker-save",
      configPath: resolveIn(dir, aliases, img.Config, "config"),
      layerPaths,
      layerMediaTypes: layerPaths.map(() => "application/vnd.docker.image.rootfs.diff.tar"),
      repoTags: Array.isArray(img.RepoTags) ? img.RepoTags.map(String) : [],
    };
  }
  const indexPath = join(dir, "index.json");
  if (!existsSync(indexPath)) {
    throw new InvalidArgumentError(
      "not an image archive: no manifest.json (docker save) or index.json (OCI layout)",
    );
  }
  let desc = pickManifest(
    readJson(indexPath, "index.json") as { manifests?: Descriptor[] },
    arch,
    "index.json",
  );
  for (let depth = 0; depth < 4; depth++) {
    const doc = readJson(blobPath(dir, aliases, desc.digest, "manifest"), `manifest ${desc.digest}`) as {
      mediaType?: string;
      manifests?: Descriptor[];
      config?: Descriptor;
      layers?: Descriptor[];
    };
    if (Array.isArray(doc.manifests)) {
      desc = pickManifest(doc, arch, `index ${desc.digest}`);
      continue;
    }
    if (!doc.config || !Array.isArray(doc.layers))
      throw new InvalidArgumentError(`manifest ${desc.digest} has no config or layers`);
    const layers = doc.layers;
    return {
      format: "oci-layout",
      configPath: blobPath(dir, aliases, doc.config.digest, "config"),
      layerPaths: layers.map((l) => blobPath(dir, aliases, l.digest, "layer")),
      layerMediaTypes: layers.map((l) => String(l.mediaType ?? "")),
      repoTags: [],
    };
  }
  throw new InvalidArgumentError("index.json: nested indexes go too deep");
}

function pickManifest(index: { manifests?: Descriptor[] }, arch: string, where: string): Descriptor {
  const list = Array.isArray(index.manifests) ? index.manifests : [];
  if (list.length === 0) throw new InvalidArgumentError(`${where} lists no manifest`);
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
