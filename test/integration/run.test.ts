import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { qemuProcessesMentioning, runCli, tempHome } from "../helpers/cli.ts";

/** `matchlock run` as a user runs it: the built CLI booting real micro-VMs (TCG here). */

const h = tempHome();
after(() => h.cleanup());
const run = (args: string[], input?: Buffer | string) =>
  runCli(["run", ...args], { env: h.env, ...(input === undefined ? {} : { input }) });

function sha256(b: Buffer | string): string {
  return createHash("sha256").update(b).digest("hex");
}

describe("matchlock run", () => {
  test("echo hello prints hello from inside the VM and exits 0", async () => {
    const r = await run(["--", "echo", "hello"]);
    assert.equal(r.stderr, "");
    assert.equal(r.stdout.toString(), "hello\n");
    assert.equal(r.code, 0);
  });

  test("the guest command's exit code is run's exit code (0, 1, 7, 137 when killed)", async () => {
    for (const [script, code] of [
      ["exit 0", 0],
      ["exit 1", 1],
      ["exit 7", 7],
      ["kill -9 $$", 137],
    ] as const) {
      const r = await run(["--", "sh", "-c", script]);
      assert.equal(r.code, code, `${script}: ${r.stderr}`);
    }
  });

  test("stdout and stderr stay apart", async () => {
    const r = await run(["--", "sh", "-c", "echo out; echo err >&2; echo out2"]);
    assert.equal(r.stdout.toString(), "out\nout2\n");
    assert.equal(r.stderr, "err\n");
  });

  test("10 MiB of binary stdin comes back through cat intact", async () => {
    const data = randomBytes(10 * 1024 * 1024);
    const r = await run(["-i", "--", "cat"], data);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.length, data.length);
    assert.equal(sha256(r.stdout), sha256(data));
  });

  test("10 MiB of binary output made in the guest arrives intact", async () => {
    const r = await run([
      "--",
      "sh",
      "-c",
      "head -c 10485760 /dev/urandom > /tmp/blob && sha256sum /tmp/blob | cut -d' ' -f1 >&2 && cat /tmp/blob",
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.length, 10 * 1024 * 1024);
    assert.equal(sha256(r.stdout), r.stderr.trim());
  });

  test("echo abc | run -i cat prints abc; stdin EOF reaches the guest", async () => {
    const r = await run(["-i", "--", "cat"], "abc\n");
    assert.equal(r.stdout.toString(), "abc\n");
    assert.equal(r.code, 0);
  });

  test("-e, --env-file, -w and -u apply (bar /tmp 1000)", async () => {
    const envFile = join(h.home, "vars.env");
    writeFileSync(envFile, "# comment\nFROMFILE=filevalue\nFOO=overridden-by-e\n\n");
    const r = await runCli(
      [
        "run",
        "--env-file",
        envFile,
        "-e",
        "FOO=bar",
        "-e",
        "HOSTVAR",
        "-w",
        "/tmp",
        "-u",
        "1000:1000",
        "--",
        "sh",
        "-c",
        "echo $FOO $(pwd) $(id -u); echo $FROMFILE $HOSTVAR; id -g",
      ],
      { env: { ...h.env, HOSTVAR: "from-host" } },
    );
    assert.equal(r.stdout.toString(), "bar /tmp 1000\nfilevalue from-host\n1000\n", r.stderr);
  });

  test("a bare -e KEY that the host does not have is a clear error", async () => {
    const env = { ...h.env };
    delete env.MATCHLOCK_SURELY_UNSET;
    const r = await runCli(["run", "-e", "MATCHLOCK_SURELY_UNSET", "--", "true"], { env });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /MATCHLOCK_SURELY_UNSET is not set on the host/);
    assert.doesNotMatch(r.stderr, /at .*\.js:\d+/); // no stack trace
  });

  test("-u by name takes uid, gid and HOME from the image's /etc/passwd", async () => {
    const r = await run(["-u", "user", "--", "sh", "-c", 'echo "$(id -un) $(id -u):$(id -g) $HOME"']);
    assert.equal(r.stdout.toString(), "user 1000:1000 /home/user\n", r.stderr);
    const nobody = await run(["-u", "nobody", "--", "id", "-u"]);
    assert.equal(nobody.stdout.toString(), "65534\n");
  });

  test("an unknown user name fails with a message naming it", async () => {
    const r = await run(["-u", "nosuchuser", "--", "true"]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /nosuchuser/);
  });

  test("-w creates a missing working directory", async () => {
    const r = await run(["-w", "/work/deep/dir", "--", "pwd"]);
    assert.equal(r.stdout.toString(), "/work/deep/dir\n", r.stderr);
  });

  test("--entrypoint overrides the image's entrypoint; the image's Cmd runs by default", async () => {
    const ep = await run(["--entrypoint", "/bin/echo", "--", "via", "entrypoint"]);
    assert.equal(ep.stdout.toString(), "via entrypoint\n");
    // The default image's Cmd is /bin/sh: with no command it reads the script from stdin.
    const dflt = await run(["-i"], "echo from-default-cmd\n");
    assert.equal(dflt.stdout.toString(), "from-default-cmd\n", dflt.stderr);
    const cleared = await run(["--entrypoint", "", "--", "echo", "cleared"]);
    assert.equal(cleared.stdout.toString(), "cleared\n");
  });

  test("a missing command exits 127 with a message", async () => {
    const r = await run(["--", "no-such-command-xyz"]);
    assert.equal(r.code, 127);
    assert.match(r.stderr, /no-such-command-xyz/);
  });

  test("--hostname, --cpus, --memory and --disk-size shape the VM", async () => {
    const r = await run([
      "--hostname",
      "box1",
      "--cpus",
      "2",
      "--memory",
      "300",
      "--disk-size",
      "1024",
      "--",
      "sh",
      "-c",
      "hostname; nproc; free -m | awk '/Mem:/{print ($2 > 200 && $2 <= 300)}'; df -m / | awk 'NR==2{print ($2 > 900 && $2 <= 1024)}'",
    ]);
    assert.equal(r.stdout.toString(), "box1\n2\n1\n1\n", r.stderr);
  });

  test("the guest root is writable and the writes die with the VM", async () => {
    const a = await run(["--", "sh", "-c", "echo data > /etc/marker && cat /etc/marker"]);
    assert.equal(a.stdout.toString(), "data\n");
    const b = await run(["--", "sh", "-c", "test -e /etc/marker && echo present || echo absent"]);
    assert.equal(b.stdout.toString(), "absent\n");
  });

  test("bad flags get one clear error and exit 1", async () => {
    for (const args of [
      ["--cpus", "zero"],
      ["--memory", "-5"],
      ["--image", "no/such:image"],
      ["-u", "bad user"],
    ]) {
      const r = await run([...args, "--", "true"]);
      assert.equal(r.code, 1, `${args.join(" ")}: ${r.stderr}`);
      assert.ok(r.stderr.trim().length > 0);
      assert.doesNotMatch(r.stderr, /^\s+at /m, "no stack trace");
    }
  });

  test("--timeout stops a command that runs too long", async () => {
    const r = await run(["--timeout", "2", "--", "sleep", "600"]);
    assert.equal(r.code, 143); // SIGTERM
    assert.match(r.stderr, /timeout/);
    assert.ok(r.ms < 60_000);
  });

  test("after every run above, no VM dir and no QEMU process is left", () => {
    assert.deepEqual(h.vmDirs(), []);
    assert.deepEqual(qemuProcessesMentioning(h.home), []);
  });
});
