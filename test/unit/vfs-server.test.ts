import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Fattr, Op, S_IFDIR, S_IFMT, S_IFREG } from "../../src/vfs/fuse-abi.ts";
import { MemoryProvider } from "../../src/vfs/memory.ts";
import { OverlayProvider } from "../../src/vfs/overlay.ts";
import { ReadOnlyProvider } from "../../src/vfs/readonly.ts";
import { MountRouter } from "../../src/vfs/router.ts";
import { FuseServer } from "../../src/vfs/server.ts";
import { cstr, FakeKernel, u32, u64 } from "../helpers/fuse-client.ts";

/** The dispatcher's tables and the providers' semantics, driven by a fake kernel (no mount). */

const CALLER = { uid: 0, gid: 0, pid: 1 };
const quiet = () => {};

async function kernelFor(provider = new MemoryProvider(), opts: { maxNodes?: number } = {}) {
  const server = new FuseServer({ provider, log: quiet, ...opts });
  const k = new FakeKernel(server);
  await k.init();
  return { k, server, provider };
}

describe("FuseServer", () => {
  test("lookup counts: a node lives until FORGET brings it to zero; BATCH_FORGET too", async () => {
    const { k, server } = await kernelFor();
    await k.mkdir(1n, "a");
    const again = await k.lookup(1n, "a");
    assert.equal(server.stats.nodes, 2);
    await k.forget(again.nodeid, 1);
    assert.equal(server.stats.nodes, 2, "one lookup left (from MKDIR)");
    await k.send(Op.BATCH_FORGET, 0n, Buffer.concat([u32(1), u32(0), u64(again.nodeid), u64(1)]));
    assert.equal(server.stats.nodes, 1);
    const fresh = await k.lookup(1n, "a");
    assert.notEqual(fresh.nodeid, again.nodeid, "nodeids are never reused");
  });

  test("rename moves a looked-up subtree: its nodes keep working under the new path", async () => {
    const { k } = await kernelFor();
    await k.mkdir(1n, "a");
    const a = await k.lookup(1n, "a");
    const c = await k.create(a.nodeid, "f", 2, 0o644);
    await k.write(c.fh, 0, Buffer.from("data"));
    await k.release(c.fh);
    const f = await k.lookup(a.nodeid, "f");
    assert.equal((await k.rename(1n, "a", 1n, "b")).error, 0);
    assert.equal((await k.getattr(f.nodeid)).size, 4);
    const o = await k.open(f.nodeid, 0);
    assert.equal((await k.read(o.fh, 0, 100)).body.toString(), "data");
    await assert.rejects(k.lookup(1n, "a"), /-2/);
  });

  test("RENAME2: NOREPLACE refuses an existing target, EXCHANGE swaps", async () => {
    const { k } = await kernelFor();
    for (const n of ["x", "y"]) {
      const c = await k.create(1n, n, 2, 0o644);
      await k.write(c.fh, 0, Buffer.from(n));
      await k.release(c.fh);
    }
    assert.equal((await k.rename(1n, "x", 1n, "y", 1)).error, -17);
    assert.equal((await k.rename(1n, "x", 1n, "y", 2)).error, 0);
    const y = await k.lookup(1n, "y");
    const o = await k.open(y.nodeid, 0);
    assert.equal((await k.read(o.fh, 0, 10)).body.toString(), "x");
  });

  test("FLUSH answers ENOSYS (the kernel then stops sending it); what was written is there before close", async () => {
    const { k } = await kernelFor();
    const c = await k.create(1n, "f", 2, 0o644);
    await k.write(c.fh, 0, Buffer.from("written"));
    const flush = await k.call(
      Op.FLUSH,
      c.body.readBigUInt64LE(0),
      Buffer.concat([u64(c.fh), u32(0), u32(0), u64(0)]),
    );
    assert.equal(flush.error, -38);
    const o = await k.open((await k.lookup(1n, "f")).nodeid, 0);
    assert.equal((await k.read(o.fh, 0, 100)).body.toString(), "written");
    assert.equal((await k.release(c.fh)).error, 0);
  });

  test("an unlinked but open file still answers GETATTR through its handle", async () => {
    const { k } = await kernelFor();
    const c = await k.create(1n, "t", 2, 0o600);
    const node = c.body.readBigUInt64LE(0);
    await k.write(c.fh, 0, Buffer.from("12345"));
    assert.equal((await k.unlink(1n, "t")).error, 0);
    assert.equal((await k.getattr(node)).error, -2);
    const r = await k.call(Op.GETATTR, node, Buffer.concat([u32(1), u32(0), u64(c.fh)]));
    assert.equal(r.error, 0);
    assert.equal(Number(r.body.readBigUInt64LE(24)), 5);
  });

  test("SETATTR: size to any length, mode, times (incl. NOW)", async () => {
    const { k } = await kernelFor();
    const c = await k.create(1n, "s", 2, 0o644);
    await k.release(c.fh);
    const s = await k.lookup(1n, "s");
    assert.equal((await k.setattr(s.nodeid, Fattr.SIZE, { size: 1 << 20 })).error, 0);
    assert.equal((await k.getattr(s.nodeid)).size, 1 << 20);
    await k.setattr(s.nodeid, Fattr.SIZE, { size: 3 });
    await k.setattr(s.nodeid, Fattr.MODE, { mode: 0o600 });
    assert.equal((await k.getattr(s.nodeid)).mode & 0o7777, 0o600);
    const r = await k.setattr(s.nodeid, Fattr.MTIME | Fattr.ATIME_NOW | Fattr.ATIME, { mtime: 1000 });
    assert.equal(r.error, 0);
    assert.equal(Number(r.body.readBigUInt64LE(16 + 32)), 1000);
  });

  test("READDIR pages with offsets; READDIRPLUS counts a lookup per entry but not . and ..", async () => {
    const { k, server } = await kernelFor();
    for (let i = 0; i < 50; i++) await k.mkdir(1n, `dir-with-a-long-name-${i}`);
    for (let i = 0; i < 50; i++) await k.forget(BigInt(i + 2), 1);
    assert.equal(server.stats.nodes, 1);
    const names = await k.list(1n, false, 512);
    assert.equal(names.length, 52);
    assert.deepEqual(
      names.slice(0, 2).map((e) => e.name),
      [".", ".."],
    );
    const plus = await k.list(1n, true, 1024);
    assert.equal(plus.length, 52);
    assert.equal(plus[0]?.nodeid, 0n);
    assert.equal(server.stats.nodes, 51);
  });

  test("node table is bounded: past maxNodes, LOOKUP gets ENFILE", async () => {
    const { k } = await kernelFor(new MemoryProvider(), { maxNodes: 3 });
    await k.mkdir(1n, "a");
    await k.mkdir(1n, "b");
    assert.equal((await k.mkdir(1n, "c")).error, -23);
  });

  test("xattrs: size probe, ERANGE, list, remove", async () => {
    const { k } = await kernelFor();
    await k.mkdir(1n, "x");
    const x = await k.lookup(1n, "x");
    assert.equal((await k.setxattr(x.nodeid, "user.k", Buffer.from("value"))).error, 0);
    const probe = await k.call(Op.GETXATTR, x.nodeid, Buffer.concat([u32(0), u32(0), cstr("user.k")]));
    assert.equal(probe.body.readUInt32LE(0), 5);
    const small = await k.call(Op.GETXATTR, x.nodeid, Buffer.concat([u32(2), u32(0), cstr("user.k")]));
    assert.equal(small.error, -34);
    const list = await k.call(Op.LISTXATTR, x.nodeid, Buffer.concat([u32(100), u32(0)]));
    assert.equal(list.body.toString(), "user.k\0");
    assert.equal((await k.call(Op.REMOVEXATTR, x.nodeid, cstr("user.k"))).error, 0);
    const gone = await k.call(Op.GETXATTR, x.nodeid, Buffer.concat([u32(0), u32(0), cstr("user.k")]));
    assert.equal(gone.error, -61);
  });

  test("read-only wrapper: EROFS on every change, reads pass", async () => {
    const mem = new MemoryProvider();
    await mem.mkdir("/d", 0o755, CALLER);
    const f = await mem.create("/d/f", 2, 0o644, CALLER);
    await f.write(0, Buffer.from("ro"));
    const { k } = await kernelFor(new ReadOnlyProvider(mem) as unknown as MemoryProvider);
    const d = await k.lookup(1n, "d");
    const ff = await k.lookup(d.nodeid, "f");
    assert.equal((await k.open(ff.nodeid, 2)).error, -30);
    const o = await k.open(ff.nodeid, 0);
    assert.equal((await k.read(o.fh, 0, 10)).body.toString(), "ro");
    assert.equal((await k.mkdir(1n, "n")).error, -30);
    assert.equal((await k.unlink(d.nodeid, "f")).error, -30);
    assert.equal((await k.setattr(ff.nodeid, Fattr.SIZE, { size: 0 })).error, -30);
    assert.equal((await k.setxattr(ff.nodeid, "user.a", Buffer.from("1"))).error, -30);
  });
});

