import { createHash, randomBytes } from "node:crypto";
import { createWriteStream, existsSync, readFileSync } from "node:fs";
import { mkdir, rename, rm } from "node:fs/promises";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as WebStream } from "node:stream/web";
import { setTimeout as sleep } from "node:timers/promises";
import { type ErrorCode, InvalidArgumentError, MatchlockError, messageOf } from "../api/errors.ts";
import { readOciConfig } from "./oci-config.ts";
import { formatReference, type ImageRef } from "./reference.ts";

/**
 * Pulls an image from a Docker Registry v2 / OCI distribution registry into the blob store, on the
 * global fetch. Only linux/<arch> is fetched from an index. Every manifest and blob is checked
 * against its sha256 (blobs while streaming, to a temp file renamed into place once verified).
 *
 * Transport: loopback registries (localhost, 127.0.0.0/8, [::1]) and `insecure: true` use plain
 * HTTP only; everything else HTTPS only. (Docker tries HTTPS then HTTP for these; a local test or
 * dev registry is nearly always plain HTTP, and a silent downgrade is what we want to avoid.)
 * Credentials come from the docker config's `auths` (`auth` or `username`/`password`); credential
 * helpers and identity tokens are not supported.
 *
 * Errors are RegistryErrors (`status` = the HTTP status): IMAGE_NOT_FOUND for 404 and for 401/403
 * once auth was tried (registries answer 401 for repositories you may not see); INVALID_ARGUMENT
 * for schema 1, unsupported media types and no linux/<arch> image; INTERNAL for digest mismatches,
 * other 4xx, unreachable registries and retries run out. An aborted `signal` gives CANCELLED.
 */

export interface PullProgress {
  digest: string;
  total: number;
  done: number;
  phase: "manifest" | "blob" | "exists" | "verified";
}

export interface PullOptions {
  /** Where a blob of this digest must end up (the store's path); skip the download if it exists. */
  blobPath(digest: string): string;
  /** A scratch dir on the same filesystem for partial downloads (write there, verify, rename). */
  tmpDir: string;
  /** Default "amd64". */
  arch?: string;
  /** Allow plain HTTP to a non-loopback registry (loopback registries always use plain HTTP). */
  insecure?: boolean;
  /** Default $DOCKER_CONFIG/config.json, else ~/.docker/config.json. */
  dockerConfigPath?: string;
  onProgress?(p: PullProgress): void;
  fetchImpl?: typeof fetch;
  /** Retries of 5xx, 429 and connection resets; default 4, backoff 200 ms × 2^n with jitter. */
  retries?: number;
  signal?: AbortSignal;
}

export interface PulledImage {
  /** The manifest digest (sha256:…) the reference resolved to for linux/<arch>. */
  manifestDigest: string;
  configDigest: string;
  layers: Array<{ digest: string; mediaType: string; size: number }>;
  /** Bytes downloaded (0 when every blob was already present). */
  downloaded: number;
}

type ErrorOptions = { status?: number | undefined; hint?: string; cause?: unknown };

export class RegistryError extends MatchlockError {
  /** The HTTP status that caused it, if any. */
  readonly status: number | undefined;
  constructor(code: ErrorCode, message: string, opts: ErrorOptions = {}) {
    super(code, message, { hint: opts.hint, cause: opts.cause });
    this.name = "RegistryError";
    this.status = opts.status;
  }
}

/** A failure worth retrying (5xx, 429); turned into a RegistryError once retries run out. */
class Transient extends Error {
  readonly status: number;
  readonly waitMs: number;
  constructor(message: string, status: number, waitMs: number) {
    super(message);
    this.status = status;
    this.waitMs = waitMs;
  }
}

const OCI_INDEX = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPT = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
const CONFIG_TYPES = new Set([
  "application/vnd.oci.image.config.v1+json",
  "application/vnd.docker.container.image.v1+json",
]);
const LAYER_TYPES = new Set([
  "application/vnd.oci.image.layer.v1.tar",
  "application/vnd.oci.image.layer.v1.tar+gzip",
  "application/vnd.oci.image.layer.v1.tar+zstd",
  "application/vnd.docker.image.rootfs.diff.tar.gzip",
]);
const MAX_JSON = 4 * 1024 * 1024;
const DIGEST = /^sha256:[a-f0-9]{64}$/;
/** Connection failures that a retry may cure (not refused/unknown host: those fail fast). */
const TRANSIENT_CODE = /^(ECONNRESET|EPIPE|ETIMEDOUT|ECONNABORTED|EAI_AGAIN|UND_ERR_(SOCKET|\w+_TIMEOUT))$/;

