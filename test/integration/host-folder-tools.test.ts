import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  cpSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { runCli, tempHome } from "../helpers/cli.ts";
import { DEBIAN_TOOL_PACKAGES, importDebianImage } from "../helpers/debian.ts";

/**
 * Real developer tools in host folders, in a real VM (issue #13): git, pip and a C toolchain run by
 * the guest's non-root user in a live (host_fs) folder, whose results the host then checks with its
 * own tools, and in an overlay folder, which the host must find exactly as it was. One VM, no
 * network, from the Debian image with git, gcc, make and pip (test/helpers/debian.ts
 * DEBIAN_TOOL_PACKAGES; its rootfs tar, ~500 MB, is cached in ~/.cache/matchlock-test: ~2–3 min to build once).
 */

const TAG = `mltest-tools-${process.pid}:12`;
/** The image's user `tester`: the host folders belong to it, as a user's folders belong to them. */
const TESTER = 1001;
const FILES = 2000;

const h = tempHome();
const root = mkdtempSync(join(tmpdir(), "matchlock-tools-"));
const live = join(root, "live");
const snap = join(root, "snap");
let vm = "";

/** The host's git on a folder the guest's user owns (safe.directory: the owner differs from root). */
function hostGit(dir: string, ...args: string[]): string {
  return execFileSync("git", ["-c", "safe.directory=*", "-C", dir, ...args], {
    encoding: "utf8",
    env: { ...process.env, GIT_AUTHOR_NAME: "Host", GIT_AUTHOR_EMAIL: "host@example.test" },
  });
}

/** A shell script as the image's user in the VM: exit code, stdout, stderr. */
async function sh(script: string): Promise<{ code: number | null; out: string; err: string }> {
  const r = await runCli(["exec", vm, "--", "sh", "-c", `set -e; ${script}`], {
    env: h.env,
    timeoutMs: 300_000,
  });
  return { code: r.code, out: r.stdout.toString(), err: r.stderr };
}

/** FILES small files in 40 directories: a source tree of a realistic size. */
function writeTree(dir: string): void {
  for (let i = 0; i < FILES; i++) {
    const sub = join(dir, `d${String(i % 40).padStart(2, "0")}`);
    mkdirSync(sub, { recursive: true });
    writeFileSync(join(sub, `f${i}.txt`), `file ${i}\n`);
  }
}

const C_SOURCES: Record<string, string> = {
  "greet.h":
    "#ifndef GREET_H\n#define GREET_H\nint add(int a, int b);\nconst char *greeting(void);\n#endif\n",
  "greet.c":
    '#include "greet.h"\nint add(int a, int b) { return a + b; }\nconst char *greeting(void) { return "built in a mount"; }\n',
  "main.c":
    '#include <stdio.h>\n#include "greet.h"\nint main(void) { printf("%s: 3 + 4 = %d\\n", greeting(), add(3, 4)); return 0; }\n',
  // Recipes need tabs.
  Makefile:
    "app: main.o greet.o\n\tcc -o $@ main.o greet.o\nmain.o: main.c greet.h\n\tcc -O1 -Wall -c main.c\ngreet.o: greet.c greet.h\n\tcc -O1 -Wall -c greet.c\n",
};

const PY_PACKAGE: Record<string, string> = {
  "pyproject.toml":
    '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n' +
    '[project]\nname = "hello-pkg"\nversion = "0.1"\n\n[project.scripts]\nhello-cli = "hello:main"\n\n' +
    '[tool.setuptools]\npy-modules = ["hello"]\n',
  "hello.py":
    'def greet():\n    return "hello from an installed package"\n\ndef main():\n    print(greet())\n',
};

function writeFiles(dir: string, files: Record<string, string>): void {
  mkdirSync(dir, { recursive: true });
  for (const [name, content] of Object.entries(files)) writeFileSync(join(dir, name), content);
}

