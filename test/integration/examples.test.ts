import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { REPO, tempHome } from "../helpers/cli.ts";

/** The examples under examples/ run as documented (they import the built package, "matchlock"). */

const h = tempHome();
const session = `matchlock-example-${process.pid}`;
after(() => {
  spawnSync("tmux", ["kill-session", "-t", session]);
  h.cleanup();
});

function runExample(name: string): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [join(REPO, "examples", name)], { env: h.env, cwd: REPO });
    let out = "";
    c.stdout.on("data", (d: Buffer) => (out += d.toString()));
    c.stderr.on("data", (d: Buffer) => (out += d.toString()));
    c.on("close", (code) => resolve({ code, out }));
  });
}

describe("examples", () => {
  test("code-interpreter runs its cells and reports each exit code", async () => {
    const r = await runExample("code-interpreter.ts");
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /--- cell 0 \(exit 0/);
    assert.match(r.out, /sum: 5050/);
    assert.match(r.out, /--- cell 2 \(exit 1/);
    assert.match(r.out, /Linux x86_64\nuser/);
    assert.deepEqual(h.vmDirs(), []);
  });

  test("stream-build streams each step and exits with the build's code", async () => {
    const r = await runExample("stream-build.ts");
    assert.equal(r.code, 0, r.out);
    // stderr interleaves with stdout, so check the steps' order on the stdout lines alone.
    const steps = r.out.split("\n").filter((l) => l.startsWith("==>") || l === "build OK");
    assert.deepEqual(steps, [
      "==> fetch",
      "==> configure",
      "==> compile",
      "==> link",
      "==> test",
      "build OK",
    ]);
    assert.match(r.out, /warning: this build is a demo/);
    assert.match(r.out, /build exited with 0/);
  });

  test("interactive-shell gives a shell on this terminal", async () => {
    const rc = join(h.home, "example-rc");
    const env = `MATCHLOCK_HOME='${h.home}' PATH='${process.env.PATH ?? ""}'`;
    const cmd = `cd '${REPO}' && env ${env} '${process.execPath}' examples/interactive-shell.ts; echo "rc=$?" > '${rc}'`;
    execFileSync("tmux", ["new-session", "-d", "-s", session, "-x", "90", "-y", "25", cmd]);
    execFileSync("tmux", [
      "send-keys",
      "-t",
      session,
      "echo $(hostname)-$((2+3)); stty size; exit 4",
      "Enter",
    ]);
    const end = Date.now() + 60_000;
    while (!existsSync(rc) && Date.now() < end) await new Promise((r) => setTimeout(r, 200));
    assert.equal(readFileSync(rc, "utf8").trim(), "rc=4");
  });
});