interface Descriptor {
  mediaType?: string;
  digest: string;
  size: number;
  platform?: { os?: string; architecture?: string; variant?: string };
}
interface Manifest {
  schemaVersion?: number;
  mediaType?: string;
  config?: Descriptor;
  layers?: Descriptor[];
  manifests?: Descriptor[];
}

const sha256 = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;
const internal = (message: string, status?: number) => new RegistryError("INTERNAL", message, { status });
const basicAuth = (c: { user: string; pass: string }) =>
  `Basic ${Buffer.from(`${c.user}:${c.pass}`).toString("base64")}`;

export function isLoopback(host: string): boolean {
  const h = host.startsWith("[") ? host.slice(0, host.indexOf("]") + 1) : (host.split(":")[0] ?? "");
  return h === "localhost" || h === "[::1]" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/** `Bearer realm="…",service="…",scope="repository:a:pull"` → scheme + params (scope may hold commas). */
export function parseChallenge(header: string): { scheme: string; params: Record<string, string> } {
  const m = /^\s*([\w-]+)\s*(.*)$/s.exec(header);
  const params: Record<string, string> = {};
  for (const p of (m?.[2] ?? "").matchAll(/([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))/g))
    params[(p[1] ?? "").toLowerCase()] = (p[2] ?? p[3] ?? "").replace(/\\(.)/g, "$1");
  return { scheme: (m?.[1] ?? "").toLowerCase(), params };
}

/** The JSON body, or the first bytes of text, of an error response: what the registry said. */
async function detailOf(res: Response): Promise<string> {
  const text = (await res.text().catch(() => "")).slice(0, 4096);
  try {
    const errs = (JSON.parse(text) as { errors?: Array<{ code?: string; message?: string }> }).errors ?? [];
    if (errs.length > 0) return errs.map((e) => e.message ?? e.code).join("; ");
  } catch {}
  return text.trim().slice(0, 200) || res.statusText;
}

/** Reads a small body (manifest, token), refusing more than `cap` bytes without buffering them. */
async function readCapped(res: Response, cap: number, what: string): Promise<Buffer> {
  const tooBig = internal(`${what} is larger than ${cap >> 20} MiB; refusing it`);
  if (Number(res.headers.get("content-length") ?? 0) > cap) {
    await res.body?.cancel();
    throw tooBig;
  }
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of (res.body ?? []) as AsyncIterable<Uint8Array>) {
    n += c.length;
    if (n > cap) throw tooBig; // leaving the loop cancels the stream
    chunks.push(Buffer.from(c));
  }
  return Buffer.concat(chunks);
}

function isTransient(e: unknown): boolean {
  for (let c: unknown = e; c instanceof Error; c = c.cause) {
    if (c instanceof Transient) return true;
    const code = (c as { code?: unknown }).code;
    if (typeof code === "string" && TRANSIENT_CODE.test(code)) return true;
  }
  return false;
}

/** One registry and repository, for one pull: the scheme, credentials and tokens it found. */
class Repo {
  private readonly base: string;
  private readonly fetch: typeof fetch;
  /** Bearer tokens per (realm, service, scope): `header` is set once the token has arrived. */
  private readonly tokens = new Map<string, { header?: string; promise: Promise<string> }>();
  private auth: string | undefined;
  private credsFile: string | undefined;
  private readonly configFile: string;
  private readonly opts: PullOptions;
  readonly ref: ImageRef;
  readonly name: string;

  constructor(ref: ImageRef, opts: PullOptions) {
    this.ref = ref;
    this.opts = opts;
    // Docker Hub's API lives on another host than its name.
    const host = ref.domain === "docker.io" ? "registry-1.docker.io" : ref.domain;
    this.base = `${isLoopback(host) || opts.insecure ? "http" : "https"}://${host}/v2/${ref.path}`;
    this.fetch = opts.fetchImpl ?? globalThis.fetch;
    this.name = formatReference(ref);
    this.configFile =
      opts.dockerConfigPath ?? join(process.env.DOCKER_CONFIG ?? join(homedir(), ".docker"), "config.json");
  }

