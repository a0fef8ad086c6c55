import assert from "node:assert/strict";
import {
  existsSync,
  lstatSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { after, describe, test } from "node:test";
import { gzipSync, zstdCompressSync } from "node:zlib";
import * as tar from "tar-stream";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import { type ApplyLimits, ImageRejectedError, openLayer, RootfsBuilder } from "../../src/image/apply.ts";

/**
 * The layer applier: OCI whiteouts, type replacement, metadata, and the "image tarball" attack row of
 * SECURITY.md. Layers are built in memory with tar-stream's pack(). Every attack test also checks that
 * nothing appeared in (or changed under) a directory outside the staging dir.
 */

const scratch = mkdtempSync(join(tmpdir(), "matchlock-apply-"));
/** Outside every staging dir: attacks aim here. Holds one file, `secret`, that must never change. */
const outside = mkdtempSync(join(tmpdir(), "matchlock-outside-"));
writeFileSync(join(outside, "secret"), "host secret\n");
after(() => {
  rmSync(scratch, { recursive: true, force: true });
  rmSync(outside, { recursive: true, force: true });
});

let n = 0;
const freshDir = () => mkdtempSync(join(scratch, `stage${n++}-`));

type E = Partial<Omit<tar.Header, "pax">> & {
  name: string;
  body?: string | Buffer;
  pax?: Record<string, string>;
};

async function tarOf(entries: E[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const collected = (async () => {
    for await (const c of pack) chunks.push(c as Buffer);
  })();
  for (const { body, ...header } of entries) {
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null) => (err ? reject(err) : resolve());
      const isFile = header.type === undefined || header.type === "file";
      if (isFile) pack.entry(header, body ?? "", cb);
      else pack.entry(header, cb);
    });
  }
  pack.finalize();
  await collected;
  return Buffer.concat(chunks);
}

async function build(layers: E[][], limits?: Partial<ApplyLimits>) {
  const dir = freshDir();
  const b = new RootfsBuilder(dir, limits);
  for (const [i, entries] of layers.entries())
    await b.applyLayer(Readable.from([await tarOf(entries)]), `layer${i}`);
  return { dir, b };
}

/** Applies the layers, expects an ImageRejectedError naming `entry` and matching `rule`; returns the staging dir. */
async function rejects(layers: E[][], entry: string, rule: RegExp, limits?: Partial<ApplyLimits>) {
  const dir = freshDir();
  const b = new RootfsBuilder(dir, limits);
  let err: unknown;
  try {
    for (const [i, entries] of layers.entries())
      await b.applyLayer(Readable.from([await tarOf(entries)]), `layer${i}`);
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof ImageRejectedError, `expected ImageRejectedError, got ${String(err)}`);
  assert.equal(err.code, "INVALID_ARGUMENT");
  assert.ok(err.message.includes(`entry ${JSON.stringify(entry)}`), err.message);
  assert.match(err.message, rule);
  assertOutsideUntouched();
  return dir;
}

function assertOutsideUntouched() {
  assert.deepEqual(readdirSync(outside), ["secret"]);
  assert.equal(readFileSync(join(outside, "secret"), "utf8"), "host secret\n");
  assert.equal(lstatSync(join(outside, "secret")).nlink, 1);
}

const kind = (p: string) => {
  const s = lstatSync(p);
  return s.isDirectory()
    ? "dir"
    : s.isSymbolicLink()
      ? "symlink"
      : s.isFile()
        ? "file"
        : s.isFIFO()
          ? "fifo"
          : "other";
};
const perm = (p: string) => lstatSync(p).mode & 0o7777;
const T = new Date("2020-01-02T03:04:05Z");

// chown to uid 1000 and to root needs root; matchlock builds images as root.
const asRoot = process.getuid?.() === 0;

