import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { after, describe, test } from "node:test";
import { gzipSync, zstdCompressSync } from "node:zlib";
import fc from "fast-check";
import { MatchlockError } from "../../src/api/errors.ts";
import { paths } from "../../src/api/paths.ts";
import { ImageStore } from "../../src/image/store.ts";
import { runCli } from "../helpers/cli.ts";
import { dockerSave, type Entry, makeTar, ociLayout } from "../helpers/images.ts";
import { onlyRejects, runs } from "../helpers/property.ts";

/**
 * Garbage given to `matchlock image import` (issue #8): random bytes, nothing, a truncated archive,
 * bad compression, a tar that is not an image, JSON of the wrong shape, entries that collide, a
 * broken layer. Each must give one clear `matchlock: …` line (and its hint), exit 1, print no stack,
 * and leave nothing in the image store. The built CLI runs against a private MATCHLOCK_CACHE and
 * MATCHLOCK_HOME, so no VM and no real store are involved.
 */

const root = mkdtempSync(join(tmpdir(), "matchlock-import-errors-"));
after(() => rmSync(root, { recursive: true, force: true }));
let n = 0;

function freshEnv(): { env: NodeJS.ProcessEnv; images: string } {
  const dir = mkdtempSync(join(root, `cli${n++}-`));
  const env = { ...process.env, MATCHLOCK_CACHE: join(dir, "cache"), MATCHLOCK_HOME: join(dir, "home") };
  return { env, images: join(dir, "cache", "images") };
}

/** Files under images/ other than the metadata database: blobs, base disks, scratch dirs. */
function storeFiles(images: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    if (!existsSync(d)) return;
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (!/^metadata\.db(-wal|-shm|-journal)?$/.test(e.name)) out.push(p);
    }
  };
  walk(images);
  return out;
}

/** The tags the store at `env`'s MATCHLOCK_CACHE lists, read in process (no second CLI run). */
function tagsIn(env: NodeJS.ProcessEnv): string[] {
  const store = new ImageStore(paths(env));
  try {
    return store.list().map((i) => i.tag);
  } finally {
    store.close();
  }
}

/**
 * Imports `input` through the CLI's stdin; asserts exit 1, exactly one `matchlock: …` line (other
 * lines are indented: progress and the hint), no stack, and an untouched store.
 */
async function refused(input: Buffer, message: RegExp) {
  const { env, images } = freshEnv();
  const r = await runCli(["image", "import", "mltest-garbage:1"], { env, input, timeoutMs: 60_000 });
  assert.equal(r.code, 1, r.stderr);
  assert.doesNotMatch(r.stderr, /internal error|^\s+at /m, "a stack trace");
  const lines = r.stderr.trimEnd().split("\n");
  const errors = lines.filter((l) => l.startsWith("matchlock: "));
  assert.equal(errors.length, 1, r.stderr);
  assert.ok(
    lines.every((l) => l.startsWith("matchlock: ") || /^ {2}\S/.test(l)),
    `a line that is neither the error, its hint nor progress:\n${r.stderr}`,
  );
  assert.match(errors[0] ?? "", message);
  assert.deepEqual(storeFiles(images), [], "something was left in the image store");
  assert.deepEqual(tagsIn(env), []);
}

/** The same, in process (fast): for the many variants of one kind of garbage. */
async function refusedInProcess(store: ImageStore, images: string, input: Buffer, message: RegExp) {
  let err: unknown;
  try {
    await store.importArchive(Readable.from([input]), "mltest-garbage:1", "test");
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof MatchlockError, `expected a MatchlockError, got ${String(err)}`);
  assert.equal(err.code, "INVALID_ARGUMENT", err.message);
  assert.match(err.message, message);
  assert.deepEqual(storeFiles(images), [], "something was left in the image store");
  assert.deepEqual(
    store.list().map((i) => i.tag),
    [],
  );
}