function chownTree(dir: string, uid: number): void {
  lchownSync(dir, uid, uid);
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) chownTree(p, uid);
    else lchownSync(p, uid, uid);
  }
}

/** Every entry under dir with its type, mode, owner, size, mtime and content: "untouched" is equality. */
function snapshot(dir: string): string {
  const hash = createHash("sha256");
  const walk = (d: string) => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      const s = lstatSync(p, { bigint: true });
      hash.update(`${p}\0${s.mode}\0${s.uid}\0${s.size}\0${s.mtimeNs}\0${s.ino}\0`);
      if (s.isSymbolicLink()) hash.update(readlinkSync(p));
      else if (s.isFile()) hash.update(readFileSync(p));
      else if (s.isDirectory()) walk(p);
    }
  };
  walk(dir);
  return hash.digest("hex");
}

let snapBefore = "";

before(async () => {
  // live: a plain tree (the guest makes it a repository), a Python package and a C project.
  writeTree(join(live, "repo"));
  writeFiles(join(live, "py", "hello_pkg"), PY_PACKAGE);
  writeFiles(join(live, "c"), C_SOURCES);
  chownTree(live, TESTER);
  // snap: the user's repository with one commit made on the host, and a C project, seen as overlays.
  writeTree(join(snap, "repo"));
  hostGit(join(snap, "repo"), "init", "-q", "-b", "main");
  hostGit(join(snap, "repo"), "add", "-A");
  hostGit(
    join(snap, "repo"),
    "-c",
    "user.name=Host",
    "-c",
    "user.email=host@example.test",
    "commit",
    "-qm",
    "from the host",
  );
  cpSync(join(live, "c"), join(snap, "c"), { recursive: true });
  chownTree(snap, TESTER);
  snapBefore = snapshot(snap);

  await importDebianImage(h.env, TAG, { packages: DEBIAN_TOOL_PACKAGES });
  const r = await runCli(
    [
      "run",
      "-d",
      "--image",
      TAG,
      "--no-network",
      "--memory",
      "1024",
      "-v",
      `${live}:/workspace/live:host_fs`,
      "-v",
      `${snap}:/workspace/snap:overlay`,
      "--",
      "sleep",
      "3600",
    ],
    { env: h.env, timeoutMs: 240_000 },
  );
  assert.equal(r.code, 0, r.stderr);
  vm = r.stdout.toString().trim();
  const git = await sh(
    "git config --global user.name Tester; git config --global user.email tester@example.test",
  );
  assert.equal(git.code, 0, git.err);
});

after(async () => {
  if (vm) await runCli(["kill", vm], { env: h.env });
  if (vm) await runCli(["rm", vm], { env: h.env });
  await runCli(["image", "rm", TAG], { env: h.env });
  await runCli(["image", "gc"], { env: h.env });
  rmSync(root, { recursive: true, force: true });
  h.cleanup();
});