  /** Runs `fn` again on 5xx, 429 and connection resets, with exponential backoff and jitter. */
  async retrying<T>(fn: () => Promise<T>, signal = this.opts.signal): Promise<T> {
    const retries = this.opts.retries ?? 4;
    for (let attempt = 0; ; attempt++) {
      try {
        return await fn();
      } catch (e) {
        if (!isTransient(e)) {
          if (e instanceof MatchlockError || (e as Error).name === "AbortError") throw e;
          const msg = `cannot reach registry ${this.ref.domain}: ${causeOf(e)}`;
          throw new RegistryError("INTERNAL", msg, { cause: e });
        }
        if (attempt >= retries) {
          const msg = `registry ${this.ref.domain} failed after ${retries + 1} attempts: ${causeOf(e)}`;
          throw new RegistryError("INTERNAL", msg, { status: (e as Transient).status, cause: e });
        }
        const backoff = 200 * 2 ** attempt * (0.5 + Math.random());
        await sleep(Math.max(backoff, e instanceof Transient ? e.waitMs : 0), undefined, { signal });
      }
    }
  }

  /** GET <base>/<path>, answering one 401 with the challenge's auth; throws on anything but 2xx. */
  async get(path: string, accept: string, what: string, signal?: AbortSignal): Promise<Response> {
    let sent: string | undefined;
    const send = () => {
      sent = this.auth;
      return this.fetch(`${this.base}/${path}`, {
        // identity: fetch would transparently gunzip a Content-Encoding'd blob and break its digest.
        headers: {
          accept,
          "accept-encoding": "identity",
          "user-agent": "matchlock",
          ...(sent ? { authorization: sent } : {}),
        },
        redirect: "follow", // fetch drops Authorization on a cross-origin hop (S3-style blob URLs)
        signal: signal ?? this.opts.signal ?? null,
      });
    };
    let res = await send();
    if (res.status === 401) {
      const challenge = res.headers.get("www-authenticate") ?? "";
      await res.body?.cancel();
      // A token refused here may have expired mid-pull (or another layer's request already renewed it).
      this.auth = await this.authenticate(challenge, sent);
      res = await send();
    }
    if (res.ok) return res;
    const detail = await detailOf(res);
    const status = res.status;
    if (status === 404) {
      throw new RegistryError("IMAGE_NOT_FOUND", `${what} not found: ${detail}`, {
        status,
        hint: "check the repository name and tag (`matchlock` pulls linux images by tag or @sha256 digest)",
      });
    }
    if (status === 401 || status === 403) throw this.authError(status);
    if (status === 429 || status >= 500) {
      const after = Number(res.headers.get("retry-after"));
      throw new Transient(
        `HTTP ${status} for ${what}: ${detail}`,
        status,
        Math.min(after * 1000 || 0, 10_000),
      );
    }
    throw internal(`registry ${this.ref.domain} answered HTTP ${status} for ${what}: ${detail}`, status);
  }

  /** The Authorization header a 401 challenge asks for; `stale` is the one that was just refused. */
  private authenticate(header: string, stale: string | undefined): Promise<string> {
    const { scheme, params } = parseChallenge(header);
    const creds = this.credentials();
    if (scheme === "basic") {
      return creds ? Promise.resolve(basicAuth(creds)) : Promise.reject(this.authError(401));
    }
    if (scheme !== "bearer" || !params.realm)
      return Promise.reject(internal(`registry ${this.ref.domain} sent an unusable challenge: "${header}"`));
    const scope = params.scope ?? `repository:${this.ref.path}:pull`;
    const key = `${params.realm} ${params.service ?? ""} ${scope}`;
    // Share a token being fetched, or a newer one than was refused: parallel layers renew it once.
    const cached = this.tokens.get(key);
    if (cached && cached.header !== stale) return cached.promise;
    const entry: { header?: string; promise: Promise<string> } = {
      promise: this.fetchToken(params.realm, params.service, scope, creds).then(
        (token) => {
          entry.header = `Bearer ${token}`;
          return entry.header;
        },
        (e) => {
          if (this.tokens.get(key) === entry) this.tokens.delete(key);
          throw e;
        },
      ),
    };
    this.tokens.set(key, entry);
    return entry.promise;
  }

