import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import {
  lstatSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  realpathSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join, posix } from "node:path";
import { Readable } from "node:stream";
import { after, describe, test } from "node:test";
import fc from "fast-check";
import { MatchlockError } from "../../src/api/errors.ts";
import { ImageRejectedError, RootfsBuilder } from "../../src/image/apply.ts";
import { applyXattrs } from "../../src/image/xattrs.ts";
import { onlyRejects, runs } from "../helpers/property.ts";
import { END, member, paxRecords } from "../helpers/rawtar.ts";

/**
 * Property tests of the layer applier's name checks (the "image tarball" row of SECURITY.md): layers
 * of generated hostile names — `..`, absolute paths, NUL, newlines, very long components — mixed with
 * symlinks and hardlinks aimed outside. Every name travels in a pax `path` record, so it reaches the
 * applier byte for byte (a ustar name field would cut it at a NUL). Whatever the layer, nothing
 * outside the staging dir changes, and a name that escapes or holds a control character is refused.
 */

const scratch = mkdtempSync(join(tmpdir(), "matchlock-prop-apply-"));
/** The target of every attack: holds `secret`, which must never change or gain a hard link. */
const outside = mkdtempSync(join(tmpdir(), "matchlock-prop-outside-"));
writeFileSync(join(outside, "secret"), "host secret\n");
after(() => {
  rmSync(scratch, { recursive: true, force: true });
  rmSync(outside, { recursive: true, force: true });
});

const component = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom("a", "b", "etc", "lnk", "dir") },
  { weight: 3, arbitrary: fc.constantFrom("..", ".", "") },
  { weight: 1, arbitrary: fc.constantFrom("x\ny", "nul\0x", "tab\tx", "del\u007f", "cr\r") },
  { weight: 1, arbitrary: fc.integer({ min: 250, max: 260 }).map((n) => "L".repeat(n)) },
);
const name = fc
  .tuple(fc.boolean(), fc.array(component, { minLength: 1, maxLength: 6 }))
  .map(([abs, cs]) => (abs ? "/" : "") + cs.join("/"));
/** Link targets: names as above, or paths into the outside dir. */
const target = fc.oneof(name, fc.constantFrom(outside, join(outside, "secret"), "../../../..", "/"));

type Item =
  | { type: "file"; name: string; body: string }
  | { type: "dir"; name: string }
  | { type: "symlink"; name: string; target: string }
  | { type: "link"; name: string; target: string };

const item: fc.Arbitrary<Item> = fc.oneof(
  fc.record({ type: fc.constant("file" as const), name, body: fc.string({ maxLength: 8 }) }),
  fc.record({ type: fc.constant("dir" as const), name }),
  fc.record({ type: fc.constant("symlink" as const), name, target }),
  fc.record({ type: fc.constant("link" as const), name, target }),
);

/** Symlink-then-write-through: a link to the outside, then an entry under it. */
const throughLink: fc.Arbitrary<Item[]> = fc
  .record({
    link: fc.constantFrom("lnk", "a/lnk", "/lnk"),
    to: fc.constantFrom(outside, "../../..", "/", `${outside}/../${posix.basename(outside)}`),
    next: fc.constantFrom("file", "dir", "link", "symlink"),
    leaf: fc.constantFrom("secret", "pwned", "x/y"),
  })
  .map(({ link, to, next, leaf }): Item[] => {
    const under = `${link}/${leaf}`;
    const second: Item =
      next === "file"
        ? { type: "file", name: under, body: "pwned" }
        : next === "dir"
          ? { type: "dir", name: under }
          : {
              type: next as "link" | "symlink",
              name: next === "link" ? "h" : under,
              target: next === "link" ? under : "/etc",
            };
    return [{ type: "symlink", name: link, target: to }, second];
  });

const itemsArb = fc
  .array(fc.oneof({ weight: 4, arbitrary: item.map((i) => [i]) }, { weight: 1, arbitrary: throughLink }), {
    minLength: 1,
    maxLength: 6,
  })
  .map((groups) => groups.flat());

const FLAGS = { file: "0", dir: "5", symlink: "2", link: "1" } as const;

