import assert from "node:assert/strict";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Client, Sandbox, type SandboxEvent } from "../../src/sdk/index.ts";
import { runCli, tempHome } from "../helpers/cli.ts";

/**
 * Host folders in real VMs (issue #13): `run -v` in its three modes and with a single file, the
 * guest kernel's FUSE mount answered by the host over the "vfs" port; links that point out of a
 * folder never reach the host's files; bad -v values are refused before anything boots; the SDK's
 * mount builders over RPC.
 */

const h = tempHome();
const root = mkdtempSync(join(tmpdir(), "matchlock-folders-"));
const repo = join(root, "repo");
const outside = join(root, "outside");

before(() => {
  mkdirSync(join(repo, "src"), { recursive: true });
  writeFileSync(join(repo, "README"), "from the host\n");
  writeFileSync(join(repo, "src", "main.c"), "int main(void) { return 0; }\n");
  mkdirSync(outside);
  writeFileSync(join(outside, "secret"), "host-only secret\n");
  writeFileSync(join(root, "config.json"), '{"k":1}\n');
  // Links that point out of the folder, as a hostile repository could carry them.
  symlinkSync("../outside", join(repo, "up"));
  symlinkSync(outside, join(repo, "abs"));
});
after(() => {
  rmSync(root, { recursive: true, force: true });
  h.cleanup();
});

/** `matchlock run ARGS -- sh -c SCRIPT` from `root`: exit code and output. */
async function run(args: string[], script: string): Promise<{ code: number | null; out: string }> {
  const r = await runCli(["run", ...args, "--", "sh", "-c", script], {
    env: h.env,
    cwd: root,
    timeoutMs: 240_000,
  });
  return { code: r.code, out: r.stdout.toString() + r.stderr };
}