  private async fetchToken(
    realm: string,
    service: string | undefined,
    scope: string,
    creds: { user: string; pass: string } | undefined,
  ): Promise<string> {
    const url = URL.parse(realm);
    if (!url) throw internal(`registry ${this.ref.domain} sent a bad token realm "${realm}"`);
    // Never send credentials in clear to a host the user did not mark insecure.
    const clearOk = url.protocol === "http:" && (isLoopback(url.host) || this.opts.insecure);
    if (url.protocol !== "https:" && !clearOk)
      throw internal(`refusing the token realm ${url.origin}: not HTTPS`);
    if (service) url.searchParams.set("service", service);
    for (const s of scope.split(" ")) url.searchParams.append("scope", s);
    const res = await this.fetch(url, {
      headers: creds ? { authorization: basicAuth(creds) } : {},
      signal: this.opts.signal ?? null,
    });
    if (res.status === 401 || res.status === 403) {
      await res.body?.cancel();
      throw this.authError(res.status);
    }
    if (!res.ok) {
      const detail = await detailOf(res);
      if (res.status === 429 || res.status >= 500)
        throw new Transient(`token: HTTP ${res.status}`, res.status, 0);
      throw internal(`token endpoint ${url.origin} answered HTTP ${res.status}: ${detail}`, res.status);
    }
    let body: { token?: string; access_token?: string };
    try {
      body = JSON.parse((await readCapped(res, 1 << 20, "the token response")).toString("utf8"));
    } catch (e) {
      throw internal(`bad token response from ${url.origin}: ${messageOf(e)}`);
    }
    const token = body.token ?? body.access_token;
    if (!token) throw internal(`the token response from ${url.origin} has no token`);
    return token;
  }