/** The layer: each name (and link target) in a pax record, so it arrives unchanged. */
function layer(items: Item[]): Buffer {
  return Buffer.concat([
    ...items.flatMap((it) => {
      const recs: Array<[string, string]> = [["path", it.name]];
      if (it.type === "symlink" || it.type === "link") recs.push(["linkpath", it.target]);
      const body = it.type === "file" ? Buffer.from(it.body) : Buffer.alloc(0);
      return [
        member({ name: "pax", flag: "x", size: 0 }, paxRecords(recs)),
        member({ name: "placeholder", flag: FLAGS[it.type], size: 0 }, body),
      ];
    }),
    END,
  ]);
}

// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are the attack
const CONTROL = /[\u0000-\u001f\u007f]/;

/** Whether the applier must refuse this name: a control character, a climb out, or a component over 255 bytes. */
function mustRefuse(raw: string): boolean {
  if (CONTROL.test(raw)) return true;
  let depth = 0;
  for (const c of raw.split("/")) {
    depth += c === ".." ? -1 : c === "" || c === "." ? 0 : 1;
    if (depth < 0) return true;
  }
  // A long component that `x/..` removes never reaches the disk: neutralised, not refused.
  const kept = posix.normalize(`/${raw}`).split("/");
  return kept.some((c) => Buffer.byteLength(c) > 255);
}

function assertOutsideUntouched() {
  assert.deepEqual(readdirSync(outside), ["secret"]);
  assert.equal(readFileSync(join(outside, "secret"), "utf8"), "host secret\n");
  assert.equal(lstatSync(join(outside, "secret")).nlink, 1, "a hard link to the host's secret");
}

/** Every path in the staging dir, found without following a symlink. */
function walk(root: string, rel = ""): string[] {
  const out: string[] = [];
  for (const e of readdirSync(join(root, rel), { withFileTypes: true })) {
    const p = rel ? `${rel}/${e.name}` : e.name;
    out.push(p);
    if (e.isDirectory()) out.push(...walk(root, p));
  }
  return out;
}

let n = 0;

describe("layer names: property tests", () => {
  test("layer attack: hostile names and links never change anything outside the staging dir, and escaping or control-character names are refused", {
    timeout: 60_000,
  }, async () => {
    await fc.assert(
      fc.asyncProperty(itemsArb, async (items) => {
        const dir = mkdtempSync(join(scratch, `s${n++}-`));
        const real = realpathSync(dir);
        const b = new RootfsBuilder(dir);
        const r = await onlyRejects(MatchlockError, () =>
          b.applyLayer(Readable.from([layer(items)]), "layer"),
        );
        if (!r.ok) assert.ok(r.error instanceof ImageRejectedError, r.error.message);
        assertOutsideUntouched();
        assert.equal(realpathSync(dir), real);
        for (const p of walk(dir)) {
          assert.doesNotMatch(p, CONTROL, `created ${JSON.stringify(p)}`);
          assert.ok(!p.split("/").includes(".."));
        }
        // Entries before the first hostile name may have been applied; that one may not pass.
        const firstBad = items.findIndex(
          (it) =>
            mustRefuse(it.name) ||
            (it.type === "link" && mustRefuse(it.target)) ||
            (it.type === "symlink" && (it.target === "" || CONTROL.test(it.target))),
        );
        if (firstBad >= 0) assert.ok(!r.ok, `${JSON.stringify(items[firstBad])} was accepted`);
        rmSync(dir, { recursive: true, force: true });
      }),
      runs(150),
    );
  });

  test("absolute names and inner .. that stay inside are neutralised: the file lands at the normalised path", {
    timeout: 30_000,
  }, async () => {
    const safe = fc
      .tuple(
        fc.boolean(),
        fc.array(fc.constantFrom("a", "b", "c", ".", ""), { minLength: 1, maxLength: 4 }),
        fc.constantFrom("f", "g"),
      )
      // "x/../" pairs never climb above the root.
      .chain(([abs, cs, leaf]) =>
        fc
          .array(fc.constantFrom("d/..", "e/../."), { maxLength: 2 })
          .map((ups) => (abs ? "/" : "") + [...cs, ...ups, leaf].join("/")),
      );
    await fc.assert(
      fc.asyncProperty(safe, fc.string({ maxLength: 8 }), async (raw, body) => {
        const dir = mkdtempSync(join(scratch, `n${n++}-`));
        const b = new RootfsBuilder(dir);
        await b.applyLayer(Readable.from([layer([{ type: "file", name: raw, body }])]), "layer");
        const rel = posix.normalize(`/${raw}`).slice(1);
        assert.equal(readFileSync(join(dir, rel), "utf8"), body, `${raw} → ${rel}`);
        rmSync(dir, { recursive: true, force: true });
      }),
      runs(100),
    );
  });
});

