import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { gunzipSync, zstdDecompressSync } from "node:zlib";
import { parseReference } from "../../src/image/reference.ts";
import {
  type PullOptions,
  type PullProgress,
  parseChallenge,
  pullImage,
  RegistryError,
} from "../../src/image/registry.ts";
import { busyboxLayer, dockerSave, makeTar } from "../helpers/images.ts";
import {
  bearerGate,
  freePort,
  Layout,
  push,
  requireTools,
  sha,
  startProxy,
  startRegistry,
  type TestProxy,
  type TestRegistry,
} from "../helpers/registry.ts";

/**
 * The registry client against real registries: Debian's docker-registry on loopback, images pushed
 * with skopeo, and a small proxy in front for token auth, failures, redirects and odd answers.
 * No VM boots here; pulls land in a temp blob dir laid out like the store's.
 */

const work = mkdtempSync(join(tmpdir(), "matchlock-pull-"));
let reg: TestRegistry;
const cleanups: Array<() => Promise<void>> = [];
before(async () => {
  requireTools();
  reg = await startRegistry();
});
after(async () => {
  for (const c of cleanups) await c();
  await reg?.stop();
  rmSync(work, { recursive: true, force: true });
});

async function proxy(...args: Parameters<typeof startProxy>): Promise<TestProxy> {
  const p = await startProxy(...args);
  cleanups.push(p.stop);
  return p;
}

/** A fresh blob dir and pull options for it (with no docker config unless a test writes one). */
function store(extra: Partial<PullOptions> = {}) {
  const dir = mkdtempSync(join(work, "store-"));
  const events: PullProgress[] = [];
  const opts: PullOptions = {
    blobPath: (d) => join(dir, "blobs", "sha256", d.slice(7)),
    tmpDir: join(dir, "tmp"),
    dockerConfigPath: join(dir, "docker-config.json"),
    onProgress: (p) => events.push(p),
    ...extra,
  };
  const dockerConfig = (auths: Record<string, unknown>) =>
    writeFileSync(opts.dockerConfigPath as string, JSON.stringify({ auths }));
  return { dir, opts, events, dockerConfig, blob: (d: string) => readFileSync(opts.blobPath(d)) };
}

const layer = (text: string) =>
  makeTar([{ name: "hello.txt", content: `${text} ${process.pid} ${Math.random()}\n` }]);
const basic = (user: string, pass: string) => Buffer.from(`${user}:${pass}`).toString("base64");

/** Pushes a one-image OCI layout (gzip layers unless told) to reg as `repo:tag`. */
async function pushImage(repo: string, tars: Buffer[], opts: { arch?: string; zstd?: boolean } = {}) {
  const l = new Layout();
  const image = l.image(opts.arch ?? "amd64", tars, opts.zstd ? "zstd" : "gzip");
  const pushed = await push(l.write(mkdtempSync(join(work, "layout-")), image), `${reg.host}/${repo}`);
  assert.equal(pushed, image.digest);
  return image;
}

