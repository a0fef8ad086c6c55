import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type IncomingMessage, request, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { gzipSync, zstdCompressSync } from "node:zlib";

/**
 * Real registries for tests: Debian's docker-registry (distribution 2.8) on 127.0.0.1 with its own
 * storage, images written as OCI layouts and pushed with skopeo, and a small HTTP proxy in front
 * that can gate on bearer tokens, fail, redirect or serve its own answers.
 */

const run = promisify(execFile);

export const sha = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address() as AddressInfo;
  await new Promise((r) => s.close(r));
  return port;
}

/** Fails with the apt packages to install when the registry tools are missing. */
export function requireTools(): void {
  const missing = ["docker-registry", "skopeo", "htpasswd"].filter(
    (t) => spawnSync("sh", ["-c", `command -v ${t}`]).status !== 0,
  );
  if (missing.length > 0)
    throw new Error(`missing ${missing.join(", ")}: apt-get install docker-registry skopeo apache2-utils`);
}

export interface TestRegistry {
  /** host:port, as an image reference's domain. */
  host: string;
  dir: string;
  /** The file the registry serves a blob from (to corrupt it). */
  blobFile(digest: string): string;
  stop(): Promise<void>;
}

/** Starts docker-registry on a free loopback port; with `auth`, behind htpasswd basic auth. */
export async function startRegistry(auth?: { user: string; pass: string }): Promise<TestRegistry> {
  const dir = mkdtempSync(join(tmpdir(), "matchlock-registry-"));
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    let authYaml = "";
    if (auth) {
      const { stdout } = await run("htpasswd", ["-Bbn", auth.user, auth.pass]);
      writeFileSync(join(dir, "htpasswd"), stdout);
      authYaml = `auth:\n  htpasswd:\n    realm: test\n    path: ${join(dir, "htpasswd")}\n`;
    }
    writeFileSync(
      join(dir, "config.yml"),
      `version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n` +
        `storage:\n  filesystem:\n    rootdirectory: ${join(dir, "data")}\n` +
        `http:\n  addr: 127.0.0.1:${port}\n  secret: test\n${authYaml}`,
    );
    const log = openSync(join(dir, "registry.log"), "a");
    const child = spawn("docker-registry", ["serve", join(dir, "config.yml")], {
      stdio: ["ignore", log, log],
    });
    const exited = new Promise<void>((r) => child.once("close", () => r()));
    child.once("error", () => {}); // a spawn failure shows as a registry that never answers
    if (await ready(`http://127.0.0.1:${port}/v2/`, child)) {
      return {
        host: `127.0.0.1:${port}`,
        dir,
        blobFile: (d) => {
          const hex = d.replace(/^sha256:/, "");
          return join(
            dir,
            "data",
            "docker",
            "registry",
            "v2",
            "blobs",
            "sha256",
            hex.slice(0, 2),
            hex,
            "data",
          );
        },
        stop: async () => {
          if (child.exitCode === null) child.kill("SIGTERM");
          await exited;
          rmSync(dir, { recursive: true, force: true });
        },
      };
    }
    if (child.exitCode === null) child.kill("SIGKILL");
    await exited;
    if (attempt >= 3)
      throw new Error(`docker-registry did not start: ${readFileSync(join(dir, "registry.log"))}`);
  }
}

async function ready(url: string, child: ChildProcess): Promise<boolean> {
  for (let i = 0; i < 100 && child.exitCode === null; i++) {
    try {
      await fetch(url);
      return true;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return false;
}

/**
 * `skopeo copy` into a registry (source `oci:<dir>:latest` or `docker-archive:<file>`); returns the
 * pushed manifest's digest.
 */
export async function push(
  source: string,
  dest: string,
  opts: { all?: boolean; creds?: string; format?: "oci" | "v2s2" } = {},
): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), "matchlock-push-"));
  const digestFile = join(dir, "digest");
  await run("skopeo", [
    "copy",
    "--quiet",
    "--dest-tls-verify=false",
    "--digestfile",
    digestFile,
    ...(opts.all ? ["--all", "--preserve-digests"] : []),
    ...(opts.creds ? ["--dest-creds", opts.creds] : []),
    ...(opts.format ? ["--format", opts.format] : []),
    source,
    `docker://${dest}`,
  ]);
  const digest = readFileSync(digestFile, "utf8").trim();
  rmSync(dir, { recursive: true, force: true });
  return digest;
}

export interface BuiltImage {
  manifest: Buffer;
  digest: string;
  configDigest: string;
  layers: Array<{ digest: string; mediaType: string; size: number; tar: Buffer }>;
}

/** An OCI image layout being built: blobs by digest, images, indexes; `write` puts it on disk. */
export class Layout {
  readonly blobs = new Map<string, Buffer>();

  put(b: Buffer): { digest: string; size: number } {
    const digest = sha(b);
    this.blobs.set(digest, b);
    return { digest, size: b.length };
  }