describe("overlay provider (memory lower + memory upper)", () => {
  async function setup() {
    const lower = new MemoryProvider();
    await lower.mkdir("/src", 0o755, CALLER);
    const f = await lower.create("/src/a.txt", 2, 0o644, CALLER);
    await f.write(0, Buffer.from("lower"));
    await lower.mkdir("/src/deep", 0o755, CALLER);
    await (await lower.create("/src/deep/z", 2, 0o644, CALLER)).release();
    const upper = new MemoryProvider();
    return { lower, upper, o: new OverlayProvider(new ReadOnlyProvider(lower), upper) };
  }

  test("reads fall through; nothing is copied until a write", async () => {
    const { upper, o } = await setup();
    const h = await o.open("/src/a.txt", 0);
    assert.equal((await h.read(0, 10)).toString(), "lower");
    assert.deepEqual(await upper.readdir("/"), []);
  });

  test("first write copies the file up; lower keeps its bytes", async () => {
    const { lower, upper, o } = await setup();
    const h = await o.open("/src/a.txt", 2);
    await h.write(5, Buffer.from("+upper"));
    const l = await lower.open("/src/a.txt", 0);
    assert.equal((await l.read(0, 100)).toString(), "lower");
    const u = await upper.open("/src/a.txt", 0);
    assert.equal((await u.read(0, 100)).toString(), "lower+upper");
    assert.equal((await o.getattr("/src/a.txt")).size, 11);
  });

  test("delete leaves a whiteout in upper; lower unchanged; names .wh.* reserved", async () => {
    const { lower, upper, o } = await setup();
    await o.unlink("/src/a.txt");
    await assert.rejects(o.getattr("/src/a.txt"), { code: "ENOENT" });
    assert.deepEqual(
      (await o.readdir("/src")).map((e) => e.name),
      ["deep"],
    );
    assert.ok(await upper.getattr("/src/.wh.a.txt"));
    assert.ok(await lower.getattr("/src/a.txt"));
    await assert.rejects(o.mkdir("/src/.wh.x", 0o755, CALLER), { code: "EPERM" });
    const again = await o.create("/src/a.txt", 2, 0o644, CALLER);
    assert.equal((await again.read(0, 10)).length, 0);
  });

  test("rmdir of a lower directory, then mkdir: the new directory is empty (opaque)", async () => {
    const { o } = await setup();
    await assert.rejects(o.rmdir("/src/deep"), { code: "ENOTEMPTY" });
    await o.unlink("/src/deep/z");
    await o.rmdir("/src/deep");
    await o.mkdir("/src/deep", 0o755, CALLER);
    assert.deepEqual(await o.readdir("/src/deep"), []);
  });

  test("rename of a file copies it up and whites out the old name; lower directory rename is EXDEV", async () => {
    const { lower, o } = await setup();
    await o.rename("/src/a.txt", "/b.txt", 0);
    assert.equal((await o.getattr("/b.txt")).size, 5);
    await assert.rejects(o.getattr("/src/a.txt"), { code: "ENOENT" });
    assert.ok(await lower.getattr("/src/a.txt"));
    await assert.rejects(o.rename("/src", "/src2", 0), { code: "EXDEV" });
    await o.mkdir("/new", 0o755, CALLER);
    await o.rename("/new", "/new2", 0);
    assert.ok(await o.getattr("/new2"));
  });
});