function rejectsWith(code: string, message: RegExp, more: (e: RegistryError) => void = () => {}) {
  return (e: unknown) => {
    assert.ok(e instanceof RegistryError, `expected a RegistryError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
    more(e);
    return true;
  };
}

describe("pull from docker-registry", () => {
  test("a schema2 image pushed from a docker-save archive pulls by tag, again (0 bytes), and by digest", async () => {
    const tars = [await busyboxLayer(), await layer("top")];
    const archive = join(work, "app.tar");
    writeFileSync(archive, await dockerSave({ layers: tars, config: { Cmd: ["sh"] } }, "team/app:1.2"));
    const digest = await push(`docker-archive:${archive}`, `${reg.host}/team/app:1.2`);

    const s = store();
    const r = await pullImage(parseReference(`${reg.host}/team/app:1.2`), s.opts);
    assert.equal(r.manifestDigest, digest);
    assert.equal(r.layers.length, 2);
    const config = JSON.parse(s.blob(r.configDigest).toString()) as { rootfs: { diff_ids: string[] } };
    assert.equal(sha(s.blob(r.configDigest)), r.configDigest);
    assert.deepEqual(config.rootfs.diff_ids, tars.map(sha));
    r.layers.forEach((l, i) => {
      assert.equal(l.mediaType, "application/vnd.docker.image.rootfs.diff.tar.gzip");
      assert.equal(sha(s.blob(l.digest)), l.digest);
      assert.equal(s.blob(l.digest).length, l.size);
      assert.ok(gunzipSync(s.blob(l.digest)).equals(tars[i] as Buffer), "skopeo's gzip layer holds our tar");
    });
    const total = r.layers.reduce((n, l) => n + l.size, 0) + s.blob(r.configDigest).length;
    assert.equal(r.downloaded, total);
    assert.deepEqual(readdirSync(s.opts.tmpDir), []);
    assert.equal(s.events[0]?.phase, "manifest");
    for (const l of r.layers) {
      const mine = s.events.filter((e) => e.digest === l.digest);
      assert.equal(mine.at(-1)?.phase, "verified");
      assert.ok(mine.some((e) => e.phase === "blob" && e.done === l.size && e.total === l.size));
    }

    s.events.length = 0;
    const again = await pullImage(parseReference(`${reg.host}/team/app:1.2`), s.opts);
    assert.equal(again.downloaded, 0);
    assert.deepEqual(
      s.events.filter((e) => e.phase !== "manifest").map((e) => e.phase),
      ["exists", "exists", "exists"],
    );

    const byDigest = await pullImage(parseReference(`${reg.host}/team/app@${digest}`), store().opts);
    assert.deepEqual({ ...byDigest, downloaded: 0 }, { ...r, downloaded: 0 });
    assert.equal(byDigest.downloaded, total);
  });

  test("a multi-arch index resolves to linux/amd64 (a zstd layer), or linux/arm64 when asked", async () => {
    const l = new Layout();
    const amdTar = await layer("amd64");
    const amd = l.image("amd64", [amdTar], "zstd");
    const arm = l.image("arm64", [await layer("arm64")], "gzip");
    const index = l.index([
      { platform: { os: "linux", architecture: "arm64", variant: "v8" }, image: arm },
      { platform: { os: "linux", architecture: "amd64" }, image: amd },
    ]);
    const src = l.write(mkdtempSync(join(work, "layout-")), index);
    assert.equal(await push(src, `${reg.host}/team/multi:1`, { all: true }), index.digest);

    const s = store();
    const r = await pullImage(parseReference(`${reg.host}/team/multi:1`), s.opts);
    assert.equal(r.manifestDigest, amd.digest);
    assert.equal(r.configDigest, amd.configDigest);
    assert.deepEqual(r.layers, [
      {
        digest: amd.layers[0]?.digest,
        mediaType: "application/vnd.oci.image.layer.v1.tar+zstd",
        size: amd.layers[0]?.size,
      },
    ]);
    const blob = s.blob(r.layers[0]?.digest ?? "");
    assert.deepEqual([...blob.subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    assert.ok(zstdDecompressSync(blob).equals(amdTar));
    assert.equal(existsSync(s.opts.blobPath(arm.layers[0]?.digest ?? "")), false, "no arm64 blob fetched");

    const armPull = await pullImage(parseReference(`${reg.host}/team/multi:1`), {
      ...store().opts,
      arch: "arm64",
    });
    assert.equal(armPull.manifestDigest, arm.digest);
    const byIndexDigest = await pullImage(
      parseReference(`${reg.host}/team/multi@${index.digest}`),
      store().opts,
    );
    assert.equal(byIndexDigest.manifestDigest, amd.digest);
  });

  test("an image without linux/amd64 is refused, naming what it offers, before any layer moves", async () => {
    const l = new Layout();
    const arm = l.image("arm64", [await layer("arm")]);
    const s390 = l.image("s390x", [await layer("s390x")]);
    const index = l.index([
      { platform: { os: "linux", architecture: "arm64", variant: "v8" }, image: arm },
      { platform: { os: "linux", architecture: "s390x" }, image: s390 },
    ]);
    await push(l.write(mkdtempSync(join(work, "layout-")), index), `${reg.host}/team/armonly:1`, {
      all: true,
    });
    await assert.rejects(
      pullImage(parseReference(`${reg.host}/team/armonly:1`), store().opts),
      rejectsWith("INVALID_ARGUMENT", /team\/armonly:1 has no linux\/amd64 image/, (e) =>
        assert.equal(e.hint, "it offers: linux/arm64/v8, linux/s390x"),
      ),
    );

    // A single-arch manifest says its platform only in the config: checked before the layers.
    const single = await pushImage("team/armsingle:1", [await layer("arm single")], { arch: "arm64" });
    const s = store();
    await assert.rejects(
      pullImage(parseReference(`${reg.host}/team/armsingle:1`), s.opts),
      rejectsWith("INVALID_ARGUMENT", /is a linux\/arm64 image, not linux\/amd64/),
    );
    assert.equal(existsSync(s.opts.blobPath(single.layers[0]?.digest ?? "")), false);
  });

  test("a missing tag or repository is IMAGE_NOT_FOUND (404)", async () => {
    await pushImage("team/present:1", [await layer("present")]);
    for (const name of ["team/present:nope", "team/absent:1", `team/present@sha256:${"a".repeat(64)}`]) {
      await assert.rejects(
        pullImage(parseReference(`${reg.host}/${name}`), store().opts),
        rejectsWith("IMAGE_NOT_FOUND", /not found/, (e) => {
          assert.equal(e.status, 404);
          assert.ok(e.message.includes(`${reg.host}/${name}`), e.message);
        }),
      );
    }
  });

  test("a blob corrupted in the registry's storage fails verification and leaves nothing behind", async () => {
    const image = await pushImage("team/tamper:1", [await layer("tamper me")]);
    const victim = image.layers[0]?.digest ?? "";
    const file = reg.blobFile(victim);
    const bytes = readFileSync(file);
    bytes[bytes.length >> 1] = (bytes[bytes.length >> 1] ?? 0) ^ 0xff; // same size, different content
    writeFileSync(file, bytes);

    const s = store();
    await assert.rejects(
      pullImage(parseReference(`${reg.host}/team/tamper:1`), s.opts),
      rejectsWith("INTERNAL", new RegExp(`digest mismatch for blob ${victim}.*hashes to sha256:`)),
    );
    assert.equal(existsSync(s.opts.blobPath(victim)), false);
    assert.deepEqual(readdirSync(s.opts.tmpDir), []);
  });
});

describe("registry auth", () => {
  test("basic auth (htpasswd): no credentials, wrong ones, then from the docker config", async () => {
    const priv = await startRegistry({ user: "alice", pass: "s3cret" });
    cleanups.push(priv.stop);
    const l = new Layout();
    const image = l.image("amd64", [await layer("private")]);
    const src = l.write(mkdtempSync(join(work, "layout-")), image);
    await push(src, `${priv.host}/team/private:1`, { creds: "alice:s3cret" });
    const ref = parseReference(`${priv.host}/team/private:1`);

    const s = store();
    await assert.rejects(
      pullImage(ref, s.opts),
      rejectsWith("IMAGE_NOT_FOUND", new RegExp(`authentication required for ${priv.host}`), (e) => {
        assert.equal(e.status, 401);
        assert.match(e.hint ?? "", /"auths"/);
        assert.ok(e.hint?.includes(s.opts.dockerConfigPath as string));
      }),
    );
    s.dockerConfig({ [priv.host]: { auth: basic("alice", "wrong") } });
    await assert.rejects(
      pullImage(ref, s.opts),
      rejectsWith("IMAGE_NOT_FOUND", new RegExp(`authentication failed for ${priv.host}`), (e) =>
        assert.match(e.hint ?? "", /check the credentials/),
      ),
    );
    s.dockerConfig({
      "other.example:5000": { auth: basic("x", "y") },
      [priv.host]: { auth: basic("alice", "s3cret") },
    });
    assert.equal((await pullImage(ref, s.opts)).manifestDigest, image.digest);

    // $DOCKER_CONFIG is honoured, with URL-style keys and username/password fields.
    const dir = mkdtempSync(join(work, "docker-"));
    writeFileSync(
      join(dir, "config.json"),
      JSON.stringify({ auths: { [`http://${priv.host}/v2/`]: { username: "alice", password: "s3cret" } } }),
    );
    const { dockerConfigPath: _, ...opts } = store().opts;
    const saved = process.env.DOCKER_CONFIG;
    process.env.DOCKER_CONFIG = dir;
    try {
      assert.equal((await pullImage(ref, opts)).manifestDigest, image.digest);
    } finally {
      if (saved === undefined) delete process.env.DOCKER_CONFIG;
      else process.env.DOCKER_CONFIG = saved;
    }
  });

  test("bearer tokens: challenge → one token for the repo's pull scope → blobs via a cross-origin redirect", async () => {
    const image = await pushImage("team/app:tok", [await layer("tok1"), await layer("tok2")]);
    const raw = await proxy(reg.host); // a second origin for blob redirects, like S3
    const gate = bearerGate("bob", "hunter2", "matchlock-test");
    const front = await proxy(reg.host, async (req, res, p) => {
      if (await gate.intercept(req, res, p)) return true;
      if (!req.url?.includes("/blobs/")) return false;
      res.writeHead(307, { location: `${raw.origin}${req.url}` }).end();
      return true;
    });
    const ref = parseReference(`${front.host}/team/app:tok`);

    const anon = store();
    await assert.rejects(
      pullImage(ref, anon.opts),
      rejectsWith("IMAGE_NOT_FOUND", new RegExp(`authentication required for ${front.host}`)),
    );

    const s = store();
    s.dockerConfig({ [front.host]: { auth: basic("bob", "hunter2") } });
    gate.tokenRequests.length = 0;
    front.requests.length = 0;
    const r = await pullImage(ref, s.opts);
    assert.equal(r.manifestDigest, image.digest);
    assert.equal(gate.tokenRequests.length, 1, "one token, reused for the manifest and every blob");
    assert.equal(gate.tokenRequests[0]?.get("scope"), "repository:team/app:pull");
    assert.equal(gate.tokenRequests[0]?.get("service"), "matchlock-test");
    const v2 = front.requests.filter((q) => q.url.startsWith("/v2/"));
    assert.equal(v2[0]?.authorization, undefined);
    assert.ok(
      v2.slice(1).every((q) => q.authorization?.startsWith("Bearer tok-")),
      JSON.stringify(v2),
    );
    assert.equal(raw.requests.length, 3, "config and two layers came from the redirect target");
    assert.ok(
      raw.requests.every((q) => q.authorization === undefined),
      "no token leaked cross-origin",
    );
    for (const l of r.layers) assert.equal(sha(s.blob(l.digest)), l.digest);

    // Tokens that expire mid-pull are renewed once, and the pull carries on.
    gate.tokenRequests.length = 0;
    let blobs = 0;
    const expiring = await proxy(reg.host, async (req, res, p) => {
      if (req.url?.includes("/blobs/") && ++blobs === 2) gate.expireAll();
      return gate.intercept(req, res, p);
    });
    const e = store();
    e.dockerConfig({ [expiring.host]: { auth: basic("bob", "hunter2") } });
    assert.equal(
      (await pullImage(parseReference(`${expiring.host}/team/app:tok`), e.opts)).manifestDigest,
      r.manifestDigest,
    );
    assert.equal(gate.tokenRequests.length, 2);
    const blobAuth = expiring.requests.filter((q) => q.url.includes("/blobs/")).map((q) => q.authorization);
    assert.equal(new Set(blobAuth).size, 2, "blobs went with the first token, then with the renewed one");
  });
});