describe("run -v", () => {
  test("overlay (the default): the guest reads and changes the folder; the host copy stays as it was", async () => {
    const r = await run(
      ["-v", "./repo:repo"],
      "cat /workspace/repo/README; echo changed > /workspace/repo/README; echo new > /workspace/repo/src/new.c; " +
        "rm /workspace/repo/src/main.c; mkdir -p /workspace/repo/a/b; cat /workspace/repo/README; ls /workspace/repo/src; " +
        "stat -c '%a' /workspace/repo",
    );
    assert.equal(r.code, 0, r.out);
    assert.equal(r.out, "from the host\nchanged\nnew.c\n755\n");
    assert.equal(readFileSync(join(repo, "README"), "utf8"), "from the host\n");
    assert.ok(existsSync(join(repo, "src", "main.c")));
    assert.ok(!existsSync(join(repo, "src", "new.c")));
    assert.ok(!existsSync(join(repo, "a")));
  });

  test("host_fs: live both ways; ro: reads, and EROFS on every write", async () => {
    const r = await run(
      ["-v", "./repo:/workspace/live:host_fs", "-v", "./repo:/workspace/ro:ro"],
      "echo from-guest > /workspace/live/guest.txt && mv /workspace/live/guest.txt /workspace/live/moved.txt; " +
        "cat /workspace/ro/moved.txt; echo x > /workspace/ro/nope 2>&1; rm /workspace/ro/README 2>&1; echo done",
    );
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /^from-guest\n/);
    assert.match(r.out, /can't create \/workspace\/ro\/nope: Read-only file system/);
    assert.match(r.out, /Read-only file system/);
    assert.equal(readFileSync(join(repo, "moved.txt"), "utf8"), "from-guest\n");
    assert.ok(existsSync(join(repo, "README")));
    rmSync(join(repo, "moved.txt"));
  });

  test("a single file, and a folder next to it, under one workspace", async () => {
    const r = await run(
      ["--workspace", "/work", "-v", "./config.json:/work/config.json:ro", "-v", "./repo:/work/src/repo"],
      "cat /work/config.json; ls /work; ls /work/src; cat /work/src/repo/README",
    );
    assert.equal(r.code, 0, r.out);
    assert.equal(r.out, '{"k":1}\nconfig.json\nsrc\nrepo\nfrom the host\n');
  });

  test("symlink attacks from inside the guest on a live folder never reach host files outside it", async () => {
    const r = await run(
      ["-v", "./repo:/workspace/live:host_fs"],
      "cd /workspace/live && ln -s / esc && ln -s ../../outside up2 && echo pwn > esc/tmp/pwned-by-guest; " +
        "cat up2/secret 2>&1; mkdir d && ln -s /etc d/l && mv d/l d/etc-link && cat d/etc-link/hostname >/dev/null; " +
        "ln ../config.json hard 2>&1; rm -rf d esc up2; echo done",
    );
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /done\n$/);
    assert.doesNotMatch(r.out, /host-only secret/);
    // The guest wrote through its own link into its own /tmp, never the host's.
    assert.ok(!existsSync("/tmp/pwned-by-guest"));
    assert.equal(readFileSync(join(outside, "secret"), "utf8"), "host-only secret\n");
    assert.deepEqual(
      readdirSync(repo).filter((n) => ["esc", "up2", "d", "hard"].includes(n)),
      [],
    );
  });

  test("a host folder removed while mounted gives errors in the guest, never a hang", async () => {
    const gone = join(root, "gone");
    mkdirSync(gone);
    writeFileSync(join(gone, "f"), "x\n");
    const ml = (args: string[]) => runCli(args, { env: h.env, cwd: root, timeoutMs: 120_000 });
    const started = await ml(["run", "-d", "-v", "./gone:/workspace/g:host_fs", "--", "sleep", "600"]);
    assert.equal(started.code, 0, started.stderr);
    const id = started.stdout.toString().trim();
    try {
      assert.equal((await ml(["exec", id, "--", "cat", "/workspace/g/f"])).stdout.toString(), "x\n");
      rmSync(gone, { recursive: true });
      const t0 = Date.now();
      const r = await ml([
        "exec",
        id,
        "--",
        "sh",
        "-c",
        "sleep 1.5; ls /workspace/g; cat /workspace/g/f; echo new > /workspace/g/n; echo end",
      ]);
      assert.ok(Date.now() - t0 < 60_000, "answered");
      assert.match(r.stdout.toString(), /end\n$/);
      assert.match(r.stderr, /No such file or directory|Stale file handle/);
    } finally {
      await ml(["kill", id]);
    }
  });

  test("links out of the folder lead nowhere on the host, in every mode", async () => {
    for (const mode of ["overlay", "host_fs", "ro"]) {
      const r = await run(
        ["-v", `./repo:/workspace/repo:${mode}`],
        "cat /workspace/repo/up/secret /workspace/repo/abs/secret 2>&1; readlink /workspace/repo/up; echo end",
      );
      assert.equal(r.code, 0, r.out);
      assert.doesNotMatch(r.out, /host-only secret/, mode);
      // The guest resolves links in its own tree: ../outside from the workspace is not the host's folder.
      assert.match(r.out, /\.\.\/outside\nend\n$/, mode);
    }
  });

  test("bad -v values are refused with one line before anything boots", async () => {
    const cases: Array<[string[], RegExp]> = [
      [["-v", "./missing:/workspace/m"], /mount \/workspace\/m: host path .*missing: .*no such file/i],
      [["-v", "./repo:/elsewhere"], /mount \/elsewhere is not inside the workspace \/workspace/],
      [
        ["-v", "./repo:/workspace/r:rw"],
        /invalid -v ".\/repo:\/workspace\/r:rw": expected HOST:GUEST\[:MODE\]/,
      ],
      [["-v", "./repo"], /expected HOST:GUEST/],
      [["--workspace", "/work space", "-v", "./repo:x"], /is not a plain absolute guest path/],
      [["-v", "./repo:r", "-v", "./repo:/workspace/r"], /\/workspace\/r is given twice/],
    ];
    const before = h.vmDirs().length;
    for (const [args, message] of cases) {
      const r = await runCli(["run", ...args, "--", "true"], { env: h.env, cwd: root });
      assert.notEqual(r.code, 0, args.join(" "));
      assert.match(r.stderr, message, args.join(" "));
      assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
    }
    assert.equal(h.vmDirs().length, before);
  });
});

test("the SDK: mountHostDir, mountOverlay and withWorkspace over RPC", async () => {
  const c = new Client({ env: h.env });
  try {
    await c.launch(
      new Sandbox()
        .withWorkspace("/data")
        .mountHostDir("/data/live", repo)
        .mountOverlay("/data/snap", repo)
        .mountMemory("/data/tmp"),
    );
    const r = await c.exec(
      "echo sdk > /data/live/sdk.txt; echo snap > /data/snap/snap.txt; echo mem > /data/tmp/m; cat /data/tmp/m /data/live/README",
    );
    assert.equal(r.exitCode, 0, r.stderr);
    assert.equal(r.stdout, "mem\nfrom the host\n");
    const files = (await c.listFiles("/data/live")).map((f) => f.name);
    assert.ok(files.includes("sdk.txt") && files.includes("README"), files.join(","));
  } finally {
    await c.close();
    await c.remove();
  }
  assert.equal(readFileSync(join(repo, "sdk.txt"), "utf8"), "sdk\n");
  assert.ok(!readdirSync(repo).includes("snap.txt"));
  rmSync(join(repo, "sdk.txt"));
});