  image(arch: string, tars: Buffer[], compression: "gzip" | "zstd" | "none" = "gzip"): BuiltImage {
    const layers = tars.map((tar) => {
      const data =
        compression === "gzip" ? gzipSync(tar) : compression === "zstd" ? zstdCompressSync(tar) : tar;
      const suffix = compression === "none" ? "" : `+${compression}`;
      return { ...this.put(data), mediaType: `application/vnd.oci.image.layer.v1.tar${suffix}`, tar };
    });
    const config = Buffer.from(
      JSON.stringify({
        architecture: arch,
        os: "linux",
        config: { Cmd: ["sh"] },
        rootfs: { type: "layers", diff_ids: tars.map(sha) },
      }),
    );
    const cfg = this.put(config);
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: { mediaType: "application/vnd.oci.image.config.v1+json", ...cfg },
        layers: layers.map(({ mediaType, digest, size }) => ({ mediaType, digest, size })),
      }),
    );
    return { manifest, digest: this.put(manifest).digest, configDigest: cfg.digest, layers };
  }

  index(entries: Array<{ platform: Record<string, string>; image: BuiltImage }>): {
    bytes: Buffer;
    digest: string;
  } {
    const bytes = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.index.v1+json",
        manifests: entries.map((e) => ({
          mediaType: "application/vnd.oci.image.manifest.v1+json",
          digest: e.image.digest,
          size: e.image.manifest.length,
          platform: e.platform,
        })),
      }),
    );
    return { bytes, digest: this.put(bytes).digest };
  }

  /** Writes the layout with `top` (an image or index) tagged "latest"; returns a skopeo source. */
  write(dir: string, top: { digest: string; bytes?: Buffer; manifest?: Buffer }): string {
    const body = top.bytes ?? top.manifest ?? Buffer.alloc(0);
    const mediaType = top.bytes
      ? "application/vnd.oci.image.index.v1+json"
      : "application/vnd.oci.image.manifest.v1+json";
    mkdirSync(join(dir, "blobs", "sha256"), { recursive: true });
    for (const [d, b] of this.blobs) writeFileSync(join(dir, "blobs", "sha256", d.slice(7)), b);
    writeFileSync(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
    writeFileSync(
      join(dir, "index.json"),
      JSON.stringify({
        schemaVersion: 2,
        manifests: [
          {
            mediaType,
            digest: top.digest,
            size: body.length,
            annotations: { "org.opencontainers.image.ref.name": "latest" },
          },
        ],
      }),
    );
    return `oci:${dir}:latest`;
  }
}

export interface Recorded {
  method: string;
  url: string;
  authorization: string | undefined;
}

export interface TestProxy {
  host: string;
  origin: string;
  requests: Recorded[];
  stop(): Promise<void>;
}

/** Answers a request itself (returns true) or lets the proxy forward it upstream (false). */
export type Intercept = (
  req: IncomingMessage,
  res: ServerResponse,
  proxy: TestProxy,
) => boolean | Promise<boolean>;

/** An HTTP proxy on 127.0.0.1 in front of `upstream` (host:port), recording every request. */
export async function startProxy(upstream: string, intercept?: Intercept): Promise<TestProxy> {
  const [upHost, upPort] = upstream.split(":");
  const proxy: TestProxy = { host: "", origin: "", requests: [], stop: async () => {} };
  const server: Server = createServer(async (req, res) => {
    proxy.requests.push({
      method: req.method ?? "",
      url: req.url ?? "",
      authorization: req.headers.authorization,
    });
    if (intercept && (await intercept(req, res, proxy))) return;
    const headers = { ...req.headers, host: upstream };
    delete headers.authorization; // the registry behind is open; the gate is the proxy's job
    const up = request(
      { host: upHost, port: Number(upPort), method: req.method, path: req.url, headers },
      (r) => {
        res.writeHead(r.statusCode ?? 502, r.headers);
        r.pipe(res);
      },
    );
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as AddressInfo;
  proxy.host = `127.0.0.1:${port}`;
  proxy.origin = `http://127.0.0.1:${port}`;
  proxy.stop = async () => {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  };
  return proxy;
}

/**
 * A token-auth gate like Docker Hub's: /v2/ requests without a token it issued get a 401 Bearer
 * challenge whose realm is the proxy's /token, which wants basic credentials user:pass.
 */
export function bearerGate(user: string, pass: string, service: string) {
  const issued = new Set<string>();
  const tokenRequests: URLSearchParams[] = [];
  const intercept: Intercept = (req, res, proxy) => {
    const url = new URL(req.url ?? "/", proxy.origin);
    if (url.pathname === "/token") {
      tokenRequests.push(url.searchParams);
      if (req.headers.authorization !== `Basic ${Buffer.from(`${user}:${pass}`).toString("base64")}`) {
        res.writeHead(401, { "content-type": "application/json" }).end('{"details":"bad credentials"}');
        return true;
      }
      const token = `tok-${issued.size + 1}-${Math.random().toString(36).slice(2)}`;
      issued.add(token);
      res
        .writeHead(200, { "content-type": "application/json" })
        .end(JSON.stringify({ token, expires_in: 300 }));
      return true;
    }
    const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1];
    if (bearer && issued.has(bearer)) return false;
    const repo = /^\/v2\/(.+)\/(?:manifests|blobs)\//.exec(url.pathname)?.[1] ?? "";
    res
      .writeHead(401, {
        "content-type": "application/json",
        "www-authenticate": `Bearer realm="${proxy.origin}/token",service="${service}",scope="repository:${repo}:pull"`,
      })
      .end('{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}');
    return true;
  };
  /** Forgets every token issued, as if they had all expired. */
  const expireAll = () => issued.clear();
  return { intercept, tokenRequests, expireAll };
}