describe("registry failures", () => {
  test("5xx, 429 and connection resets (before and mid-body) are retried; other 4xx are not", async () => {
    const image = await pushImage("team/flaky:1", [await layer("flaky1"), await layer("flaky2")]);
    const [l1, l2] = image.layers.map((l) => l.digest);
    const seen = new Map<string, number>();
    const flaky = await proxy(reg.host, (req, res) => {
      const n = (seen.get(req.url ?? "") ?? 0) + 1;
      seen.set(req.url ?? "", n);
      if (n > 1) return false;
      if (req.url?.includes("/manifests/")) res.writeHead(503).end("try later");
      else if (req.url?.endsWith(image.configDigest)) res.writeHead(429, { "retry-after": "0" }).end();
      else if (req.url?.endsWith(l1 ?? "")) req.socket.destroy();
      else if (req.url?.endsWith(l2 ?? "")) {
        // Headers and half the body, then the connection drops.
        const size = image.layers[1]?.size ?? 0;
        res.writeHead(200, { "content-length": String(size) });
        res.write(Buffer.alloc(size >> 1));
        setTimeout(() => req.socket.destroy(), 20);
      } else return false;
      return true;
    });
    const s = store();
    const r = await pullImage(parseReference(`${flaky.host}/team/flaky:1`), s.opts);
    assert.equal(r.manifestDigest, image.digest);
    for (const l of r.layers) assert.equal(sha(s.blob(l.digest)), l.digest);
    assert.deepEqual([...seen.values()], [2, 2, 2, 2], "each request once failed, once served");
    assert.deepEqual(readdirSync(s.opts.tmpDir), []);

    const down = await proxy(reg.host, (_req, res) => {
      res.writeHead(503).end();
      return true;
    });
    const started = Date.now();
    await assert.rejects(
      pullImage(parseReference(`${down.host}/team/flaky:1`), { ...store().opts, retries: 2 }),
      rejectsWith("INTERNAL", /failed after 3 attempts.*HTTP 503/, (e) => assert.equal(e.status, 503)),
    );
    assert.equal(down.requests.length, 3);
    assert.ok(Date.now() - started >= 300, "it backed off between attempts");
    const cancelled = Date.now();
    await assert.rejects(
      pullImage(parseReference(`${down.host}/team/flaky:1`), {
        ...store().opts,
        signal: AbortSignal.timeout(150),
      }),
      { code: "CANCELLED" },
    );
    assert.ok(Date.now() - cancelled < 1000, "an abort ends the backoff at once");

    const bad = await proxy(reg.host, (_req, res) => {
      res.writeHead(400, { "content-type": "application/json" });
      res.end('{"errors":[{"code":"NAME_INVALID","message":"invalid repository name"}]}');
      return true;
    });
    await assert.rejects(
      pullImage(parseReference(`${bad.host}/team/flaky:1`), store().opts),
      rejectsWith("INTERNAL", /HTTP 400.*invalid repository name/, (e) => assert.equal(e.status, 400)),
    );
    assert.equal(bad.requests.length, 1);
  });

  test("schema 1, unknown media types, wrong digests and oversized manifests are refused clearly", async () => {
    const image = await pushImage("team/odd:1", [await layer("odd")]);
    const cfg = {
      mediaType: "application/vnd.oci.image.config.v1+json",
      digest: image.configDigest,
      size: 10,
    };
    const answers: Record<string, [string, Buffer]> = {
      old: ["application/vnd.docker.distribution.manifest.v1+prettyjws", Buffer.from('{"schemaVersion":1}')],
      thing: ["application/vnd.example.thing+json", Buffer.from('{"schemaVersion":2}')],
      helm: [
        "application/vnd.oci.image.manifest.v1+json",
        Buffer.from(
          JSON.stringify({
            schemaVersion: 2,
            config: { ...cfg, mediaType: "application/vnd.cncf.helm.config.v1+json" },
            layers: [],
          }),
        ),
      ],
      bzip: [
        "application/vnd.oci.image.manifest.v1+json",
        Buffer.from(
          JSON.stringify({
            schemaVersion: 2,
            config: cfg,
            layers: [
              {
                mediaType: "application/vnd.oci.image.layer.v1.tar+bzip2",
                digest: image.configDigest,
                size: 1,
              },
            ],
          }),
        ),
      ],
      huge: ["application/vnd.oci.image.manifest.v1+json", Buffer.alloc(5 << 20, " ")],
      [image.digest]: ["application/vnd.oci.image.manifest.v1+json", Buffer.from('{"schemaVersion":2}')],
    };
    const odd = await proxy(reg.host, (req, res) => {
      const tag = /\/manifests\/(.+)$/.exec(req.url ?? "")?.[1] ?? "";
      const answer = answers[tag];
      if (!answer) return false;
      res
        .writeHead(200, { "content-type": answer[0], "content-length": String(answer[1].length) })
        .end(answer[1]);
      return true;
    });
    const pull = (name: string) => pullImage(parseReference(`${odd.host}/team/odd${name}`), store().opts);
    await assert.rejects(
      pull(":old"),
      rejectsWith("INVALID_ARGUMENT", /Docker schema 1 image, which is not supported/),
    );
    await assert.rejects(
      pull(":thing"),
      rejectsWith("INVALID_ARGUMENT", /"application\/vnd\.example\.thing\+json"/),
    );
    await assert.rejects(
      pull(":helm"),
      rejectsWith(
        "INVALID_ARGUMENT",
        /config .* unsupported media type "application\/vnd\.cncf\.helm\.config\.v1\+json"/,
      ),
    );
    await assert.rejects(
      pull(":bzip"),
      rejectsWith("INVALID_ARGUMENT", /layer .*"application\/vnd\.oci\.image\.layer\.v1\.tar\+bzip2"/),
    );
    await assert.rejects(pull(":huge"), rejectsWith("INTERNAL", /larger than 4 MiB/));
    await assert.rejects(
      pull(`@${image.digest}`),
      rejectsWith("INTERNAL", new RegExp(`digest mismatch for the manifest.*want ${image.digest}`)),
    );
    assert.equal((await pull(":1")).manifestDigest, image.digest, "the proxy passes real answers through");
  });

  test("hosts: docker.io → registry-1.docker.io, HTTPS unless loopback or insecure; challenge parsing", async () => {
    const urls: string[] = [];
    const fetchImpl = (async (url: string | URL) => {
      urls.push(String(url));
      return new Response('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}', {
        status: 404,
      });
    }) as typeof fetch;
    for (const [name, insecure] of [
      ["alpine", false],
      ["registry.example.com:5000/x/y:1", false],
      ["registry.example.com:5000/x/y:1", true],
      ["localhost:5000/x/y:1", false],
      ["[::1]:5000/x/y:1", false],
    ] as const) {
      await assert.rejects(pullImage(parseReference(name), { ...store().opts, fetchImpl, insecure }), {
        code: "IMAGE_NOT_FOUND",
      });
    }
    assert.deepEqual(urls, [
      "https://registry-1.docker.io/v2/library/alpine/manifests/latest",
      "https://registry.example.com:5000/v2/x/y/manifests/1",
      "http://registry.example.com:5000/v2/x/y/manifests/1",
      "http://localhost:5000/v2/x/y/manifests/1",
      "http://[::1]:5000/v2/x/y/manifests/1",
    ]);

    // A refused connection fails at once: nothing listens, so retrying would only add delay.
    const closed = await freePort();
    const t0 = Date.now();
    await assert.rejects(
      pullImage(parseReference(`127.0.0.1:${closed}/x/y:1`), store().opts),
      rejectsWith("INTERNAL", /cannot reach registry 127\.0\.0\.1:\d+: .*ECONNREFUSED/),
    );
    assert.ok(Date.now() - t0 < 1000, "not retried");

    // Credentials never go in clear to a token realm that is neither loopback nor marked insecure.
    const s = store();
    s.dockerConfig({ "https://index.docker.io/v1/": { auth: basic("me", "pw") } });
    const challenged = (async () =>
      new Response("", {
        status: 401,
        headers: { "www-authenticate": 'Bearer realm="http://auth.example.com/token",service="x"' },
      })) as typeof fetch;
    await assert.rejects(
      pullImage(parseReference("alpine"), { ...s.opts, fetchImpl: challenged }),
      /not HTTPS/,
    );

    assert.deepEqual(
      parseChallenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push"',
      ),
      {
        scheme: "bearer",
        params: {
          realm: "https://auth.docker.io/token",
          service: "registry.docker.io",
          scope: "repository:a/b:pull,push",
        },
      },
    );
    assert.deepEqual(parseChallenge('Basic realm="Registry Realm"'), {
      scheme: "basic",
      params: { realm: "Registry Realm" },
    });
  });
});
