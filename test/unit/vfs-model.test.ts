import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import fc from "fast-check";
import { S_IFDIR, S_IFLNK, S_IFMT, S_IFREG } from "../../src/vfs/fuse-abi.ts";
import { HostFsProvider } from "../../src/vfs/host-fs.ts";
import { MemoryProvider } from "../../src/vfs/memory.ts";
import { OverlayProvider } from "../../src/vfs/overlay.ts";
import type { Provider } from "../../src/vfs/provider.ts";
import { ReadOnlyProvider } from "../../src/vfs/readonly.ts";
import { runs } from "../helpers/property.ts";

/**
 * Model-based: random sequences of file-system operations run in lockstep on host_fs (real Linux
 * semantics, the reference), memory, and overlay (over a host folder seeded like the reference); the
 * errno of every step and the final trees must agree. Differences that are documented (overlay's
 * EXDEV for renaming a directory from the host, EINVAL for RENAME_EXCHANGE) skip the step everywhere.
 */

const CALLER = { uid: 0, gid: 0, pid: 1 };
const O_RDWR = 2;
const O_EXCL = 0o200;

const base = mkdtempSync("/tmp/vfs-model-");
after(() => rmSync(base, { recursive: true, force: true }));
let seq = 0;

type Step =
  | { op: "mkdir" | "unlink" | "rmdir"; p: string }
  | { op: "write"; p: string; at: number; data: string; excl: boolean }
  | { op: "truncate"; p: string; size: number }
  | { op: "chmod"; p: string; mode: number }
  | { op: "xattr"; p: string; value: string; flags: number }
  | { op: "rename"; p: string; q: string; flags: number }
  | { op: "link"; p: string; q: string }
  | { op: "symlink"; p: string; target: string };

const name = fc.constantFrom("a", "b", "c");
const path = fc.array(name, { minLength: 1, maxLength: 3 }).map((c) => `/${c.join("/")}`);
const step: fc.Arbitrary<Step> = fc.oneof(
  fc.record({ op: fc.constantFrom("mkdir" as const, "unlink" as const, "rmdir" as const), p: path }),
  fc.record({
    op: fc.constant("write" as const),
    p: path,
    at: fc.nat(20),
    data: fc.string({ maxLength: 10 }),
    excl: fc.boolean(),
  }),
  fc.record({ op: fc.constant("truncate" as const), p: path, size: fc.nat(30) }),
  fc.record({
    op: fc.constant("chmod" as const),
    p: path,
    mode: fc.constantFrom(0o600, 0o755, 0o700, 0o1777),
  }),
  fc.record({
    op: fc.constant("xattr" as const),
    p: path,
    value: fc.constantFrom("", "v", "value"),
    flags: fc.constantFrom(0, 1, 2),
  }),
  fc.record({ op: fc.constant("rename" as const), p: path, q: path, flags: fc.constantFrom(0, 0, 1, 2) }),
  fc.record({ op: fc.constant("link" as const), p: path, q: path }),
  fc.record({ op: fc.constant("symlink" as const), p: path, target: fc.constantFrom("x", "/etc", "../a") }),
);

async function apply(p: Provider, s: Step): Promise<string> {
  try {
    switch (s.op) {
      case "mkdir":
        await p.mkdir(s.p, 0o755, CALLER);
        break;
      case "unlink":
        await p.unlink(s.p);
        break;
      case "rmdir":
        await p.rmdir(s.p);
        break;
      case "write": {
        const f = await p.create(s.p, O_RDWR | (s.excl ? O_EXCL : 0), 0o644, CALLER);
        try {
          await f.write(s.at, Buffer.from(s.data));
        } finally {
          await f.release();
        }
        break;
      }
      case "truncate":
        await p.setattr(s.p, { size: s.size }, CALLER);
        break;
      case "chmod":
        await p.setattr(s.p, { mode: s.mode }, CALLER);
        break;
      case "xattr":
        await p.setxattr(s.p, "user.k", Buffer.from(s.value), s.flags);
        break;
      case "rename":
        await p.rename(s.p, s.q, s.flags);
        break;
      case "link":
        await p.link(s.p, s.q);
        break;
      case "symlink":
        await p.symlink(s.target, s.p, CALLER);
        break;
    }
    return "ok";
  } catch (e) {
    const code = String((e as { code?: unknown }).code);
    // A symlink or file used as a directory: Linux with RESOLVE_NO_SYMLINKS says ELOOP, a tree
    // without symlink resolution ENOTDIR. The guest kernel never sends such paths.
    return code === "ELOOP" ? "ENOTDIR" : code;
  }
}