test("diff and apply: the guest's overlay changes reviewed, written back, host changes made meanwhile kept", async () => {
  const proj = join(root, "proj");
  mkdirSync(join(proj, "sub"), { recursive: true });
  writeFileSync(join(proj, "a.txt"), "one\ntwo\n");
  writeFileSync(join(proj, "del.txt"), "delete me\n");
  writeFileSync(join(proj, "c.txt"), "base\n");
  writeFileSync(join(proj, "sub", "x.txt"), "x\n");
  symlinkSync("../outside", join(proj, "lnk"));
  const ml = (args: string[]) => runCli(args, { env: h.env, cwd: root, timeoutMs: 240_000 });
  const started = await ml(["run", "-d", "-v", "./proj:proj", "--", "sleep", "3600"]);
  assert.equal(started.code, 0, started.stderr);
  const id = started.stdout.toString().trim();
  try {
    const changed = await ml([
      "exec",
      id,
      "--",
      "sh",
      "-c",
      "cd /workspace/proj && printf 'one\\nTWO\\n' > a.txt && echo new > new.txt && rm del.txt && " +
        "mkdir -p d/e && echo deep > d/e/f.txt && echo guest > c.txt && " +
        // A link replaced by a directory: apply must replace the host's link, never write through it.
        "rm lnk && mkdir lnk && echo pwned > lnk/secret",
    ]);
    assert.equal(changed.code, 0, changed.stderr);
    // The host changes c.txt after the guest did: applying the guest's c.txt would lose it.
    writeFileSync(join(proj, "c.txt"), "host edit\n");

    const names = await ml(["diff", id, "--name-only"]);
    assert.equal(names.code, 0, names.stderr);
    const list = names.stdout.toString();
    for (const want of [
      /^M \/workspace\/proj\/a\.txt$/m,
      /^A \/workspace\/proj\/new\.txt$/m,
      /^D \/workspace\/proj\/del\.txt$/m,
      /^A \/workspace\/proj\/d \(dir\)$/m,
      /^A \/workspace\/proj\/d\/e\/f\.txt$/m,
      /^M \/workspace\/proj\/c\.txt {3}! changed on the host since the guest first changed it$/m,
    ]) {
      assert.match(list, want);
    }
    assert.doesNotMatch(list, /sub\/x\.txt/, "untouched files are not changes");
    const full = (await ml(["diff", id, "--path", "/workspace/proj/a.txt"])).stdout.toString();
    assert.match(full, /^-two$/m);
    assert.match(full, /^\+TWO$/m);

    assert.equal((await ml(["kill", id])).code, 0);
    const applied = await ml(["apply", id]);
    assert.equal(applied.code, 1, "a skipped conflict fails the command");
    assert.match(applied.stdout.toString(), /skipped M .*c\.txt: changed on the host since .*--force/);
    assert.equal(readFileSync(join(proj, "a.txt"), "utf8"), "one\nTWO\n");
    assert.equal(readFileSync(join(proj, "new.txt"), "utf8"), "new\n");
    assert.ok(!existsSync(join(proj, "del.txt")));
    assert.equal(readFileSync(join(proj, "d", "e", "f.txt"), "utf8"), "deep\n");
    assert.equal(readFileSync(join(proj, "c.txt"), "utf8"), "host edit\n");
    assert.equal(readFileSync(join(proj, "lnk", "secret"), "utf8"), "pwned\n");
    assert.equal(
      readFileSync(join(outside, "secret"), "utf8"),
      "host-only secret\n",
      "nothing through the link",
    );
    assert.deepEqual(
      readdirSync(proj).filter((n) => n.startsWith(".matchlock-apply")),
      [],
      "no temporary files left",
    );

    const forced = await ml(["apply", id, "--path", "/workspace/proj/c.txt", "--force"]);
    assert.equal(forced.code, 0, forced.stdout.toString());
    assert.equal(readFileSync(join(proj, "c.txt"), "utf8"), "guest\n");
  } finally {
    await ml(["kill", id]);
    await ml(["rm", id]);
  }
});