  /** user:pass for this registry from the docker config's `auths`, if any. */
  private credentials(): { user: string; pass: string } | undefined {
    const file = this.configFile;
    if (!existsSync(file)) return undefined;
    type Auth = { auth?: string; username?: string; password?: string };
    let auths: Record<string, Auth>;
    try {
      auths = (JSON.parse(readFileSync(file, "utf8")) as { auths?: Record<string, Auth> }).auths ?? {};
    } catch (e) {
      throw new InvalidArgumentError(`cannot read the docker config ${file}: ${messageOf(e)}`);
    }
    const names =
      this.ref.domain === "docker.io"
        ? ["docker.io", "index.docker.io", "registry-1.docker.io"]
        : [this.ref.domain];
    for (const [key, a] of Object.entries(auths)) {
      // Keys are "host[:port]" or URLs like "https://index.docker.io/v1/".
      if (!names.includes(key.replace(/^\w+:\/\//, "").replace(/\/.*$/, ""))) continue;
      this.credsFile = file;
      if (a.auth) {
        const plain = Buffer.from(a.auth, "base64").toString("utf8");
        const colon = plain.indexOf(":");
        if (colon > 0) return { user: plain.slice(0, colon), pass: plain.slice(colon + 1) };
      }
      if (a.username && a.password) return { user: a.username, pass: a.password };
    }
    return undefined;
  }

  /** 401 after answering the challenge: "required" without credentials, "failed" with them. */
  private authError(status: number): RegistryError {
    const host = this.ref.domain;
    const msg =
      status === 403
        ? `access to ${this.ref.path} denied by ${host}`
        : `authentication ${this.credsFile ? "failed" : "required"} for ${host} (pulling ${this.name})`;
    const hint = this.credsFile
      ? `check the credentials for "${host}" in ${this.credsFile}`
      : `add {"auths": {"${host}": {"auth": "<base64 of user:password>"}}} to ${this.configFile} (or run \`docker login ${host}\`)`;
    return new RegistryError("IMAGE_NOT_FOUND", msg, { status, hint });
  }
}

function causeOf(e: unknown): string {
  const parts: string[] = [];
  for (let c: unknown = e; c !== undefined && parts.length < 3; c = (c as Error).cause) {
    const code = (c as { code?: unknown }).code;
    parts.push(typeof code === "string" ? `${messageOf(c)} (${code})` : messageOf(c));
    if (!(c instanceof Error)) break;
  }
  return parts.join(": ");
}

function unsupported(what: string, type: string | undefined): RegistryError {
  return new RegistryError(
    "INVALID_ARGUMENT",
    `${what} has the unsupported media type "${type ?? "(none)"}"`,
    {
      hint: "matchlock runs OCI and Docker schema 2 images (manifests, indexes, gzip/zstd/plain tar layers)",
    },
  );
}

function checkDescriptor(d: Descriptor | undefined, what: string): Descriptor {
  // The digest becomes a file name: only sha256:<hex> gets through.
  if (d && DIGEST.test(String(d.digest)) && Number.isSafeInteger(d.size) && d.size >= 0) return d;
  throw internal(`the manifest's ${what} has no valid sha256 digest and size`);
}

/** Fetches manifests until one for linux/<arch>; verifies each against the digest that named it. */
async function resolve(repo: Repo, opts: PullOptions): Promise<{ digest: string; manifest: Manifest }> {
  const arch = opts.arch ?? "amd64";
  let reference = repo.ref.digest ?? repo.ref.tag ?? "latest";
  let expected = repo.ref.digest;
  for (let depth = 0; depth < 3; depth++) {
    const what = `image ${repo.name}${depth > 0 ? ` (manifest ${reference})` : ""}`;
    const { bytes, type, claimed } = await repo.retrying(async () => {
      const res = await repo.get(`manifests/${reference}`, ACCEPT, what);
      const type = res.headers.get("content-type")?.split(";")[0]?.trim();
      const claimed = res.headers.get("docker-content-digest");
      return { bytes: await readCapped(res, MAX_JSON, `the manifest of ${repo.name}`), type, claimed };
    });
    const digest = sha256(bytes);
    // By digest, the bytes must hash to it; by tag, to what the registry says the tag points at.
    const want = expected ?? (claimed?.startsWith("sha256:") ? claimed : digest);
    if (digest !== want)
      throw internal(`digest mismatch for the manifest of ${repo.name}: got ${digest}, want ${want}`);
    opts.onProgress?.({ digest, total: bytes.length, done: bytes.length, phase: "manifest" });
    let m: Manifest;
    try {
      m = JSON.parse(bytes.toString("utf8")) as Manifest;
    } catch {
      throw internal(`the manifest of ${repo.name} is not valid JSON`);
    }
    const mediaType = m.mediaType ?? type;
    if (m.schemaVersion === 1 || mediaType?.startsWith("application/vnd.docker.distribution.manifest.v1"))
      throw new RegistryError(
        "INVALID_ARGUMENT",
        `${repo.name} is a Docker schema 1 image, which is not supported`,
        {
          hint: "re-push it with a current docker or skopeo to get a schema 2 / OCI manifest",
        },
      );
    // OCI lets mediaType be left out: then the shape says what it is.
    if (
      mediaType === OCI_INDEX ||
      mediaType === DOCKER_LIST ||
      (!m.mediaType && Array.isArray(m.manifests))
    ) {
      const entries = (m.manifests ?? []).map((d) => checkDescriptor(d, "index entry"));
      const pick = entries.find((d) => d.platform?.os === "linux" && d.platform.architecture === arch);
      if (!pick) {
        const offered = entries.map((d) =>
          [d.platform?.os, d.platform?.architecture, d.platform?.variant].filter(Boolean).join("/"),
        );
        throw new RegistryError("INVALID_ARGUMENT", `${repo.name} has no linux/${arch} image`, {
          hint: `it offers: ${offered.filter(Boolean).join(", ") || "no platforms"}`,
        });
      }
      reference = pick.digest;
      expected = pick.digest;
      continue;
    }
    if (mediaType === OCI_MANIFEST || mediaType === DOCKER_MANIFEST || (!m.mediaType && m.config)) {
      const config = checkDescriptor(m.config, "config");
      if (!CONFIG_TYPES.has(config.mediaType ?? ""))
        throw unsupported(`the config of ${repo.name}`, config.mediaType);
      if (config.size > MAX_JSON) throw internal(`the config of ${repo.name} is over 4 MiB`);
      for (const l of m.layers ?? []) {
        checkDescriptor(l, "layer");
        if (!LAYER_TYPES.has(l.mediaType ?? "")) throw unsupported(`a layer of ${repo.name}`, l.mediaType);
      }
      return { digest, manifest: m };
    }
    throw unsupported(`the manifest of ${repo.name}`, mediaType);
  }
  throw internal(`${repo.name}: indexes nested too deeply`);
}

/** Streams one blob to tmpDir while hashing, verifies digest and size, renames it into place. */
async function fetchBlob(repo: Repo, d: Descriptor, opts: PullOptions, signal: AbortSignal): Promise<number> {
  const dest = opts.blobPath(d.digest);
  if (existsSync(dest)) {
    opts.onProgress?.({ digest: d.digest, total: d.size, done: d.size, phase: "exists" });
    return 0;
  }
  return repo.retrying(async () => {
    const res = await repo.get(`blobs/${d.digest}`, "*/*", `blob ${d.digest} of ${repo.name}`, signal);
    if (!res.body) throw internal(`the registry sent no body for blob ${d.digest}`);
    const tmp = join(opts.tmpDir, `${d.digest.slice(7)}.${randomBytes(4).toString("hex")}.partial`);
    const mismatch = (why: string) =>
      internal(`digest mismatch for blob ${d.digest} of ${repo.name}: ${why}`);
    const hash = createHash("sha256");
    let done = 0;
    const meter = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        done += chunk.length;
        if (done > d.size) return cb(mismatch(`more than the ${d.size} bytes the manifest declares`));
        hash.update(chunk);
        opts.onProgress?.({ digest: d.digest, total: d.size, done, phase: "blob" });
        cb(null, chunk);
      },
    });
    try {
      await pipeline(Readable.fromWeb(res.body as WebStream), meter, createWriteStream(tmp, { flags: "wx" }));
      const got = `sha256:${hash.digest("hex")}`;
      if (done !== d.size) throw mismatch(`got ${done} bytes, the manifest declares ${d.size}`);
      if (got !== d.digest) throw mismatch(`the content hashes to ${got}`);
      await mkdir(dirname(dest), { recursive: true });
      await rename(tmp, dest);
    } finally {
      await rm(tmp, { force: true });
    }
    opts.onProgress?.({ digest: d.digest, total: d.size, done, phase: "verified" });
    return done;
  }, signal);
}

