import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import {
  chmodSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { S_IFLNK, S_IFMT } from "../../src/vfs/fuse-abi.ts";
import { HostFsProvider } from "../../src/vfs/host-fs.ts";
import { OverlayProvider } from "../../src/vfs/overlay.ts";
import { FsError } from "../../src/vfs/provider.ts";
import { ReadOnlyProvider } from "../../src/vfs/readonly.ts";
import { FuseServer } from "../../src/vfs/server.ts";
import { SingleFileProvider } from "../../src/vfs/single-file.ts";
import { FakeKernel } from "../helpers/fuse-client.ts";

/**
 * Hostile guests against host_fs: the host must never follow a symlink out of the mount root, through
 * a final component, an intermediate one, `..`, an absolute target, a link, or a symlink swapped in
 * while it works. Writes aim at a sentinel folder next to the root (never at /etc); reads may name
 * /etc. After every test the sentinel is checked unchanged.
 */

const CALLER = { uid: 0, gid: 0, pid: 1 };
/** Through a symlink used as a directory: ELOOP from openat2, or ENOTDIR from the overlay's own walk. */
const LOOP_OR_NOTDIR = ["ELOOP", "ENOTDIR"];
const O_RDONLY = 0;
const O_WRONLY = 1;
const O_RDWR = 2;

let base: string;
let root: string;
let outside: string;
let p: HostFsProvider;

function sentinelIntact(): void {
  assert.deepEqual(readdirSync(outside).sort(), ["secret"]);
  assert.equal(readFileSync(join(outside, "secret"), "utf8"), "secret");
  assert.equal(statSync(join(outside, "secret")).mode & 0o7777, 0o600);
  assert.equal(statSync(join(outside, "secret")).nlink, 1);
}

async function refused(what: Promise<unknown>, codes: string[] = ["ELOOP"]): Promise<void> {
  await assert.rejects(what, (e: unknown) => {
    assert.ok(e instanceof FsError, `not an FsError: ${e}`);
    assert.ok(codes.includes(e.code), `got ${e.code}, wanted ${codes.join("|")}`);
    return true;
  });
}

describe("host_fs containment (hostile guest)", () => {
  before(() => {
    base = mkdtempSync("/tmp/vfs-hostile-");
    root = join(base, "root");
    outside = join(base, "outside");
    mkdirSync(root);
    mkdirSync(outside);
    writeFileSync(join(outside, "secret"), "secret");
    chmodSync(join(outside, "secret"), 0o600);
    mkdirSync(join(root, "d"));
    writeFileSync(join(root, "d", "f"), "inside");
    symlinkSync("/etc", join(root, "etc"));
    symlinkSync("/etc/shadow", join(root, "shadow"));
    symlinkSync("../outside", join(root, "out"));
    symlinkSync(outside, join(root, "outabs"));
    symlinkSync("../outside/secret", join(root, "secretlink"));
    symlinkSync("../../outside", join(root, "d", "up"));
    p = new HostFsProvider(root);
  });

  after(async () => {
    await p.close();
    rmSync(base, { recursive: true, force: true });
  });

  test("symlink to /etc as final component: seen as a symlink, never opened", async () => {
    assert.equal((await p.getattr("/etc")).mode & S_IFMT, S_IFLNK);
    assert.equal(await p.readlink("/etc"), "/etc");
    await refused(p.open("/etc", O_RDONLY));
    await refused(p.readdir("/etc"));
    await refused(p.open("/shadow", O_RDONLY));
    await refused(p.open("/secretlink", O_RDWR));
    await refused(p.setattr("/secretlink", { size: 0 }, CALLER));
    await refused(p.setattr("/secretlink", { mode: 0o777 }, CALLER));
    await refused(p.create("/secretlink", O_WRONLY, 0o644, CALLER));
    await refused(p.setxattr("/secretlink", "user.x", Buffer.from("1"), 0), ["EPERM"]);
    // Ops on the link itself (not its target) are fine: they change the link, not the secret.
    await p.setattr("/secretlink", { mtime: { sec: 1, nsec: 0 } }, CALLER);
    assert.equal(lstatSync(join(root, "secretlink")).mtimeMs, 1000);
    sentinelIntact();
  });

  test("symlink to /etc as an intermediate component: every op refused", async () => {
    await refused(p.getattr("/etc/passwd"));
    await refused(p.open("/etc/passwd", O_RDONLY));
    await refused(p.getxattr("/etc/passwd", "user.x"), ["ELOOP", "ENODATA"]);
    await refused(p.open("/out/secret", O_RDWR));
    await refused(p.getattr("/outabs/secret"));
    await refused(p.create("/out/new", O_WRONLY, 0o644, CALLER));
    await refused(p.mkdir("/outabs/newdir", 0o755, CALLER));
    await refused(p.mknod("/out/fifo", 0o010644, 0, CALLER));
    await refused(p.symlink("x", "/out/ln", CALLER));
    await refused(p.unlink("/out/secret"));
    await refused(p.rename("/out/secret", "/stolen", 0));
    await refused(p.rename("/d/f", "/out/f", 0));
    await refused(p.link("/out/secret", "/h"));
    await refused(p.link("/d/f", "/out/h"));
    await refused(p.setattr("/out/secret", { mode: 0o777 }, CALLER));
    await refused(p.setattr("/out/secret", { uid: 1234 }, CALLER));
    await refused(p.setattr("/out/secret", { atime: "now" }, CALLER));
    await refused(p.setxattr("/out/secret", "user.x", Buffer.from("1"), 0), ["ELOOP", "EPERM"]);
    await refused(p.open("/d/up/secret", O_RDONLY));
    sentinelIntact();
  });

  test("`..` traversal in a path is refused beneath the root (EXDEV), and as a name by the server", async () => {
    await refused(p.getattr("/../outside/secret"), ["EXDEV"]);
    await refused(p.open("/d/../../outside/secret", O_RDWR), ["EXDEV"]);
    await refused(p.create("/../outside/new", O_WRONLY, 0o644, CALLER), ["EXDEV"]);
    const k = new FakeKernel(new FuseServer({ provider: p, log: () => {} }));
    await k.init();
    const d = await k.lookup(1n, "d");
    await assert.rejects(k.lookup(d.nodeid, ".."), /-22/);
    await assert.rejects(k.lookup(1n, "../outside"), /-22/);
    assert.equal((await k.mkdir(1n, "..")).error, -22);
    assert.equal((await k.rename(d.nodeid, "f", 1n, "../outside/f")).error, -22);
    sentinelIntact();
  });

  test("a guest node that is a symlink cannot be used as a directory (LOOKUP under it)", async () => {
    const lines: string[] = [];
    const k = new FakeKernel(new FuseServer({ provider: p, log: (l) => lines.push(l) }));
    await k.init();
    const etc = await k.lookup(1n, "etc");
    assert.equal(etc.mode & S_IFMT, S_IFLNK);
    await assert.rejects(k.lookup(etc.nodeid, "passwd"), /-40/);
    const out = await k.lookup(1n, "out");
    assert.equal((await k.create(out.nodeid, "evil", O_WRONLY, 0o644)).error, -40);
    assert.equal((await k.mkdir(out.nodeid, "evil")).error, -40);
    assert.equal((await k.symlink(out.nodeid, "evil", "/")).error, -40);
    assert.equal((await k.open(out.nodeid, O_RDONLY)).error, -40);
    assert.equal((await k.setattr(out.nodeid, 1, { mode: 0o777 })).error, -40);
    // Each refusal is a log line naming the op and the path, not a silent failure.
    assert.ok(
      lines.some((l) => l.startsWith("LOOKUP /etc:") && l.includes("ELOOP")),
      lines.join("\n"),
    );
    assert.ok(
      lines.some((l) => l.startsWith("CREATE /out:")),
      lines.join("\n"),
    );
    sentinelIntact();
  });

  test("hardlink to /etc/shadow is impossible: linking a symlink links the symlink itself", async () => {
    const shadowBefore = statSync("/etc/shadow");
    const k = new FakeKernel(new FuseServer({ provider: p, log: () => {} }));
    await k.init();
    const link = await k.lookup(1n, "shadow");
    const r = await k.link(link.nodeid, 1n, "hard");
    assert.equal(r.error, 0);
    const hard = lstatSync(join(root, "hard"));
    assert.ok(hard.isSymbolicLink(), "the new name is a symlink");
    assert.notEqual(hard.ino, shadowBefore.ino);
    assert.equal(statSync("/etc/shadow").nlink, shadowBefore.nlink);
    await refused(p.link("/etc/shadow", "/hard2"));
    await refused(p.link("/secretlink/x", "/hard3"), ["ELOOP", "ENOTDIR"]);
    await refused(p.open("/hard", O_RDONLY));
    rmSync(join(root, "hard"));
    sentinelIntact();
  });

  test("overlay: symlinks in the host folder are never followed by copy-up or writes", async () => {
    const upperDir = join(base, "upper");
    mkdirSync(upperDir);
    const lower = new HostFsProvider(root);
    const o = new OverlayProvider(new ReadOnlyProvider(lower), new HostFsProvider(upperDir));
    try {
      await refused(o.create("/out/new", O_WRONLY, 0o644, CALLER), LOOP_OR_NOTDIR);
      await refused(o.open("/out/secret", O_RDWR), LOOP_OR_NOTDIR);
      await refused(o.open("/secretlink", O_RDWR), LOOP_OR_NOTDIR);
      await refused(o.setattr("/secretlink", { size: 0 }, CALLER), LOOP_OR_NOTDIR);
      await refused(o.setattr("/etc", { mode: 0o777 }, CALLER), LOOP_OR_NOTDIR);
      await refused(o.mkdir("/outabs/d", 0o755, CALLER), LOOP_OR_NOTDIR);
      await refused(o.link("/out/secret", "/h"), LOOP_OR_NOTDIR);
      // The copied-up link is a link (its text), not the file it names.
      assert.ok(lstatSync(join(upperDir, "secretlink")).isSymbolicLink());
      assert.equal(await o.readlink("/secretlink"), "../outside/secret");
      await o.unlink("/shadow");
      assert.ok(lstatSync(join(root, "shadow")).isSymbolicLink(), "host copy untouched");
    } finally {
      await o.close();
    }
    sentinelIntact();
  });

  test("single-file mount: only that name is reachable; a symlink put in its place is not followed", async () => {
    const f = new SingleFileProvider(new HostFsProvider(join(root, "d")), "f");
    try {
      assert.equal((await f.getattr("/")).size, 6);
      await refused(f.getattr("/up"), ["ENOTDIR"]);
      await refused(f.readdir("/"), ["ENOTDIR"]);
      await refused(f.create("/x", O_WRONLY, 0o644, CALLER), ["ENOTDIR"]);
      await refused(f.unlink("/"), ["EBUSY"]);
      const link = new SingleFileProvider(new HostFsProvider(root), "secretlink");
      await refused(link.open("/", O_RDWR));
      await refused(link.setattr("/", { size: 0 }, CALLER));
      await link.close();
    } finally {
      await f.close();
    }
    sentinelIntact();
  });

  test("what the guest may create on the host: no set-uid, no devices, user.* xattrs only", async () => {
    const f = await p.create("/suid", O_WRONLY, 0o4755, CALLER);
    await f.release();
    assert.equal(statSync(join(root, "suid")).mode & 0o7777, 0o755);
    await p.setattr("/suid", { mode: 0o6755 }, CALLER);
    assert.equal(statSync(join(root, "suid")).mode & 0o7777, 0o755);
    await refused(p.mknod("/null", 0o020666, 0x103, CALLER), ["EPERM"]);
    await refused(p.setxattr("/suid", "security.capability", Buffer.alloc(20), 0), ["EOPNOTSUPP"]);
    await refused(p.setxattr("/suid", "trusted.x", Buffer.from("1"), 0), ["EOPNOTSUPP"]);
    await p.setxattr("/suid", "user.ok", Buffer.from("1"), 0);
    assert.deepEqual(await p.listxattr("/suid"), ["user.ok"]);
    rmSync(join(root, "suid"));
  });

  test("a FIFO never blocks the server", async () => {
    await p.mknod("/fifo", 0o010644, 0, CALLER);
    await refused(p.open("/fifo", O_WRONLY), ["ENXIO"]);
    const r = await p.open("/fifo", O_RDONLY);
    await r.release();
    rmSync(join(root, "fifo"));
  });

  test("race: a directory and a file swapped with symlinks to outside during thousands of ops", async () => {
    // A child process exchanges (renameat2 RENAME_EXCHANGE, atomic) root/race ↔ root/swap, where one
    // is a real directory and the other a symlink to the sentinel, and root/race2/f ↔ root/race2/g
    // (a file and a symlink to the secret), as fast as it can, while we operate through the provider.
    mkdirSync(join(root, "race"));
    symlinkSync(outside, join(root, "swap"));
    mkdirSync(join(root, "race2"));
    writeFileSync(join(root, "race2", "f"), "mine");
    symlinkSync(join(outside, "secret"), join(root, "race2", "g"));
    const script = `
import ctypes, os, sys, time
libc = ctypes.CDLL("libc.so.6", use_errno=True)
os.chdir(sys.argv[1])
end = time.time() + 60
while time.time() < end:
    libc.renameat2(-100, b"race", -100, b"swap", 2)
    libc.renameat2(-100, b"race2/f", -100, b"race2/g", 2)
`;
    const swapper = spawn("python3", ["-c", script, root], { stdio: "ignore" });
    let ok = 0;
    let refusedCount = 0;
    const tally = async (op: Promise<unknown>) => {
      try {
        const r = await op;
        if (r && typeof (r as { release?: unknown }).release === "function") {
          await (r as { release(): Promise<void> }).release();
        }
        ok++;
      } catch (e) {
        assert.ok(e instanceof FsError, `unexpected ${e}`);
        refusedCount++;
      }
    };
    try {
      for (let i = 0; i < 3000; i++) {
        await tally(p.create("/race/secret", O_RDWR, 0o644, CALLER));
        await tally(p.open("/race/secret", O_RDWR));
        await tally(p.setattr("/race/secret", { size: 0, mode: 0o777, atime: "now" }, CALLER));
        await tally(p.mkdir("/race/sub", 0o755, CALLER));
        await tally(p.symlink("/", "/race/ln", CALLER));
        await tally(p.setxattr("/race/secret", "user.x", Buffer.from("1"), 0));
        await tally(p.unlink("/race/secret"));
        await tally(p.unlink("/race/ln"));
        await tally(p.rmdir("/race/sub"));
        await tally(p.open("/race2/f", O_RDWR));
        await tally(p.setattr("/race2/f", { size: 1, mode: 0o777 }, CALLER));
        await tally(p.setattr("/race2/g", { uid: 4321, mtime: "now" }, CALLER));
        await tally(p.setxattr("/race2/f", "user.y", Buffer.from("1"), 0));
        await tally(p.link("/race2/f", "/race/hl"));
        await tally(p.unlink("/race/hl"));
        await tally(p.rename("/race2/f", "/race/moved", 0));
        await tally(p.rename("/race/moved", "/race2/f", 0));
        await tally(p.rename("/race/secret", "/race/secret2", 1));
        await tally(p.unlink("/race/secret2"));
      }
    } finally {
      swapper.kill();
    }
    assert.ok(ok > 0 && refusedCount > 0, `both outcomes happen (ok ${ok}, refused ${refusedCount})`);
    sentinelIntact();
    assert.equal(statSync(join(outside, "secret")).uid, 0);
    assert.deepEqual((await import("node:fs")).readdirSync(outside), ["secret"]);
  });
});
