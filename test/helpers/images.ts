import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import * as tar from "tar-stream";

/** Builds image archives in memory for tests: layers as tars, then docker-save or OCI-layout tars. */

export interface Entry {
  name: string;
  type?: "file" | "directory" | "symlink" | "link" | "character-device";
  content?: Buffer | string;
  mode?: number;
  uid?: number;
  gid?: number;
  linkname?: string;
}

export async function makeTar(entries: Entry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on("data", (c: unknown) => chunks.push(c as Buffer));
  const done = new Promise<void>((r) => pack.on("end", () => r()));
  for (const e of entries) {
    const type = e.type ?? "file";
    // Regular files always get a body (empty if none): without one tar-stream waits for a stream.
    const body =
      e.content !== undefined ? Buffer.from(e.content) : type === "file" ? Buffer.alloc(0) : undefined;
    const header = {
      name: e.name,
      type,
      mode: e.mode ?? (type === "directory" ? 0o755 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      mtime: new Date(1_700_000_000_000),
      ...(e.linkname === undefined ? {} : { linkname: e.linkname }),
      ...(type === "character-device" ? { devmajor: 8, devminor: 0 } : {}),
    } as tar.Header;
    await new Promise<void>((resolve, reject) => {
      if (body) pack.entry(header, body, (err) => (err ? reject(err) : resolve()));
      else pack.entry(header, (err) => (err ? reject(err) : resolve()));
    });
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** A busybox userland layer (from the host's busybox-static), enough to run commands. */
export async function busyboxLayer(): Promise<Buffer> {
  const bb = readFileSync("/bin/busybox");
  const links = [
    "sh",
    "echo",
    "cat",
    "id",
    "pwd",
    "ls",
    "env",
    "true",
    "test",
    "wc",
    "sha256sum",
    "stat",
    "head",
    "printf",
  ];
  return makeTar([
    { name: "bin/", type: "directory" },
    { name: "bin/busybox", content: bb, mode: 0o755 },
    ...links.map((l): Entry => ({ name: `bin/${l}`, type: "symlink", linkname: "busybox" })),
    { name: "etc/", type: "directory" },
    { name: "etc/passwd", content: "root:x:0:0:root:/root:/bin/sh\napp:x:4242:4343:app:/home/app:/bin/sh\n" },
    { name: "etc/group", content: "root:x:0:\napp:x:4343:\n" },
    { name: "home/app/", type: "directory", uid: 4242, gid: 4343 },
    { name: "tmp/", type: "directory", mode: 0o1777 },
  ]);
}

export interface ImageSpec {
  layers: Buffer[];
  config?: { Env?: string[]; Cmd?: string[]; Entrypoint?: string[]; User?: string; WorkingDir?: string };
  architecture?: string;
}

function configJson(spec: ImageSpec, diffIds: string[]): Buffer {
  return Buffer.from(
    JSON.stringify({
      architecture: spec.architecture ?? "amd64",
      os: "linux",
      config: spec.config ?? {},
      rootfs: { type: "layers", diff_ids: diffIds.map((d) => `sha256:${d}`) },
    }),
  );
}

/** `docker save` layout: manifest.json, <config>.json, <id>/layer.tar. */
export async function dockerSave(spec: ImageSpec, repoTag = "test/app:latest"): Promise<Buffer> {
  const ids = spec.layers.map(sha);
  const config = configJson(spec, ids);
  const configName = `${sha(config)}.json`;
  const entries: Entry[] = [
    { name: configName, content: config },
    ...spec.layers.map((l, i): Entry => ({ name: `${ids[i]}/layer.tar`, content: l })),
    {
      name: "manifest.json",
      content: JSON.stringify([
        { Config: configName, RepoTags: [repoTag], Layers: ids.map((id) => `${id}/layer.tar`) },
      ]),
    },
  ];
  return makeTar(entries);
}

/** OCI image layout with gzip layers, behind a multi-arch index (arm64 first, then amd64). */
export async function ociLayout(spec: ImageSpec): Promise<Buffer> {
  const gz = spec.layers.map((l) => gzipSync(l));
  const config = configJson(spec, spec.layers.map(sha));
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {
        mediaType: "application/vnd.oci.image.config.v1+json",
        digest: `sha256:${sha(config)}`,
        size: config.length,
      },
      layers: gz.map((g) => ({
        mediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
        digest: `sha256:${sha(g)}`,
        size: g.length,
      })),
    }),
  );
  const index = {
    schemaVersion: 2,
    manifests: [
      {
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        digest: `sha256:${"0".repeat(64)}`,
        size: 1,
        platform: { os: "linux", architecture: "arm64" },
      },
      {
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        digest: `sha256:${sha(manifest)}`,
        size: manifest.length,
        platform: { os: "linux", architecture: "amd64" },
      },
    ],
  };
  return makeTar([
    { name: "oci-layout", content: JSON.stringify({ imageLayoutVersion: "1.0.0" }) },
    { name: "index.json", content: JSON.stringify(index) },
    { name: `blobs/sha256/${sha(config)}`, content: config },
    { name: `blobs/sha256/${sha(manifest)}`, content: manifest },
    ...gz.map((g): Entry => ({ name: `blobs/sha256/${sha(g)}`, content: g })),
  ]);
}