export async function pullImage(ref: ImageRef, opts: PullOptions): Promise<PulledImage> {
  try {
    return await pull(ref, opts);
  } catch (e) {
    if (opts.signal?.aborted)
      throw new MatchlockError("CANCELLED", `pull of ${formatReference(ref)} cancelled`, { cause: e });
    throw e;
  }
}

async function pull(ref: ImageRef, opts: PullOptions): Promise<PulledImage> {
  const repo = new Repo(ref, opts);
  const arch = opts.arch ?? "amd64";
  await mkdir(opts.tmpDir, { recursive: true });
  const { digest, manifest } = await resolve(repo, opts);
  const config = manifest.config as Descriptor;
  const layers = (manifest.layers ?? []).map((l) => ({
    digest: l.digest,
    mediaType: l.mediaType ?? "",
    size: l.size,
  }));

  // The config first: it is small, and a wrong platform should fail before any layer moves.
  const stop = new AbortController();
  const signal = opts.signal ? AbortSignal.any([opts.signal, stop.signal]) : stop.signal;
  let downloaded = await fetchBlob(repo, config, opts, signal);
  const oci = readOciConfig(opts.blobPath(config.digest), repo.name);
  if ((oci.os && oci.os !== "linux") || (oci.architecture && oci.architecture !== arch)) {
    const msg = `${repo.name} is a ${oci.os}/${oci.architecture} image, not linux/${arch}`;
    throw new RegistryError("INVALID_ARGUMENT", msg);
  }

  // Three layers at a time, as docker does; the first failure stops the others.
  const queue = [...new Map(layers.map((l) => [l.digest, l])).values()];
  const errors: unknown[] = [];
  const worker = async () => {
    for (let l = queue.shift(); l && errors.length === 0; l = queue.shift()) {
      try {
        const n = await fetchBlob(repo, l, opts, signal);
        downloaded += n;
      } catch (e) {
        errors.push(e);
        stop.abort();
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(3, queue.length) }, worker));
  if (errors.length > 0) throw errors[0];
  return { manifestDigest: digest, configDigest: config.digest, layers, downloaded };
}
