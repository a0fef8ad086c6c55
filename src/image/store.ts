import { createHash, randomBytes } from "node:crypto";
import { createReadStream, existsSync, readdirSync, statSync } from "node:fs";
import { mkdir, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import type { Readable } from "node:stream";
import type { ImageConfig } from "../api/config.ts";
import { InvalidArgumentError, isMatchlockError, MatchlockError } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { procStartTime } from "../state/procs.ts";
import { openLayer, RootfsBuilder } from "./apply.ts";
import { readArchive, unpackArchive } from "./archive.ts";
import { isDefaultRef, type ResolvedImage, requireDefaultImage } from "./default-image.ts";
import { makeExt4FromDir } from "./ext4.ts";
import { type BlobRef, ImageMetadata, type ImageRow } from "./metadata.ts";
import { type OciConfig, readOciConfig } from "./oci-config.ts";
import { normalizeReference, parseReference } from "./reference.ts";
import { type PullProgress, pullImage } from "./registry.ts";
import { applyXattrs } from "./xattrs.ts";

export type { ResolvedImage };

/**
 * The image store: blobs by digest under ~/.cache/matchlock/images/blobs (written to a temp name
 * and renamed, shared by every image that uses them), one read-only ext4 base disk per image digest
 * under images/rootfs, and metadata.db saying which tag is which image and which blobs it uses.
 */

export interface ImportResult {
  tag: string;
  digest: string;
  layers: number;
  /** Bytes of layer data in the image. */
  size: number;
  /** Bytes the store grew by (0 when every blob was already there). */
  addedBytes: number;
  skipped: string[];
}

export interface ImageListing {
  tag: string;
  scope: string;
  digest: string;
  size: number;
  created_at: string;
}

async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return `sha256:${h.digest("hex")}`;
}