describe("layer xattr names: property tests", () => {
  const hasSetfattr = spawnSync("setfattr", ["--version"]).status === 0;
  const victim = join(outside, "secret");

  /** A layer of one file whose pax header carries `key`=`value`. */
  const xattrLayer = (records: Array<[string, string]>) =>
    Buffer.concat([
      member({ name: "pax", flag: "x", size: 0 }, paxRecords(records)),
      member({ name: "f", flag: "0", size: 1 }, Buffer.from("x")),
      END,
    ]);

  test("layer attack: an xattr name with a newline cannot forge a setfattr line that reaches a host file", {
    skip: hasSetfattr ? false : "setfattr (Debian package attr) is not installed",
    timeout: 30_000,
  }, async () => {
    // The blank line ends the staged file's block; the next names a host path. (A pax key ends at
    // its first '=', so the SCHILY route cannot carry one; libarchive's URL-encoded names can.)
    const routes: Array<[string, string]> = [
      [`SCHILY.xattr.user.a\n\n# file: ${victim}\nuser.pwned`, "1"],
      [`LIBARCHIVE.xattr.${encodeURIComponent(`user.a=0x31\n\n# file: ${victim}\nuser.pwned`)}`, "MQ=="],
    ];
    for (const record of routes) {
      const dir = mkdtempSync(join(scratch, `x${n++}-`));
      const b = new RootfsBuilder(dir);
      await b.applyLayer(Readable.from([xattrLayer([record])]), "layer");
      await applyXattrs(dir, b.xattrs);
      const onVictim = spawnSync("getfattr", ["-d", "--absolute-names", victim]).stdout.toString();
      assert.doesNotMatch(onVictim, /pwned/, `${record[0].slice(0, 20)}… reached the host file`);
      assert.ok(b.skipped.some((s) => /xattr name .* refused/.test(s.reason)));
    }
  });

  test("any xattr name either is kept as printable ASCII without '=' or is dropped with a note", {
    timeout: 30_000,
  }, async () => {
    const xname = fc.oneof(
      fc.string({ minLength: 1, maxLength: 20 }).map((s) => `user.${s}`),
      fc.string({ unit: "binary", minLength: 1, maxLength: 20 }).map((s) => `user.${s}`),
      fc.constantFrom("security.capability", "user.a\nb", "user.a=b", "user.é", `user.${"x".repeat(260)}`),
    );
    await fc.assert(
      fc.asyncProperty(
        fc.uniqueArray(xname, { minLength: 1, maxLength: 3 }),
        fc.boolean(),
        async (names, libarchive) => {
          const records = names.map((x): [string, string] =>
            libarchive ? [`LIBARCHIVE.xattr.${encodeURIComponent(x)}`, "MQ=="] : [`SCHILY.xattr.${x}`, "1"],
          );
          const dir = mkdtempSync(join(scratch, `xn${n++}-`));
          const b = new RootfsBuilder(dir);
          const r = await onlyRejects(MatchlockError, () =>
            b.applyLayer(Readable.from([xattrLayer(records)]), "layer"),
          );
          if (!r.ok) return; // a name tar-stream cannot even read as a record key
          for (const x of b.xattrs) assert.match(x.name, /^[!-<>-~]{1,255}$/);
          // A SCHILY key ends at its first '=': that is the name the layer gives.
          const given = names.map((x) => (libarchive ? x : (x.split("=")[0] as string)));
          const kept = new Set(b.xattrs.map((x) => x.name));
          assert.ok(
            given.every((x) => kept.has(x)) || b.skipped.length > 0,
            "an xattr vanished without a note",
          );
          rmSync(dir, { recursive: true, force: true });
        },
      ),
      runs(150),
    );
  });
});