describe("layer applier", { skip: !asRoot && "needs root (the applier chowns every entry)" }, () => {
  test("a normal layer keeps modes (setuid/setgid/sticky), owners, mtimes, symlinks verbatim, hardlinks and fifos", async () => {
    const { dir, b } = await build([
      [
        { name: "./", type: "directory", mode: 0o755 },
        { name: "bin/", type: "directory", mode: 0o755 },
        { name: "bin/su", mode: 0o4755, body: "su binary", mtime: T },
        { name: "bin/wall", mode: 0o2755, gid: 5, body: "wall" },
        { name: "tmp/", type: "directory", mode: 0o1777 },
        { name: "home/u/", type: "directory", mode: 0o700, uid: 1000, gid: 1000, mtime: T },
        { name: "home/u/notes.txt", mode: 0o600, uid: 1000, gid: 1000, mtime: T, body: "hello" },
        { name: "lib", type: "symlink", linkname: "usr/lib" },
        { name: "etc-link", type: "symlink", linkname: "/etc", uid: 1000, gid: 1000 },
        { name: "home/u/up", type: "symlink", linkname: "../../nonexistent/../x" },
        { name: "bin/su2", type: "link", linkname: "bin/su" },
        { name: "run/fifo", type: "fifo", mode: 0o640 },
      ],
    ]);
    assert.equal(perm(dir), 0o755);
    assert.equal(perm(join(dir, "bin/su")), 0o4755);
    assert.equal(perm(join(dir, "bin/wall")), 0o2755);
    assert.equal(lstatSync(join(dir, "bin/wall")).gid, 5);
    assert.equal(perm(join(dir, "tmp")), 0o1777);
    const notes = lstatSync(join(dir, "home/u/notes.txt"));
    assert.deepEqual([notes.uid, notes.gid, notes.mode & 0o7777], [1000, 1000, 0o600]);
    assert.equal(notes.mtimeMs, T.getTime());
    assert.equal(readFileSync(join(dir, "home/u/notes.txt"), "utf8"), "hello");
    // Directory mtimes are set after the layer, so adding children does not bump them.
    assert.equal(lstatSync(join(dir, "home/u")).mtimeMs, T.getTime());
    assert.equal(lstatSync(join(dir, "home/u")).uid, 1000);
    assert.equal(lstatSync(join(dir, "bin/su")).mtimeMs, T.getTime());
    assert.equal(readlinkSync(join(dir, "lib")), "usr/lib");
    assert.equal(readlinkSync(join(dir, "etc-link")), "/etc");
    assert.equal(lstatSync(join(dir, "etc-link")).uid, 1000);
    assert.equal(readlinkSync(join(dir, "home/u/up")), "../../nonexistent/../x");
    assert.equal(lstatSync(join(dir, "bin/su2")).ino, lstatSync(join(dir, "bin/su")).ino);
    assert.equal(lstatSync(join(dir, "bin/su")).nlink, 2);
    assert.equal(kind(join(dir, "run/fifo")), "fifo");
    assert.equal(perm(join(dir, "run/fifo")), 0o640);
    assert.equal(perm(join(dir, "run")), 0o755, "implicit parent");
    assert.deepEqual(b.stats, { entries: 12, bytes: "su binary".length + "wall".length + "hello".length });
    assert.deepEqual(b.skipped, []);
  });

  test("whiteouts in a later layer delete a file and a directory tree, and are not created themselves", async () => {
    const { dir } = await build([
      [
        { name: "etc/a", body: "a" },
        { name: "etc/b", body: "b" },
        { name: "var/cache/x/y", body: "y" },
      ],
      [
        { name: "etc/.wh.a", body: "" },
        { name: "var/.wh.cache", body: "" },
      ],
    ]);
    assert.deepEqual(readdirSync(join(dir, "etc")), ["b"]);
    assert.deepEqual(readdirSync(join(dir, "var")), []);
  });

  test("a whiteout only hides lower layers: the same layer's entry survives", async () => {
    const { dir } = await build([
      [{ name: "f", body: "old" }],
      [{ name: "f", body: "new" }, { name: ".wh.f" }],
    ]);
    assert.equal(readFileSync(join(dir, "f"), "utf8"), "new");
  });

  test("an opaque dir drops everything from lower layers and keeps this layer's entries, before or after the marker", async () => {
    const { dir } = await build([
      [
        { name: "d/old1", body: "1" },
        { name: "d/sub/old2", body: "2" },
        { name: "keep/me", body: "k" },
      ],
      [
        { name: "d/", type: "directory" },
        { name: "d/sub/before", body: "b" },
        { name: "d/.wh..wh..opq" },
        { name: "d/new", body: "n" },
      ],
    ]);
    assert.deepEqual(readdirSync(join(dir, "d")).sort(), ["new", "sub"]);
    assert.deepEqual(readdirSync(join(dir, "d/sub")), ["before"]);
    assert.equal(readFileSync(join(dir, "keep/me"), "utf8"), "k");
  });

  test("a later entry of another type replaces the earlier one (file→dir, dir→symlink, symlink→file)", async () => {
    const { dir } = await build([
      [
        { name: "a", body: "file" },
        { name: "b/c/d", body: "deep" },
        { name: "s", type: "symlink", linkname: "/x" },
        { name: "f", body: "old" },
        { name: "g", type: "link", linkname: "f" },
      ],
      [
        { name: "a/", type: "directory" },
        { name: "a/inner", body: "i" },
        { name: "b", type: "symlink", linkname: "/target" },
        { name: "s", body: "now a file" },
        { name: "f", body: "new" },
      ],
    ]);
    assert.equal(kind(join(dir, "a")), "dir");
    assert.equal(readFileSync(join(dir, "a/inner"), "utf8"), "i");
    assert.equal(kind(join(dir, "b")), "symlink");
    assert.equal(readlinkSync(join(dir, "b")), "/target");
    assert.equal(readFileSync(join(dir, "s"), "utf8"), "now a file");
    // Replacing a hardlinked file makes a new inode: the other name keeps the old content.
    assert.equal(readFileSync(join(dir, "f"), "utf8"), "new");
    assert.equal(readFileSync(join(dir, "g"), "utf8"), "old");
  });

  test("an entry under a regular file (no directory entry replacing it) is rejected, as Docker fails on it", async () => {
    await rejects(
      [[{ name: "a", body: "f" }], [{ name: "a/inner", body: "i" }]],
      "a/inner",
      /parent is not a directory \("a"\)/,
    );
  });

  test("missing parents are created 0755 root:root", async () => {
    const { dir } = await build([[{ name: "x/y/z/file", uid: 1000, gid: 1000, body: "z" }]]);
    for (const p of ["x", "x/y", "x/y/z"]) {
      const s = lstatSync(join(dir, p));
      assert.deepEqual([s.isDirectory(), s.mode & 0o7777, s.uid, s.gid], [true, 0o755, 0, 0], p);
    }
    assert.equal(lstatSync(join(dir, "x/y/z/file")).uid, 1000);
  });

  test("pax xattrs are recorded byte for byte, binary values (capabilities) included", async () => {
    const layer = await tarOf([
      {
        name: "bin/ping",
        body: "p",
        pax: { "SCHILY.xattr.user.note": "hi", "LIBARCHIVE.xattr.user.b64": "AAEC" },
      },
      { name: "bin/cap", body: "c", pax: { "SCHILY.xattr.security.capability": "X\u00e9Y" } },
    ]);
    // Turn the UTF-8 "é" (c3 a9) into two bytes that are not UTF-8, as a real binary capability has:
    // tar-stream's own decoding would mangle them; the raw pax scanner keeps them.
    const at = layer.indexOf(Buffer.from("X\u00e9Y"));
    layer[at + 1] = 0x80;
    layer[at + 2] = 0x81;
    const b = new RootfsBuilder(freshDir());
    await b.applyLayer(Readable.from([layer]), "layer0");
    assert.deepEqual(b.xattrs, [
      { path: "bin/ping", name: "user.note", value: Buffer.from("hi") },
      { path: "bin/ping", name: "user.b64", value: Buffer.from([0, 1, 2]) },
      { path: "bin/cap", name: "security.capability", value: Buffer.from([0x58, 0x80, 0x81, 0x59]) },
    ]);
    assert.deepEqual(b.skipped, []);
  });

  test("openLayer reads gzip, zstd and plain tar layer files by their magic bytes", async () => {
    const layer = await tarOf([{ name: "etc/os-release", body: "ID=test\n" }]);
    for (const [label, bytes] of [
      ["gzip", gzipSync(layer)],
      ["zstd", zstdCompressSync(layer)],
      ["plain", layer],
    ] as const) {
      const file = join(scratch, `layer.${label}`);
      writeFileSync(file, bytes);
      const dir = freshDir();
      await new RootfsBuilder(dir).applyLayer(await openLayer(file), `sha256:${"ab12".repeat(16)}`);
      assert.equal(readFileSync(join(dir, "etc/os-release"), "utf8"), "ID=test\n", label);
    }
    const xz = join(scratch, "layer.xz");
    writeFileSync(xz, Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0, 0]));
    await assert.rejects(
      openLayer(xz),
      (e) => e instanceof InvalidArgumentError && /xz compression/.test(e.message),
    );
  });

  test("a corrupt gzip layer or a truncated tar is rejected as a malformed layer", async () => {
    const layer = await tarOf([{ name: "big", body: Buffer.alloc(4096, 1) }]);
    const file = join(scratch, "corrupt.gz");
    const gz = gzipSync(layer);
    writeFileSync(file, Buffer.concat([gz.subarray(0, 20), Buffer.alloc(64, 0xff)]));
    const digest = `sha256:${"ab12".repeat(16)}`;
    await assert.rejects(new RootfsBuilder(freshDir()).applyLayer(await openLayer(file), digest), (e) => {
      return (
        e instanceof ImageRejectedError && e.message.startsWith("layer sha256:ab12ab12ab12…: malformed layer")
      );
    });
    const truncated = Readable.from([layer.subarray(0, 1024)]);
    await assert.rejects(
      new RootfsBuilder(freshDir()).applyLayer(truncated, "l"),
      /layer l: malformed layer/,
    );
  });

  test("image attack: ../x is rejected", async () => {
    await rejects([[{ name: "../x", body: "x" }]], "../x", /path escapes the root \(".."\)/);
  });

  test("image attack: a/../../x (escape after a component) is rejected", async () => {
    await rejects([[{ name: "a/../../x", body: "x" }]], "a/../../x", /path escapes the root/);
  });

  test("image attack: a hardlink target with .. is rejected", async () => {
    await rejects(
      [[{ name: "h", type: "link", linkname: `../../../../../../..${outside}/secret` }]],
      "h",
      /path escapes the root/,
    );
  });

  test("image attack: absolute names land inside the root and never on the host", async () => {
    const unique = `/etc/matchlock-apply-test-${process.pid}-${Date.now()}`;
    const { dir } = await build([
      [
        { name: unique, body: "inside" },
        { name: `${outside}/pwned`, body: "inside too" },
      ],
    ]);
    assert.equal(existsSync(unique), false, "nothing was written to the host's /etc");
    assert.equal(readFileSync(join(dir, unique), "utf8"), "inside");
    assert.equal(readFileSync(join(dir, outside, "pwned"), "utf8"), "inside too");
    assertOutsideUntouched();
  });

  test("image attack: symlink then write through it (lnk -> outside dir, then lnk/pwned) is rejected", async () => {
    const dir = await rejects(
      [
        [
          { name: "lnk", type: "symlink", linkname: outside },
          { name: "lnk/pwned", body: "gotcha" },
        ],
      ],
      "lnk/pwned",
      /parent traverses a symlink \("lnk"\)/,
    );
    assert.equal(existsSync(join(outside, "pwned")), false);
    assert.equal(readlinkSync(join(dir, "lnk")), outside, "the link itself is kept verbatim");
  });

  test("image attack: a symlink from an earlier layer cannot be written through either", async () => {
    await rejects(
      [
        [{ name: "usr/lnk", type: "symlink", linkname: outside }],
        [{ name: "usr/lnk/secret", body: "overwritten" }],
      ],
      "usr/lnk/secret",
      /traverses a symlink \("usr\/lnk"\)/,
    );
  });

  test("image attack: a symlink to a ../.. chain, then a write under it, is rejected", async () => {
    const rel = `lnk${outside}/pwned`; // lnk/tmp/matchlock-outside-…/pwned, outside if lnk were followed
    await rejects(
      [
        [
          { name: "a/b/lnk", type: "symlink", linkname: "../../../../../../../.." },
          { name: `a/b/${rel}`, body: "x" },
        ],
      ],
      `a/b/${rel}`,
      /parent traverses a symlink \("a\/b\/lnk"\)/,
    );
  });

  test("image attack: defence in depth: a dir swapped for a symlink behind the tree's back is not written through", async () => {
    const dir = freshDir();
    const b = new RootfsBuilder(dir);
    await b.applyLayer(Readable.from([await tarOf([{ name: "d/", type: "directory" }])]), "layer0");
    rmSync(join(dir, "d"), { recursive: true });
    symlinkSync(outside, join(dir, "d")); // the in-memory tree still says "d" is a directory
    await assert.rejects(
      b.applyLayer(Readable.from([await tarOf([{ name: "d/pwned", body: "x" }])]), "layer1"),
      (e) =>
        e instanceof ImageRejectedError &&
        /parent is not a plain directory inside the staging dir/.test(e.message),
    );
    assertOutsideUntouched();
  });

  test("image attack: a whiteout through a symlink cannot delete host files", async () => {
    await rejects(
      [[{ name: "lnk", type: "symlink", linkname: outside }], [{ name: "lnk/.wh.secret" }]],
      "lnk/.wh.secret",
      /whiteout parent traverses a symlink/,
    );
  });

  test("image attack: a hardlink to a host file (absolute target) is rejected", async () => {
    await rejects(
      [[{ name: "h", type: "link", linkname: `${outside}/secret` }]],
      "h",
      /hardlink target is not an earlier regular file of the image/,
    );
  });

  test("image attack: a hardlink to a directory or to a symlink is rejected", async () => {
    await rejects(
      [
        [
          { name: "d/", type: "directory" },
          { name: "h", type: "link", linkname: "d" },
        ],
      ],
      "h",
      /hardlink target is not an earlier regular file/,
    );
    await rejects(
      [
        [
          { name: "s", type: "symlink", linkname: `${outside}/secret` },
          { name: "h", type: "link", linkname: "s" },
        ],
      ],
      "h",
      /hardlink target is not an earlier regular file/,
    );
  });

  test("image attack: a hardlink through a symlink is rejected", async () => {
    await rejects(
      [
        [
          { name: "d/f", body: "f" },
          { name: "lnk", type: "symlink", linkname: "d" },
          { name: "h", type: "link", linkname: "lnk/f" },
        ],
      ],
      "h",
      /hardlink target traverses a symlink \("lnk"\)/,
    );
  });

  test("image attack: device nodes are skipped, recorded and never created", async () => {
    const { dir, b } = await build([
      [
        { name: "dev/", type: "directory" },
        { name: "dev/sda", type: "block-device", devmajor: 8, devminor: 0 },
        { name: "dev/mem", type: "character-device", devmajor: 1, devminor: 1 },
      ],
    ]);
    assert.deepEqual(readdirSync(join(dir, "dev")), []);
    assert.deepEqual(b.skipped, [
      { layer: "layer0", path: "dev/sda", reason: "device node" },
      { layer: "layer0", path: "dev/mem", reason: "device node" },
    ]);
  });

  test("image attack: a name with a newline is rejected", async () => {
    await rejects(
      [[{ name: "etc/cron.d/x\n* * * * * root sh", body: "x" }]],
      "etc/cron.d/x\n* * * * * root sh",
      /control character/,
    );
  });

  test("image attack: a name with NUL (via a pax path) is rejected", async () => {
    // A ustar name field ends at NUL, so NUL can only arrive through a pax `path` record: force one.
    await rejects(
      [[{ name: "etc/passwd\u0000.txt", body: "x", pax: {} }]],
      "etc/passwd\u0000.txt",
      /control character/,
    );
  });

  test("image attack: a control character in a symlink target is rejected", async () => {
    await rejects(
      [[{ name: "s", type: "symlink", linkname: "a\u001bb" }]],
      "s",
      /symlink target .*control character/,
    );
  });

  test("image attack: a 300-byte path component and a path over maxPathBytes are rejected", async () => {
    const long = `a/${"x".repeat(300)}`;
    await rejects([[{ name: long, body: "x" }]], long, /path component longer than 255 bytes/);
    const deep = `${"d/".repeat(40)}f`;
    await rejects([[{ name: deep, body: "x" }]], deep, /path longer than maxPathBytes \(64\)/, {
      maxPathBytes: 64,
    });
  });

  test("image attack: an empty name is rejected and a non-directory cannot replace the root", async () => {
    await rejects([[{ name: "", body: "x" }]], "", /empty name/);
    await rejects(
      [[{ name: "./", type: "symlink", linkname: "/" }]],
      "./",
      /entry replaces the root directory/,
    );
  });

  test("image attack: countless entries stop at maxEntries (101 entries, limit 100)", async () => {
    const entries = Array.from({ length: 101 }, (_, i) => ({ name: `f${i}`, body: "" }));
    const dir = await rejects([entries], "f100", /too many entries \(limit maxEntries = 100\)/, {
      maxEntries: 100,
    });
    assert.equal(existsSync(join(dir, "f100")), false);
  });

  test("image attack: a huge file stops at maxBytes before it is written (2 MiB file, limit 1 MiB)", async () => {
    const dir = await rejects(
      [
        [
          { name: "small", body: "s" },
          { name: "big", body: Buffer.alloc(2 * 1024 * 1024) },
        ],
      ],
      "big",
      /file content over maxBytes \(1048576 bytes/,
      { maxBytes: 1024 * 1024 },
    );
    assert.equal(existsSync(join(dir, "big")), false);
  });

  test("image attack: maxBytes counts across layers", async () => {
    const half = Buffer.alloc(600 * 1024);
    await rejects([[{ name: "a", body: half }], [{ name: "b", body: half }]], "b", /maxBytes/, {
      maxBytes: 1024 * 1024,
    });
  });

  test("image attack: an unknown entry type (GNU sparse) is rejected with the type named", async () => {
    const layer = await tarOf([{ name: "sparse", body: "x" }]);
    layer[156] = "S".charCodeAt(0); // typeflag; then recompute the header checksum
    layer.fill(0x20, 148, 156);
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += layer[i] as number;
    layer.write(`${sum.toString(8).padStart(6, "0")}\u0000 `, 148, "latin1");
    await assert.rejects(
      new RootfsBuilder(freshDir()).applyLayer(Readable.from([layer]), "l"),
      (e) =>
        e instanceof ImageRejectedError &&
        e.message === 'layer l: entry "sparse": unsupported entry type "unknown typeflag"',
    );
  });
});