describe("mount router", () => {
  async function setup() {
    const root = new MemoryProvider();
    const data = new MemoryProvider();
    await data.mkdir("/in", 0o755, CALLER);
    const r = new MountRouter([
      { path: "/", provider: root },
      { path: "/mnt/data", provider: data },
    ]);
    return { root, data, r };
  }

  test("synthesised parents list the mounts below them", async () => {
    const { r } = await setup();
    assert.equal((await r.getattr("/mnt")).mode & S_IFMT, S_IFDIR);
    assert.deepEqual(
      (await r.readdir("/")).map((e) => e.name),
      ["mnt"],
    );
    assert.deepEqual(
      (await r.readdir("/mnt")).map((e) => e.name),
      ["data"],
    );
    assert.deepEqual(
      (await r.readdir("/mnt/data")).map((e) => e.name),
      ["in"],
    );
  });

  test("files route to the deepest mount; rename and link across mounts are EXDEV", async () => {
    const { r, data, root } = await setup();
    await (await r.create("/mnt/data/in/f", 2, 0o644, CALLER)).release();
    assert.equal((await data.getattr("/in/f")).mode & S_IFMT, S_IFREG);
    await (await r.create("/top", 2, 0o644, CALLER)).release();
    assert.ok(await root.getattr("/top"));
    await assert.rejects(r.rename("/top", "/mnt/data/top", 0), { code: "EXDEV" });
    await assert.rejects(r.link("/mnt/data/in/f", "/f"), { code: "EXDEV" });
    await r.rename("/mnt/data/in/f", "/mnt/data/g", 0);
    await assert.rejects(r.rmdir("/mnt/data"), { code: "EBUSY" });
    await assert.rejects(r.rename("/mnt", "/x", 0), { code: "EBUSY" });
    assert.notEqual((await r.getattr("/top")).ino, (await r.getattr("/mnt/data/g")).ino);
  });
});

