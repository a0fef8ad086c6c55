import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import {
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { type ChildMount, mountInChild, type ProviderSpec } from "../helpers/host-fuse.ts";

/**
 * The FUSE server driven by the host's real kernel (no VM): each provider is mounted on a temp dir
 * through /dev/fuse (test/helpers/host-fuse.ts) and real tools run against it — git, tar, cp -a,
 * python3, sh redirections, coreutils, attr. Afterwards the host folders are checked: host_fs changes
 * are on the host, overlay leaves the host copy untouched and keeps its changes in the upper dir,
 * read-only refuses with EROFS.
 */

const work = mkdtempSync("/tmp/matchlock-vfs-");
after(() => rmSync(work, { recursive: true, force: true }));
const canMount = process.getuid?.() === 0 && existsSync("/dev/fuse");
const hasNpm = (() => {
  try {
    execFileSync("sh", ["-c", "command -v npm"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
})();

let n = 0;
async function withMount(spec: ProviderSpec, fn: (mnt: string, m: ChildMount) => void | Promise<void>) {
  const mnt = join(work, `mnt${n++}`);
  mkdirSync(mnt);
  const m = await mountInChild(spec, mnt);
  try {
    await fn(mnt, m);
  } catch (e) {
    process.stderr.write(`server log:\n${m.log()}\n`);
    throw e;
  } finally {
    await m.stop();
  }
}

function sh(cwd: string, script: string): string {
  return execFileSync("sh", ["-ec", script], {
    cwd,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    env: {
      ...process.env,
      GIT_AUTHOR_NAME: "t",
      GIT_AUTHOR_EMAIL: "t@e",
      GIT_COMMITTER_NAME: "t",
      GIT_COMMITTER_EMAIL: "t@e",
    },
  });
}

function shFails(cwd: string, script: string): string {
  try {
    sh(cwd, script);
  } catch (e) {
    return String((e as { stderr?: unknown }).stderr);
  }
  assert.fail(`expected failure: ${script}`);
}

const PY = `
import os, shutil, tempfile
os.makedirs("py/a/b", exist_ok=True)
with open("py/a/b/f.txt", "w") as f:
    f.write("hello"); f.flush(); os.fsync(f.fileno())
with open("py/a/b/f.txt", "a") as f:
    f.write(" world")
with open("py/a/b/f.txt", "r+b") as f:
    f.seek(0); f.write(b"H")
assert open("py/a/b/f.txt").read() == "Hello world"
os.rename("py/a/b/f.txt", "py/a/g.txt")
open("py/new", "w").write("new")
os.replace("py/new", "py/a/g.txt")
assert open("py/a/g.txt").read() == "new"
d = os.open("py/a", os.O_RDONLY | os.O_DIRECTORY)
os.fsync(d)
os.close(d)
shutil.copytree("py/a", "py/copy")
os.truncate("py/copy/g.txt", 10000)
assert os.stat("py/copy/g.txt").st_size == 10000
assert sorted(e.name for e in os.scandir("py")) == ["a", "copy"]
with tempfile.NamedTemporaryFile(dir="py", delete=True) as t:
    t.write(b"x" * 100000); t.flush()
    assert os.fstat(t.fileno()).st_size == 100000
fd = os.open("py/sparse", os.O_CREAT | os.O_RDWR, 0o644)
os.pwrite(fd, b"end", 1 << 20)
os.close(fd)
assert os.path.getsize("py/sparse") == (1 << 20) + 3
fd = os.open("py/sparse", os.O_RDWR)
assert os.lseek(fd, 0, os.SEEK_DATA) >= 0
assert 0 <= os.lseek(fd, 0, os.SEEK_HOLE) <= (1 << 20) + 3
os.posix_fallocate(fd, 0, (1 << 20) + 4096)
assert os.fstat(fd).st_size == (1 << 20) + 4096
os.close(fd)
os.mkfifo("py/fifo")
assert os.path.exists("py/fifo")
for e in os.scandir("py/copy"):  # d_ino from READDIR(PLUS) = st_ino from LOOKUP
    assert e.inode() == os.lstat(e.path).st_ino, e.path
shutil.rmtree("py/copy")
import mmap
with open("py/mm", "wb") as f:
    f.write(bytes(8192))
with open("py/mm", "r+b") as f:
    m = mmap.mmap(f.fileno(), 8192)
    m[4096:4101] = b"mmap!"
    m.flush(); m.close()
assert open("py/mm", "rb").read()[4096:4101] == b"mmap!"
print("ok")
`;

/** The same tools on any read-write mount. */
function toolSuite(mnt: string, src: string): void {
  assert.equal(sh(mnt, "echo a > f; echo b >> f; cat f"), "a\nb\n");
  assert.equal(sh(mnt, "echo 1 > x; echo 2 > y; mv x y; cat y; test ! -e x"), "1\n");
  assert.equal(
    sh(mnt, "chmod 640 f; truncate -s 12345 f; touch -d '2001-02-03 04:05:06 UTC' f; stat -c '%a %s %Y' f"),
    "640 12345 981173106\n",
  );
  assert.equal(sh(mnt, "truncate -s 2 f; cat f"), "a\n");
  assert.equal(
    sh(mnt, "ln -s f l; readlink l; cat l; ln -s /etc/hostname abs; readlink abs"),
    "f\na\n/etc/hostname\n",
  );
  assert.equal(sh(mnt, "ln f h; stat -c %h f; echo z >> h; cat f"), "2\na\nz\n");
  assert.match(sh(mnt, "df -P ."), /matchlock/);
  // Locks are the guest kernel's own (POSIX_LOCKS/FLOCK_LOCKS not negotiated): they just work.
  assert.equal(
    sh(
      mnt,
      "flock f -c 'echo locked'; python3 -c \"import fcntl; f=open('f','r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('lockf')\"",
    ),
    "locked\nlockf\n",
  );
  assert.equal(sh(mnt, "setfattr -n user.k -v val f; getfattr --only-values -n user.k f"), "val");
  assert.equal(sh(mnt, 'python3 -c "$PY"'.replace("$PY", PY.replaceAll('"', '\\"'))), "ok\n");
  sh(mnt, `cp -a ${src} copied; diff -r ${src} copied`);
  sh(mnt, "tar cf t.tar copied; mkdir ex; tar xf t.tar -C ex; diff -r copied ex/copied; rm -r ex t.tar");
  sh(mnt, "dd if=/dev/urandom of=big bs=1M count=6 status=none; cp big big2; cmp big big2; rm big2");
  sh(mnt, "mkdir -p d/e/f; touch d/e/f/g; mv d d2; test -f d2/e/f/g; rm -r d2; test ! -e d2");
  const log = sh(
    mnt,
    "git init -q repo; cd repo; echo one > a; mkdir sub; echo two > sub/b; git add -A; git commit -qm first; " +
      "echo three >> a; git commit -qam second; git status --porcelain; git log --format=%s; git fsck --no-progress >/dev/null",
  );
  assert.equal(log, "second\nfirst\n");
  // A venv (symlinks, copies, chmod +x, then executing from the mount), byte-compiling, a C build.
  assert.equal(sh(mnt, "python3 -m venv --without-pip venv; venv/bin/python -c 'print(6*7)'"), "42\n");
  sh(
    mnt,
    "echo 'X = 1' > py/mod.py; python3 -m compileall -q py >/dev/null; test -n \"$(find py -name '*.pyc')\"",
  );
  assert.equal(sh(mnt, "printf 'int main(void){return 42;}' > m.c; cc -o m m.c; ./m || echo $?"), "42\n");
}

/** A small source tree on the host: files, a symlink, an empty dir, modes. */
function makeSource(dir: string): void {
  mkdirSync(join(dir, "s", "empty"), { recursive: true });
  writeFileSync(join(dir, "s", "script.sh"), "#!/bin/sh\necho hi\n", { mode: 0o755 });
  writeFileSync(join(dir, "s", "data.bin"), Buffer.alloc(70000, 7));
  execFileSync("ln", ["-s", "script.sh", join(dir, "s", "link")]);
}

/** Every path under dir with its type, size, mode, mtime and content hash (to prove it unchanged). */
function snapshot(dir: string): string {
  return execFileSync(
    "sh",
    ["-c", "find . -printf '%p %y %s %m %T@\\n' | sort; find . -type f -exec md5sum {} + | sort"],
    {
      cwd: dir,
      encoding: "utf8",
    },
  );
}

describe("vfs on the host kernel (/dev/fuse)", { skip: !canMount && "needs root and /dev/fuse" }, () => {
  const src = join(work, "src");
  mkdirSync(src, { recursive: true });
  makeSource(src);

  test("memory provider: git, tar, cp -a, python3, coreutils, attr", async () => {
    await withMount({ kind: "memory" }, (mnt) => toolSuite(mnt, join(src, "s")));
  });

  test("host_fs: the same tools; every change is on the host folder", async () => {
    const host = join(work, "host");
    mkdirSync(host);
    writeFileSync(join(host, "existing"), "from host");
    await withMount({ kind: "host_fs", root: host }, (mnt) => {
      assert.equal(sh(mnt, "cat existing"), "from host");
      toolSuite(mnt, join(src, "s"));
      sh(mnt, "echo changed > existing");
      // Many requests in flight at once: parallel readers and writers.
      sh(mnt, "mkdir par; for i in $(seq 1 200); do echo $i > par/$i; done");
      assert.equal(
        sh(mnt, "ls par | xargs -P 8 -n 5 -I{} sh -c 'cat par/{}; echo x >> par/{}' | wc -l").trim(),
        "200",
      );
      assert.equal(sh(mnt, "cat par/* | wc -l").trim(), "400");
    });
    assert.equal(readFileSync(join(host, "existing"), "utf8"), "changed\n");
    assert.equal(readFileSync(join(host, "f"), "utf8"), "a\nz\n");
    assert.equal(statSync(join(host, "f")).nlink, 2);
    assert.ok(lstatSync(join(host, "l")).isSymbolicLink());
    assert.equal(
      execFileSync("git", ["-C", join(host, "repo"), "log", "--format=%s"], { encoding: "utf8" }),
      "second\nfirst\n",
    );
    assert.equal(
      execFileSync("getfattr", ["--only-values", "-n", "user.k", join(host, "f")], { encoding: "utf8" }),
      "val",
    );
  });

  test("overlay: the same tools; the host copy is unchanged, the upper dir holds the changes", async () => {
    const lower = join(work, "lower");
    const upper = join(work, "upper");
    mkdirSync(upper);
    execFileSync("cp", ["-a", join(src, "s"), lower]);
    writeFileSync(join(lower, "f"), "lower f\n");
    writeFileSync(join(lower, "gone"), "delete me");
    const before = snapshot(lower);
    await withMount({ kind: "overlay", lower, upper }, (mnt) => {
      assert.equal(sh(mnt, "cat f; cat data.bin | wc -c"), "lower f\n70000\n");
      sh(mnt, "rm f gone; rm -r empty; echo new > script.sh");
      toolSuite(mnt, join(src, "s"));
      assert.equal(
        sh(mnt, "ls -a | sort | tr '\\n' ' '"),
        ". .. abs big copied data.bin f h l link m m.c py repo script.sh venv y ",
      );
      sh(mnt, 'mkdir empty; test -z "$(ls empty)"');
    });
    assert.equal(snapshot(lower), before, "lower untouched");
    assert.equal(readFileSync(join(upper, "script.sh"), "utf8"), "new\n");
    assert.ok(existsSync(join(upper, ".wh.gone")));
    assert.ok(existsSync(join(upper, "repo", ".git")));
    assert.ok(!existsSync(join(upper, "data.bin")), "never written: never copied up");
  });

  test("npm install (offline, local tarballs) on overlay: node_modules lands in upper", {
    skip: !hasNpm && "no npm",
  }, async () => {
    const dir = join(work, "npm");
    const lower = join(dir, "lower");
    const upper = join(dir, "upper");
    mkdirSync(lower, { recursive: true });
    mkdirSync(upper);
    const repo = join(import.meta.dirname, "..", "..");
    sh(dir, `npm pack --silent ${repo}/node_modules/commander ${repo}/node_modules/valibot >/dev/null`);
    writeFileSync(join(lower, "package.json"), '{"name":"p","version":"1.0.0"}\n');
    await withMount({ kind: "overlay", lower, upper }, (mnt) => {
      sh(mnt, `npm install --offline --no-audit --no-fund --loglevel=error ${dir}/*.tgz >/dev/null 2>&1`);
      assert.equal(sh(mnt, 'node -e \'require("commander"); require("valibot"); console.log(1)\''), "1\n");
      sh(
        mnt,
        "npm uninstall --offline --loglevel=error commander >/dev/null 2>&1; test ! -e node_modules/commander",
      );
    });
    assert.deepEqual(readdirSync(lower), ["package.json"]);
    assert.ok(existsSync(join(upper, "node_modules", "valibot", "package.json")));
  });

  test("read-only: reads work, every change is EROFS", async () => {
    const ro = join(work, "ro");
    execFileSync("cp", ["-a", join(src, "s"), ro]);
    const before = snapshot(ro);
    await withMount({ kind: "host_fs", root: ro, readonly: true }, (mnt) => {
      assert.equal(sh(mnt, "./script.sh; readlink link"), "hi\nscript.sh\n");
      for (const cmd of [
        "echo x > new",
        "echo x >> script.sh",
        "rm script.sh",
        "mkdir d",
        "touch script.sh",
        "chmod 600 script.sh",
        "mv link l2",
        "ln -s a b",
        "setfattr -n user.a -v 1 script.sh",
      ]) {
        assert.match(shFails(mnt, cmd), /Read-only file system/, cmd);
      }
    });
    assert.equal(snapshot(ro), before);
  });

  test("router: a workspace with mounts inside; moves across mounts copy (EXDEV)", async () => {
    const data = join(work, "data");
    mkdirSync(data);
    writeFileSync(join(data, "d"), "data");
    await withMount(
      {
        kind: "router",
        mounts: [
          { guestPath: "/", spec: { kind: "memory" } },
          { guestPath: "/mnt/data", spec: { kind: "host_fs", root: data } },
          { guestPath: "/mnt/ro", spec: { kind: "host_fs", root: join(src, "s"), readonly: true } },
        ],
      },
      (mnt) => {
        assert.equal(sh(mnt, "ls; ls mnt"), "mnt\ndata\nro\n");
        sh(mnt, "echo top > top; mv top mnt/data/top; mv mnt/data/d d; cat d");
        assert.match(shFails(mnt, "rmdir mnt/data"), /busy|Device or resource busy/i);
        assert.match(shFails(mnt, "touch mnt/ro/x"), /Read-only/);
        assert.equal(sh(mnt, "cat mnt/ro/script.sh | head -1"), "#!/bin/sh\n");
        const inodes =
          "import os\nfor d in ['.', 'mnt', 'mnt/data', 'mnt/ro']:\n    for e in os.scandir(d):\n        assert e.inode() == os.lstat(e.path).st_ino, e.path\nprint('ok')";
        assert.equal(sh(mnt, `python3 -c "${inodes}"`), "ok\n");
      },
    );
    assert.deepEqual(readdirSync(data), ["top"]);
  });

  test("workspace wiring (buildWorkspace): single-file mounts, read-only, overlay file, interception", async () => {
    const dir = join(work, "ws");
    mkdirSync(join(dir, "host"), { recursive: true });
    const cfg = join(dir, "host", "config.json");
    const ro = join(dir, "host", "ro.txt");
    const ov = join(dir, "host", "ov.txt");
    writeFileSync(cfg, "{}\n");
    writeFileSync(ro, "ro\n");
    writeFileSync(ov, "ov\n");
    writeFileSync(join(dir, "host", "other"), "not mounted");
    let logOf: ChildMount | undefined;
    await withMount(
      {
        kind: "workspace",
        workspace: "/workspace",
        upperBase: join(dir, "upper"),
        mounts: {
          "/workspace": { type: "memory" },
          "/workspace/config.json": { type: "host_fs", host_path: cfg },
          "/workspace/etc/ro.txt": { type: "host_fs", host_path: ro, readonly: true },
          "/workspace/ov.txt": { type: "overlay", host_path: ov },
        },
        interception: { rules: [{ ops: ["create"], path: "/workspace/*.secret", action: "block" }] },
      },
      (mnt, m) => {
        assert.equal(sh(mnt, "ls; ls etc"), "config.json\netc\nov.txt\nro.txt\n");
        sh(mnt, "echo '{\"a\":1}' > config.json; cat etc/ro.txt; echo more >> ov.txt; touch free.txt");
        assert.match(shFails(mnt, "echo x > etc/ro.txt"), /Read-only/);
        assert.match(shFails(mnt, "touch x.secret"), /Operation not permitted/);
        assert.match(shFails(mnt, "cat config.json/x"), /Not a directory/);
        assert.match(shFails(mnt, "rm config.json"), /busy/i);
        logOf = m;
      },
    );
    assert.match(logOf?.log() ?? "", /blocked by a vfs interception rule: create \/workspace\/x.secret/);
    assert.equal(readFileSync(cfg, "utf8"), '{"a":1}\n');
    assert.equal(readFileSync(ov, "utf8"), "ov\n", "overlay leaves the host file alone");
    assert.equal(readFileSync(join(dir, "upper", "mount-0", "ov.txt"), "utf8"), "ov\nmore\n");
    assert.deepEqual(readdirSync(join(dir, "upper", "mount-0")), ["ov.txt"]);
  });

  test("notifications: a host change behind the guest's back shows after FuseServer.invalidate", async () => {
    const host = join(work, "notify");
    mkdirSync(host);
    writeFileSync(join(host, "f"), "one");
    const mnt = join(work, `mnt${n++}`);
    mkdirSync(mnt);
    // Hour-long cache timeouts: without a notification, the kernel keeps its answers.
    const m = await mountInChild({ kind: "host_fs", root: host }, mnt, {
      entryTimeout: 3600,
      attrTimeout: 3600,
    });
    try {
      assert.equal(sh(mnt, "stat -c %s f; cat f; test ! -e g && echo no-g"), "3\none" + "no-g\n");
      writeFileSync(join(host, "f"), "three!");
      writeFileSync(join(host, "g"), "new");
      assert.equal(sh(mnt, "stat -c %s f; test ! -e g && echo still-no-g"), "3\nstill-no-g\n", "cached");
      await m.invalidate("/f");
      await m.invalidate("/g");
      assert.equal(sh(mnt, "stat -c %s f; cat f; cat g"), "6\nthree!new");
    } finally {
      await m.stop();
    }
  });
});