async function tree(p: Provider, dir = "/", out: string[] = []): Promise<string[]> {
  const entries = (await p.readdir(dir)).map((e) => e.name).sort();
  for (const n of entries) {
    const child = dir === "/" ? `/${n}` : `${dir}/${n}`;
    const a = await p.getattr(child);
    const type = a.mode & S_IFMT;
    if (type !== S_IFLNK) {
      const x = await p.getxattr(child, "user.k").then(
        (v) => v.toString(),
        () => "-",
      );
      out.push(`${child} mode ${(a.mode & 0o7777).toString(8)} xattr ${x}`);
    }
    if (type === S_IFDIR) {
      out.push(`${child}/`);
      await tree(p, child, out);
    } else if (type === S_IFLNK) {
      out.push(`${child} -> ${await p.readlink(child)}`);
    } else if (type === S_IFREG) {
      const f = await p.open(child, 0);
      const data = await f.read(0, 1 << 16);
      await f.release();
      out.push(`${child} ${a.size} ${a.nlink} ${createHash("md5").update(data).digest("hex").slice(0, 8)}`);
    }
  }
  return out;
}

const SEED: Step[] = [
  { op: "mkdir", p: "/a" },
  { op: "write", p: "/a/b", at: 0, data: "seed", excl: true },
  { op: "mkdir", p: "/b" },
  { op: "mkdir", p: "/b/c" },
  { op: "write", p: "/c", at: 3, data: "x", excl: true },
];

describe("providers agree with Linux (model-based)", () => {
  test("property: memory and overlay behave like host_fs step by step", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(step, { maxLength: 30 }), async (steps) => {
        const dir = join(base, String(seq++));
        for (const d of ["ref", "lower", "upper"]) mkdirSync(join(dir, d), { recursive: true });
        const ref = new HostFsProvider(join(dir, "ref"));
        const mem = new MemoryProvider();
        const seedLower = new HostFsProvider(join(dir, "lower"));
        for (const s of SEED) {
          for (const p of [ref, mem, seedLower]) assert.equal(await apply(p, s), "ok");
        }
        const lowerBefore = await tree(seedLower);
        const ov = new OverlayProvider(
          new ReadOnlyProvider(seedLower),
          new HostFsProvider(join(dir, "upper")),
        );
        try {
          for (const [i, s] of steps.entries()) {
            const o = await apply(ov, s);
            // Documented overlay limits: host directories are copied, not renamed; no RENAME_EXCHANGE.
            if (s.op === "rename" && (o === "EXDEV" || (s.flags === 2 && o === "EINVAL"))) continue;
            const r = await apply(ref, s);
            const m = await apply(mem, s);
            assert.equal(m, r, `memory, step ${i} ${JSON.stringify(s)}`);
            assert.equal(o, r, `overlay, step ${i} ${JSON.stringify(s)}`);
          }
          const want = await tree(ref);
          assert.deepEqual(await tree(mem), want, "memory tree");
          // Overlay: same names, types, sizes and contents; link counts differ after copy-up.
          const strip = (t: string[]) => t.map((l) => l.replace(/ (\d+) \d+ /, " $1 _ "));
          assert.deepEqual(strip(await tree(ov)), strip(want), "overlay tree");
          assert.deepEqual(await tree(seedLower), lowerBefore, "lower untouched");
        } finally {
          await ref.close();
          await ov.close();
          rmSync(dir, { recursive: true, force: true });
        }
      }),
      runs(60),
    );
  });
});