describe("workspace config", () => {
  test("guest paths map into the workspace; outside it is refused", async () => {
    const { routerPath, buildWorkspace } = await import("../../src/vfs/index.ts");
    assert.equal(routerPath("/workspace", "/workspace"), "/");
    assert.equal(routerPath("/workspace/", "/workspace/a/b"), "/a/b");
    assert.throws(() => routerPath("/workspace", "/workspaces"), { code: "EINVAL" });
    const r = await buildWorkspace({
      workspace: "/workspace",
      mounts: { "/workspace": { type: "memory" }, "/workspace/x/y": { type: "memory", readonly: true } },
      overlayUpper: () => "/nonexistent",
    });
    assert.deepEqual(
      (await r.readdir("/")).map((e) => e.name),
      ["x"],
    );
    await assert.rejects(r.mkdir("/x/y/z", 0o755, CALLER), { code: "EROFS" });
  });
});

describe("overlay numbering", () => {
  test("overlayIndexes numbers the overlay mounts alone, in config order: the upper dirs buildWorkspace asks for", async () => {
    const { overlayIndexes, buildWorkspace } = await import("../../src/vfs/index.ts");
    const { mkdtempSync, rmSync } = await import("node:fs");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const dir = mkdtempSync(join(tmpdir(), "vfs-overlay-index-"));
    try {
      const mounts = {
        "/w/a": { type: "memory" as const },
        "/w/b": { type: "overlay" as const, host_path: dir },
        "/w/c": { type: "host_fs" as const, host_path: dir },
        "/w/d": { type: "overlay" as const, host_path: dir },
      };
      assert.deepEqual(
        [...overlayIndexes(mounts)],
        [
          ["/w/b", 0],
          ["/w/d", 1],
        ],
      );
      const asked: number[] = [];
      const based: number[] = [];
      const ws = await buildWorkspace({
        workspace: "/w",
        mounts,
        overlayUpper: (i) => {
          asked.push(i);
          return join(dir, `.upper-${i}`);
        },
        overlayBase: (i) => {
          based.push(i);
          return () => {};
        },
      });
      await ws.close?.();
      assert.deepEqual(asked, [0, 1]);
      assert.deepEqual(based, [0, 1]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("server log", () => {
  test("guest-chosen names cannot forge log lines, and a flood is limited", async () => {
    const lines: string[] = [];
    const mem = new MemoryProvider();
    mem.getxattr = async () => {
      throw new Error("host failure");
    };
    const k = new FakeKernel(new FuseServer({ provider: mem, log: (l) => lines.push(l) }));
    await k.init();
    const made = await k.mkdir(1n, "evil\nmatchlock vfs: forged\u001b[2J");
    const node = made.body.readBigUInt64LE(0);
    for (let i = 0; i < 200; i++) {
      const r = await k.call(Op.GETXATTR, node, Buffer.concat([u32(0), u32(0), cstr("user.a")]));
      assert.equal(r.error, -5);
    }
    assert.equal(lines.length, 50);
    assert.equal(lines[0], "GETXATTR /evil\\x0amatchlock vfs: forged\\x1b[2J: host failure");
    assert.ok(lines.every((l) => !l.includes("\n") && !l.includes("\u001b")));
  });
});

describe("bounded directory listings", () => {
  test("listings held by open directories are bounded in total (ENOMEM), freed by RELEASEDIR", async () => {
    const mem = new MemoryProvider();
    for (let i = 0; i < 40; i++) await mem.mkdir(`/d${i}`, 0o755, CALLER);
    const k = new FakeKernel(new FuseServer({ provider: mem, log: () => {}, maxDirEntries: 100 }));
    await k.init();
    const readdir = (fh: bigint) =>
      k.call(Op.READDIR, 1n, Buffer.concat([u64(fh), u64(0), u32(4096), u32(0), u64(0), u32(0), u32(0)]));
    const a = await k.opendir(1n);
    const b = await k.opendir(1n);
    const c = await k.opendir(1n);
    assert.equal((await readdir(a)).error, 0);
    assert.equal((await readdir(b)).error, 0);
    assert.equal((await readdir(c)).error, -12);
    await k.call(Op.RELEASEDIR, 1n, Buffer.concat([u64(a), u32(0), u32(0), u64(0)]));
    assert.equal((await readdir(c)).error, 0);
  });
});

describe("memory provider budget", () => {
  test("an unlinked file counts until its last handle is released; xattrs count too", async () => {
    const mem = new MemoryProvider({ maxBytes: 1000 });
    const f = await mem.create("/t", 2, 0o644, CALLER);
    await mem.unlink("/t");
    await f.write(0, Buffer.alloc(800));
    await assert.rejects(
      mem.create("/u", 2, 0o644, CALLER).then((g) => g.write(0, Buffer.alloc(300))),
      {
        code: "ENOSPC",
      },
    );
    await f.release();
    const g = await mem.open("/u", 2);
    assert.equal(await g.write(0, Buffer.alloc(900)), 900);
    await assert.rejects(mem.setxattr("/u", "user.big", Buffer.alloc(200), 0), { code: "ENOSPC" });
  });
});