describe("in a live (host_fs) folder", () => {
  test(`git init, add, commit and status on ${FILES} files; the host's git sees the same commit`, async () => {
    const r = await sh(
      "cd /workspace/live/repo; git init -q -b main; git add -A; git commit -qm 'from the guest'; " +
        "git status --porcelain | wc -l; echo edited >> d07/f7.txt; git status --porcelain; " +
        "git ls-files | wc -l; git rev-parse HEAD",
    );
    assert.equal(r.code, 0, r.err);
    const [clean, modified, count, head] = r.out.trim().split("\n");
    assert.equal(clean, "0", "clean right after the commit");
    assert.equal(modified, " M d07/f7.txt");
    assert.equal(count, String(FILES));
    assert.match(head ?? "", /^[0-9a-f]{40}$/);

    const repo = join(live, "repo");
    assert.equal(hostGit(repo, "log", "--format=%H %an %s"), `${head} Tester from the guest\n`);
    assert.equal(hostGit(repo, "ls-files").trim().split("\n").length, FILES);
    assert.equal(hostGit(repo, "status", "--porcelain"), " M d07/f7.txt\n");
    assert.equal(hostGit(repo, "show", "HEAD:d07/f7.txt"), "file 7\n");
    hostGit(repo, "fsck", "--strict", "--no-progress"); // throws on a damaged object
    assert.equal(statSync(join(repo, ".git", "HEAD")).uid, TESTER, "new files belong to the guest's user");
  });

  test("pip installs a local package into a venv in the folder, offline; the host has the files", async () => {
    const r = await sh(
      // The image's pip, setuptools and wheel serve the venv (--system-site-packages): ensurepip
      // would install pip into the folder first, a minute and a half of TCG for nothing tested here.
      "cd /workspace/live/py; python3 -m venv --without-pip --system-site-packages .venv; " +
        ".venv/bin/python -m pip install -q --disable-pip-version-check --no-index --no-build-isolation ./hello_pkg; " +
        ".venv/bin/hello-cli; .venv/bin/python -c 'import hello; print(hello.__file__)'; " +
        ".venv/bin/python -m pip show hello-pkg | grep ^Version",
    );
    assert.equal(r.code, 0, r.err);
    assert.equal(
      r.out,
      "hello from an installed package\n/workspace/live/py/.venv/lib/python3.11/site-packages/hello.py\nVersion: 0.1\n",
    );
    const site = join(live, "py", ".venv", "lib", "python3.11", "site-packages");
    assert.equal(readFileSync(join(site, "hello.py"), "utf8"), PY_PACKAGE["hello.py"]);
    assert.ok(readdirSync(site).includes("hello_pkg-0.1.dist-info"), readdirSync(site).join(" "));
    const script = readFileSync(join(live, "py", ".venv", "bin", "hello-cli"), "utf8");
    assert.match(script, /^#!\/workspace\/live\/py\/\.venv\/bin\/python3?\n/);
    assert.equal(readlinkSync(join(live, "py", ".venv", "bin", "python3")), "/usr/bin/python3");
  });

  test("make and gcc build a program from two files and a header; it runs; make sees what changed", async () => {
    const r = await sh(
      "cd /workspace/live/c; make -s; ./app; make -q && echo up-to-date; " +
        "touch greet.h; make -q || echo stale; make -s; ./app; make -q && echo up-to-date",
    );
    assert.equal(r.code, 0, r.err);
    assert.equal(
      r.out,
      "built in a mount: 3 + 4 = 7\nup-to-date\nstale\nbuilt in a mount: 3 + 4 = 7\nup-to-date\n",
    );
    const app = join(live, "c", "app");
    assert.deepEqual(readFileSync(app).subarray(0, 4), Buffer.from("\x7fELF", "latin1"));
    assert.equal(statSync(app).mode & 0o111, 0o111, "executable");
    for (const o of ["main.o", "greet.o"]) assert.ok(statSync(join(live, "c", o)).size > 0, o);
  });
});

describe("in an overlay folder", () => {
  test("git status, commit and a build in the guest; the host folder stays exactly as it was", async () => {
    const r = await sh(
      "cd /workspace/snap/repo; git status --porcelain | wc -l; git log --format=%s; " +
        "echo guest >> d01/f1.txt; rm d02/f2.txt; echo new > added.txt; git add -A; " +
        "git commit -qm 'guest commit in the overlay'; git log --format=%s; git status --porcelain | wc -l; " +
        "cd ../c; make -s; ./app",
    );
    assert.equal(r.code, 0, r.err);
    assert.equal(
      r.out,
      "0\nfrom the host\nguest commit in the overlay\nfrom the host\n0\nbuilt in a mount: 3 + 4 = 7\n",
    );
    assert.equal(snapshot(snap), snapBefore, "not one file, mode, time or inode changed on the host");
    assert.equal(hostGit(join(snap, "repo"), "log", "--format=%s"), "from the host\n");
    assert.equal(hostGit(join(snap, "repo"), "status", "--porcelain"), "");
  });
});