test("vfs.interception: a before rule blocks creates with EPERM; file events reach the SDK's onEvent", async () => {
  const events: SandboxEvent[] = [];
  const c = new Client({ env: h.env, onEvent: (e) => events.push(e) });
  try {
    await c.launch(
      new Sandbox().mountHostDir("/workspace/live", repo).withVFSInterception({
        emitEvents: true,
        rules: [
          {
            name: "no-env",
            phase: "before",
            ops: ["create"],
            path: "/workspace/live/*.env",
            action: "block",
          },
        ],
      }),
    );
    const r = await c.exec(
      "echo x > /workspace/live/prod.env; echo status=$?; echo ok > /workspace/live/allowed.txt; cat /workspace/live/allowed.txt",
    );
    assert.match(r.stderr, /prod\.env: Operation not permitted/);
    assert.equal(r.stdout, "status=1\nok\n");
    await new Promise((res) => setTimeout(res, 500));
  } finally {
    await c.close();
    await c.remove();
  }
  assert.ok(!existsSync(join(repo, "prod.env")), "the blocked file never reached the host");
  rmSync(join(repo, "allowed.txt"));
  const files = events.filter((e) => e.type === "file");
  assert.ok(
    files.some((e) => e.file.op === "create" && e.file.path === "/workspace/live/allowed.txt"),
    JSON.stringify(files.slice(0, 5)),
  );
  assert.ok(
    files.some(
      (e) => e.file.op === "write" && e.file.path === "/workspace/live/allowed.txt" && e.file.size === 3,
    ),
  );
  // Creating the file in the workspace view is checked against the rule, and bad rules never boot.
  const bad = new Client({ env: h.env });
  try {
    await assert.rejects(
      bad.launch(
        new Sandbox()
          .mountMemory("/workspace/m")
          .withVFSInterception({ rules: [{ ops: ["explode"], action: "block" }] }),
      ),
      /unknown op "explode"/,
    );
  } finally {
    await bad.close();
  }
});

test("volumes and raw disks: data stays for the next VM, ro is read-only, one writer at a time, bad --disk refused", async () => {
  const ml = (args: string[]) => runCli(args, { env: h.env, cwd: root, timeoutMs: 240_000 });
  assert.equal((await ml(["volume", "create", "cache", "--size", "64"])).code, 0);
  const ls = await ml(["volume", "ls", "--json"]);
  const vols = JSON.parse(ls.stdout.toString()) as Array<{ name: string; size_mb: number }>;
  assert.deepEqual(
    vols.map((v) => [v.name, v.size_mb]),
    [["cache", 64]],
  );
  const first = await run(["--disk", "@cache:/var/cache/app"], "echo kept > /var/cache/app/f");
  assert.equal(first.code, 0, first.out);
  const second = await run(
    ["--disk", "@cache:/var/cache/app:ro"],
    "cat /var/cache/app/f; echo x > /var/cache/app/g 2>&1; echo end",
  );
  assert.match(second.out, /^kept\nend\n/);
  assert.match(second.out, /can't create \/var\/cache\/app\/g: Read-only file system/);

  // A copy has the data; gc and prune never touch volumes.
  assert.equal((await ml(["volume", "cp", "cache", "cache2"])).code, 0);
  assert.equal((await ml(["gc"])).code, 0);
  assert.equal((await ml(["prune"])).code, 0);
  const names = (
    JSON.parse((await ml(["volume", "ls", "--json"])).stdout.toString()) as Array<{ name: string }>
  ).map((v) => v.name);
  assert.deepEqual(names, ["cache", "cache2"]);
  const copied = await run(["--disk", "@cache2:/c:ro"], "cat /c/f");
  assert.equal(copied.out, "kept\n");
  assert.equal((await ml(["volume", "rm", "cache2"])).code, 0);

  // One writer at a time: a running VM has the volume; a second is refused, and so is rm.
  const holder = await ml(["run", "-d", "--disk", "@cache:/data", "--", "sleep", "600"]);
  assert.equal(holder.code, 0, holder.stderr);
  const id = holder.stdout.toString().trim();
  try {
    const both = await run(["--disk", "@cache:/data"], "true");
    assert.notEqual(both.code, 0);
    assert.match(both.out, /Failed to get "write" lock/);
    const rm = await ml(["volume", "rm", "cache"]);
    assert.notEqual(rm.code, 0);
    assert.match(rm.stderr, new RegExp(`volume cache is attached to ${id}`));
  } finally {
    await ml(["kill", id]);
  }
  assert.equal((await ml(["volume", "rm", "cache"])).code, 0);

  for (const [args, message] of [
    [["--disk", "/etc/hostname:/mnt/x"], /disk \/etc\/hostname is not an ext2\/3\/4 image/],
    [["--disk", "@nothere:/mnt/x"], /nothere\.ext4: ENOENT/],
    [["--disk", "./x.ext4"], /invalid --disk ".\/x\.ext4": expected HOST\.ext4:GUEST\[:ro\]/],
    [
      ["-v", "./repo:r", "--disk", "@c:/workspace/d"],
      /disk mount \/workspace\/d overlaps the workspace \/workspace/,
    ],
  ] as const) {
    const r = await ml(["run", ...args, "--", "true"]);
    assert.notEqual(r.code, 0, args.join(" "));
    assert.match(r.stderr, message, args.join(" "));
    assert.doesNotMatch(r.stderr, /\n\s+at /);
  }
});