/** A private store for in-process imports. */
function privateStore(): { store: ImageStore; images: string } {
  const dir = mkdtempSync(join(root, `store${n++}-`));
  const store = new ImageStore(
    paths({ MATCHLOCK_CACHE: join(dir, "cache"), MATCHLOCK_HOME: join(dir, "home") }),
  );
  after(() => store.close());
  return { store, images: join(dir, "cache", "images") };
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
const smallLayer = () => makeTar([{ name: "hello.txt", content: "hi\n" }]);

/** A docker-save archive built by hand, so its JSON can be anything. */
function withManifest(manifest: unknown, extra: Entry[] = []): Promise<Buffer> {
  return makeTar([...extra, { name: "manifest.json", content: JSON.stringify(manifest) }]);
}

describe("image import: garbage archives give one clear line and leave the store empty", () => {
  test("100000 random bytes", async () => {
    const garbage = randomBytes(100_000);
    garbage[0] = 0x78; // no compression magic starts with "x": the tar reader must be what refuses it
    await refused(garbage, /not a valid tar: a header is damaged/);
  });

  test("an empty stdin", async () => {
    await refused(Buffer.alloc(0), /the image archive is empty/);
  });

  test("a real archive cut in the middle", async () => {
    const whole = await dockerSave({ layers: [await smallLayer()], config: { Cmd: ["true"] } });
    await refused(whole.subarray(0, Math.floor(whole.length / 2) + 100), /ends in the middle of an entry/);
  });

  test("a gzip of random bytes", async () => {
    await refused(gzipSync(randomBytes(10_000)), /not a valid tar/);
  });

  test("a tar with no manifest", async () => {
    await refused(
      await makeTar([{ name: "hello.txt", content: "hi" }]),
      /not an image archive: no manifest\.json/,
    );
  });

  test("manifest.json of the wrong types", async () => {
    await refused(await withManifest([{ Config: 5, Layers: "x" }]), /manifest\.json at 0\.Config: .*string/);
  });

  test("a layer of random bytes names the layer and leaves no blob", async () => {
    await refused(
      await dockerSave({ layers: [randomBytes(3000)], config: { Cmd: ["true"] } }),
      /layer sha256:[0-9a-f]{12}…: malformed layer/,
    );
  });
});

describe("image import: every kind of broken archive is a user error naming the problem (in process)", () => {
  const { store, images } = privateStore();
  const refuse = (input: Buffer, message: RegExp) => refusedInProcess(store, images, input, message);

  test("bad compression: a gzip header followed by garbage, a truncated gzip, bzip2, xz", async () => {
    await refuse(Buffer.concat([Buffer.from([0x1f, 0x8b]), randomBytes(5000)]), /compression is broken/);
    const gz = gzipSync(await dockerSave({ layers: [await smallLayer()] }));
    await refuse(gz.subarray(0, gz.length - 20), /compression is broken|ends in the middle/);
    await refuse(Buffer.concat([Buffer.from("BZh91AY&SY"), randomBytes(100)]), /bzip2 or xz/);
    const xz = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
    await refuse(Buffer.concat([xz, randomBytes(100)]), /bzip2 or xz/);
  });

  test("an archive cut at any point", async () => {
    const whole = await dockerSave({ layers: [await smallLayer()], config: { Cmd: ["true"] } });
    for (let cut = 1; cut < whole.length; cut += 97)
      await refuse(whole.subarray(0, cut), /not a valid tar: it ends in the middle of an entry/);
  });

  test("manifest.json of the wrong shape or types", async () => {
    await refuse(await withManifest([null]), /manifest\.json at 0: .*Object/);
    await refuse(await withManifest({ Config: "c.json", Layers: [] }), /manifest\.json: .*Array/);
    await refuse(await withManifest([{ Config: "c.json", Layers: [7] }]), /manifest\.json at 0\.Layers\.0/);
    await refuse(await withManifest([]), /manifest\.json lists no image/);
    await refuse(await withManifest("[[["), /manifest\.json/);
    await refuse(
      await makeTar([{ name: "manifest.json", content: "{not json" }]),
      /manifest\.json is not valid JSON/,
    );
  });

  test("an image config of the wrong shape or types", async () => {
    const cfg = (content: string) =>
      withManifest([{ Config: "c.json", Layers: [] }], [{ name: "c.json", content }]);
    await refuse(await cfg("null"), /the image config: .*Object/);
    await refuse(await cfg('{"config":{"Env":5}}'), /the image config at config\.Env/);
    await refuse(await cfg('{"config":{"Entrypoint":"sh"}}'), /the image config at config\.Entrypoint/);
    await refuse(await cfg('{"config":{"Cmd":[1,2]}}'), /the image config at config\.Cmd\.0/);
    await refuse(await cfg('{"os":7}'), /the image config at os/);
  });

  test("an OCI layout whose index or manifest has the wrong types", async () => {
    const index = (manifests: unknown, extra: Entry[] = []) =>
      makeTar([...extra, { name: "index.json", content: JSON.stringify({ manifests }) }]);
    await refuse(await index([null]), /index\.json at manifests\.0/);
    await refuse(await index("x"), /index\.json at manifests/);
    await refuse(await index([{ digest: "sha256:zz" }]), /invalid digest/);
    const manifest = Buffer.from(JSON.stringify({ config: { digest: 5 }, layers: [null] }));
    await refuse(
      await index(
        [{ digest: `sha256:${sha(manifest)}` }],
        [{ name: `blobs/sha256/${sha(manifest)}`, content: manifest }],
      ),
      /manifest sha256:[0-9a-f]+ at config\.digest/,
    );
  });

  test("entries that collide: a name twice, a file where a directory must be", async () => {
    await refuse(
      await makeTar([
        { name: "manifest.json", content: "[]" },
        { name: "manifest.json", content: "[]" },
      ]),
      /entry "manifest\.json": appears twice/,
    );
    await refuse(
      await makeTar([
        { name: "a", content: "x" },
        { name: "a/b", content: "y" },
      ]),
      /entry "a\/b": appears twice, or as both a file and a directory/,
    );
  });

  test("image attack: an archive entry climbing out with .. is refused by name", async () => {
    await refuse(await makeTar([{ name: "../../escape.txt", content: "x" }]), /escape\.txt.*escapes/);
  });

  test("a layer that is a gzip of garbage, or a truncated gzip, names the layer and leaves no blob", async () => {
    const good = gzipSync(await smallLayer());
    for (const layer of [gzipSync(randomBytes(3000)), good.subarray(0, good.length - 10)]) {
      const archive = await dockerSave({ layers: [layer], config: { Cmd: ["true"] } });
      await refuse(archive, /layer sha256:[0-9a-f]{12}…: malformed layer/);
    }
  });
});

describe("image import: compressed archives, as docker load takes them", () => {
  test("a gzip-compressed docker save imports from stdin, a zstd one from -i FILE", async () => {
    const archive = await dockerSave({ layers: [await smallLayer()], config: { Cmd: ["true"] } });
    const { env } = freshEnv();
    const file = join(root, `packed${n++}.tar.zst`);
    writeFileSync(file, zstdCompressSync(archive));
    const results = [
      await runCli(["image", "import", "mltest-packed:gz"], {
        env,
        input: gzipSync(archive),
        timeoutMs: 60_000,
      }),
      await runCli(["image", "import", "mltest-packed:zst", "-i", file], { env, timeoutMs: 60_000 }),
    ];
    for (const r of results) {
      assert.equal(r.code, 0, r.stderr);
      assert.match(
        r.stdout.toString(),
        /^docker\.io\/library\/mltest-packed:(gz|zst) sha256:[0-9a-f]{64}\n$/,
      );
    }
    assert.deepEqual(tagsIn(env).sort(), [
      "docker.io/library/mltest-packed:gz",
      "docker.io/library/mltest-packed:zst",
    ]);
  });

  test("-i naming a missing file or a directory is one clear line", async () => {
    const { env } = freshEnv();
    for (const [path, message] of [
      [join(root, "no-such.tar"), /no such file/],
      [root, /is a directory/],
    ] as const) {
      const r = await runCli(["image", "import", "mltest-x:1", "-i", path], { env });
      assert.equal(r.code, 1);
      assert.match(r.stderr, message);
      assert.doesNotMatch(r.stderr, /internal error|^\s+at /m);
    }
  });
});

describe("image import of damaged archives: property test", () => {
  test("image attack: a docker-save or OCI archive with bytes overwritten or cut is imported or refused with a user error, and a refusal leaves no file behind", {
    timeout: 120_000,
  }, async () => {
    const layer = await smallLayer();
    const archives = [
      await dockerSave({ layers: [layer], config: { Cmd: ["true"] } }),
      await ociLayout({ layers: [layer], config: { Cmd: ["true"] } }),
    ];
    const damage = fc.record({
      which: fc.nat({ max: archives.length - 1 }),
      flips: fc.array(fc.tuple(fc.nat(), fc.nat({ max: 255 })), { maxLength: 8 }),
      cut: fc.option(fc.nat(), { freq: 3 }),
      gzip: fc.boolean(),
    });
    const { store, images } = privateStore();
    await fc.assert(
      fc.asyncProperty(damage, async ({ which, flips, cut, gzip }) => {
        const b = Buffer.from(archives[which] as Buffer);
        for (const [at, v] of flips) b[at % b.length] = v;
        const raw = cut === null ? b : b.subarray(0, cut % (b.length + 1));
        const input = gzip ? gzipSync(raw) : raw;
        const before = storeFiles(images);
        const r = await onlyRejects(MatchlockError, () =>
          store.importArchive(Readable.from([input]), "mltest-damaged:1", "test"),
        );
        if (r.ok) return;
        assert.notEqual((r.error as MatchlockError).code, "INTERNAL", r.error.message);
        assert.deepEqual(storeFiles(images), before, `left behind after: ${r.error.message}`);
      }),
      runs(60),
    );
  });
});