/** The OCI config fields that shape a run, in our config's shape. */
export function imageConfigOf(oci: OciConfig): ImageConfig {
  const c = oci.config ?? {};
  const env: Record<string, string> = {};
  for (const kv of c.Env ?? []) {
    const eq = kv.indexOf("=");
    if (eq > 0) env[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  return {
    env,
    ...(c.Entrypoint && c.Entrypoint.length > 0 ? { entrypoint: c.Entrypoint } : {}),
    ...(c.Cmd && c.Cmd.length > 0 ? { cmd: c.Cmd } : {}),
    ...(c.User ? { user: c.User } : {}),
    ...(c.WorkingDir ? { working_dir: c.WorkingDir } : {}),
  };
}

export class ImageStore {
  private readonly p: Paths;
  private readonly meta: ImageMetadata;

  constructor(p: Paths) {
    this.p = p;
    this.meta = new ImageMetadata(p);
  }

  close(): void {
    this.meta.close();
  }

  blobPath(digest: string): string {
    return join(this.p.images, "blobs", "sha256", digest.replace(/^sha256:/, ""));
  }

  rootfsPath(digest: string): string {
    return join(this.p.images, "rootfs", `${digest.replace(/^sha256:/, "")}.ext4`);
  }

  private scratch(label: string): string {
    return join(this.p.images, "tmp", `${label}-${process.pid}-${randomBytes(4).toString("hex")}`);
  }

  /** Imports a docker-save or OCI-layout tar under `tag`; builds (or reuses) its base disk. */
  async importArchive(
    input: Readable,
    tag: string,
    source: string,
    log: (line: string) => void = () => {},
  ): Promise<ImportResult> {
    const name = normalizeReference(tag);
    const dir = this.scratch("import");
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const added: string[] = [];
    try {
      const aliases = await unpackArchive(input, dir);
      const img = readArchive(dir, aliases);
      const configDigest = await sha256File(img.configPath);
      const oci = readOciConfig(img.configPath, "the archive");
      if (oci.os && oci.os !== "linux")
        throw new InvalidArgumentError(`the image is for ${oci.os}, not linux`);
      if (oci.architecture && oci.architecture !== "amd64") {
        throw new InvalidArgumentError(`the image is for ${oci.architecture}; this host runs amd64 guests`);
      }
      const blobs: BlobRef[] = [];
      let addedBytes = 0;
      let size = 0;
      const store = async (path: string, role: BlobRef["role"], mediaType: string): Promise<string> => {
        const digest = await sha256File(path);
        const bytes = statSync(path).size;
        const dest = this.blobPath(digest);
        if (!existsSync(dest)) {
          await mkdir(join(this.p.images, "blobs", "sha256"), { recursive: true });
          await rename(path, dest);
          added.push(dest);
          addedBytes += bytes;
        }
        blobs.push({ digest, size: bytes, mediaType, role });
        if (role === "layer") size += bytes;
        return digest;
      };
      await store(img.configPath, "config", "application/vnd.oci.image.config.v1+json");
      for (const [i, layer] of img.layerPaths.entries())
        await store(layer, "layer", img.layerMediaTypes[i] ?? "");
      log(
        `${img.layerPaths.length} layers, ${(size / 1e6).toFixed(1)} MB (${(addedBytes / 1e6).toFixed(1)} MB new)`,
      );
      const rootfs = this.rootfsPath(configDigest);
      let skipped: string[] = [];
      if (!existsSync(rootfs)) {
        log("building the root filesystem");
        skipped = await this.buildRootfs(
          blobs.filter((b) => b.role === "layer").map((b) => b.digest),
          rootfs,
        );
      }
      this.meta.put(
        {
          scope: "local",
          tag: name,
          digest: configDigest,
          size,
          source,
          rootfs_path: rootfs,
          oci_json: JSON.stringify(oci),
        },
        blobs,
      );
      return { tag: name, digest: configDigest, layers: img.layerPaths.length, size, addedBytes, skipped };
    } catch (e) {
      // Nothing half-written stays: blobs this import added go again (no image records them).
      for (const b of added) await rm(b, { force: true });
      throw e;
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  /**
   * Pulls an image from its registry into the store (blobs already present are not downloaded) and
   * builds its base disk. Recorded with scope "registry" under the normalised reference.
   */
  async pull(
    ref: string,
    opts: { insecure?: boolean; onProgress?: (p: PullProgress) => void; signal?: AbortSignal } = {},
  ): Promise<ImportResult & { manifestDigest: string; downloaded: number }> {
    const name = normalizeReference(ref);
    const tmp = this.scratch("pull");
    await mkdir(tmp, { recursive: true, mode: 0o700 });
    await mkdir(join(this.p.images, "blobs", "sha256"), { recursive: true });
    try {
      const pulled = await pullImage(parseReference(ref), {
        blobPath: (d) => this.blobPath(d),
        tmpDir: tmp,
        ...(opts.insecure ? { insecure: true } : {}),
        ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
      });
      const configPath = this.blobPath(pulled.configDigest);
      const oci = readOciConfig(configPath, name);
      const blobs: BlobRef[] = [
        {
          digest: pulled.configDigest,
          size: statSync(configPath).size,
          mediaType: "application/vnd.oci.image.config.v1+json",
          role: "config",
        },
        ...pulled.layers.map(
          (l): BlobRef => ({ digest: l.digest, size: l.size, mediaType: l.mediaType, role: "layer" }),
        ),
      ];
      const size = pulled.layers.reduce((n, l) => n + l.size, 0);
      const rootfs = this.rootfsPath(pulled.configDigest);
      let skipped: string[] = [];
      if (!existsSync(rootfs)) {
        skipped = await this.buildRootfs(
          pulled.layers.map((l) => l.digest),
          rootfs,
        );
      }
      this.meta.put(
        {
          scope: "registry",
          tag: name,
          digest: pulled.configDigest,
          size,
          source: `registry:${name}@${pulled.manifestDigest}`,
          rootfs_path: rootfs,
          oci_json: JSON.stringify(oci),
        },
        blobs,
      );
      return {
        tag: name,
        digest: pulled.configDigest,
        layers: pulled.layers.length,
        size,
        addedBytes: pulled.downloaded,
        skipped,
        manifestDigest: pulled.manifestDigest,
        downloaded: pulled.downloaded,
      };
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
  }

  /** Applies the layers (hardened) into a staging dir and packs it as the image's read-only ext4. */
  private async buildRootfs(layers: string[], out: string): Promise<string[]> {
    const staging = this.scratch("rootfs");
    await mkdir(staging, { recursive: true, mode: 0o755 });
    try {
      const builder = new RootfsBuilder(staging);
      for (const digest of layers) await builder.applyLayer(await openLayer(this.blobPath(digest)), digest);
      const xattrNotes = await applyXattrs(staging, builder.xattrs);
      await mkdir(join(this.p.images, "rootfs"), { recursive: true });
      const tmp = `${out}.tmp-${process.pid}`;
      await makeExt4FromDir(staging, tmp, "matchlock-image", builder.stats.entries);
      await rename(tmp, out);
      return [...builder.skipped.map((s) => `${s.path}: ${s.reason}`), ...xattrNotes];
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
  }

  /** `--image` lookup: the default image, then a local tag, then a pulled one, then a pull. */
  async resolve(
    ref: string | undefined,
    opts: { pull?: boolean; allowPull?: boolean; onProgress?: (p: PullProgress) => void } = {},
  ): Promise<ResolvedImage> {
    if (ref === undefined || isDefaultRef(ref)) return requireDefaultImage(this.p);
    const name = normalizeReference(ref);
    let row = opts.pull ? undefined : (this.meta.get("local", name) ?? this.meta.get("registry", name));
    if (!row) {
      // Lookup order: local tag → registry cache → pull.
      if (!opts.pull && !opts.allowPull) {
        throw new MatchlockError("IMAGE_NOT_FOUND", `image "${ref}" (${name}) not found`, {
          hint: "`matchlock pull` it or `matchlock image import` it; `matchlock image ls` lists what is here",
        });
      }
      try {
        await this.pull(ref, opts.onProgress ? { onProgress: opts.onProgress } : {});
      } catch (e) {
        if (opts.pull || !isMatchlockError(e)) throw e;
        throw new MatchlockError(
          "IMAGE_NOT_FOUND",
          `image "${ref}" (${name}) is not here, and pulling it failed: ${e.message}`,
          {
            hint: "`matchlock image import` it from an archive, or check the registry; `matchlock image ls` lists what is here",
          },
        );
      }
      row = this.meta.get("registry", name);
      if (!row)
        throw new MatchlockError("IMAGE_NOT_FOUND", `image "${ref}" (${name}) not found after pulling`);
    }
    if (!existsSync(row.rootfs_path)) {
      const layers = this.meta.blobsOf(row.digest).filter((b) => b.role === "layer");
      const missing = layers.filter((b) => !existsSync(this.blobPath(b.digest)));
      if (missing.length > 0)
        throw new MatchlockError(
          "IMAGE_NOT_FOUND",
          `image ${name} is missing layer ${missing[0]?.digest}; import it again`,
        );
      await this.buildRootfs(
        layers.map((b) => b.digest),
        this.rootfsPath(row.digest),
      );
      this.meta.setRootfs(row.digest, this.rootfsPath(row.digest));
    }
    return {
      ref: name,
      rootfs: this.rootfsPath(row.digest),
      fstype: "ext4",
      config: imageConfigOf(JSON.parse(row.oci_json) as OciConfig),
    };
  }

  /** Gives an image already in the store another local tag. */
  tagLocal(existing: string, tag: string): void {
    const from = normalizeReference(existing);
    const row = this.meta.get("local", from) ?? this.meta.get("registry", from);
    if (!row) throw new MatchlockError("IMAGE_NOT_FOUND", `no image ${existing}`);
    const { created_at: _c, updated_at: _u, ...rest } = row;
    this.meta.put({ ...rest, scope: "local", tag: normalizeReference(tag) }, this.meta.blobsOf(row.digest));
  }

  list(): ImageListing[] {
    return this.meta.list().map((r: ImageRow) => ({
      tag: r.tag,
      scope: r.scope,
      digest: r.digest,
      size: r.size,
      created_at: r.created_at,
    }));
  }

  remove(tag: string): boolean {
    const name = normalizeReference(tag);
    return this.meta.remove("local", name) || this.meta.remove("registry", name);
  }

  /** Frees blobs and base disks no tagged image uses. */
  async gc(): Promise<{ blobs: number; rootfs: number; bytes: number }> {
    const { blobs } = this.meta.collectGarbage();
    let bytes = 0;
    for (const d of blobs) {
      const p = this.blobPath(d);
      if (existsSync(p)) {
        bytes += statSync(p).size;
        await rm(p, { force: true });
      }
    }
    const live = new Set([...this.meta.liveDigests()].map((d) => `${d.replace(/^sha256:/, "")}.ext4`));
    let rootfs = 0;
    const dir = join(this.p.images, "rootfs");
    if (existsSync(dir)) {
      for (const f of readdirSync(dir)) {
        if (live.has(f)) continue;
        bytes += statSync(join(dir, f)).size;
        await rm(join(dir, f), { force: true });
        rootfs++;
      }
    }
    // Scratch dirs of imports whose process is gone (they are named label-PID-random).
    const tmp = join(this.p.images, "tmp");
    if (existsSync(tmp)) {
      for (const f of readdirSync(tmp)) {
        const pid = Number(/-(\d+)-[0-9a-f]+$/.exec(f)?.[1]);
        if (pid && procStartTime(pid) !== undefined) continue;
        await rm(join(tmp, f), { recursive: true, force: true });
      }
    }
    return { blobs: blobs.length, rootfs, bytes };
  }
}
