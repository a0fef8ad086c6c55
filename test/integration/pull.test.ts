import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { CLI, runCli, tempHome } from "../helpers/cli.ts";
import { busyboxLayer, dockerSave, makeTar } from "../helpers/images.ts";
import { push, requireTools, startRegistry, type TestRegistry } from "../helpers/registry.ts";

/** `matchlock pull` and `run --image` against a real docker-registry on loopback, as a user runs them. */

const h = tempHome();
let reg: TestRegistry;
let digest = "";

before(async () => {
  requireTools();
  reg = await startRegistry();
  const layer2 = await makeTar([{ name: "etc/motd", content: "pulled image\n" }]);
  const archive = await dockerSave({
    layers: [await busyboxLayer(), layer2],
    config: {
      Cmd: ["sh", "-c", "cat /etc/motd; echo $GREETING"],
      Env: ["GREETING=hi-from-registry", "PATH=/bin"],
    },
  });
  const file = join(h.home, "app.tar");
  writeFileSync(file, archive);
  digest = await push(`docker-archive:${file}`, `${reg.host}/team/app:1.2`);
  await push(`docker-archive:${file}`, `${reg.host}/team/app:auto`);
});
after(async () => {
  for (const t of ["team/app:1.2", "team/app:auto", "mine/app:1"])
    await runCli(["image", "rm", `${reg?.host}/${t}`], { env: h.env });
  await runCli(["image", "rm", "mine/app:1"], { env: h.env });
  await runCli(["image", "gc"], { env: h.env });
  await reg?.stop();
  h.cleanup();
});

describe("matchlock pull", () => {
  test("pull by tag prints the image and its manifest digest; run uses it", async () => {
    const r = await runCli(["pull", `${reg.host}/team/app:1.2`, "-t", "mine/app:1"], { env: h.env });
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stdout.toString(),
      new RegExp(`^${reg.host}/team/app:1\\.2 sha256:[0-9a-f]{64} \\(manifest ${digest}`),
    );
    assert.equal(r.stderr, "", "no progress bars when stderr is not a terminal");
    const run = await runCli(["run", "--image", `${reg.host}/team/app:1.2`], { env: h.env });
    assert.equal(run.stdout.toString(), "pulled image\nhi-from-registry\n", run.stderr);
    const tagged = await runCli(["run", "--image", "mine/app:1", "--", "cat", "/etc/motd"], { env: h.env });
    assert.equal(tagged.stdout.toString(), "pulled image\n");
  });

  test("a second pull downloads nothing new", async () => {
    const r = await runCli(["pull", `${reg.host}/team/app:1.2`], { env: h.env });
    assert.match(r.stdout.toString(), /0\.0 MB downloaded/);
  });

  test("run --image of an image not here pulls it first; by digest too", async () => {
    const r = await runCli(["run", "--image", `${reg.host}/team/app:auto`, "--", "cat", "/etc/motd"], {
      env: h.env,
    });
    assert.equal(r.stdout.toString(), "pulled image\n", r.stderr);
    const byDigest = await runCli(["run", "--image", `${reg.host}/team/app@${digest}`, "--", "true"], {
      env: h.env,
    });
    assert.equal(byDigest.code, 0, byDigest.stderr);
    const again = await runCli(["run", "--pull", "--image", `${reg.host}/team/app:auto`, "--", "true"], {
      env: h.env,
    });
    assert.equal(again.code, 0, again.stderr);
  });

  test("on a terminal the pull shows progress bars; on a 0-column terminal it stays quiet", async () => {
    const pull = `'${process.execPath}' '${CLI}' pull ${reg.host}/team/app:1.2`;
    const tty = execFileSync("script", ["-qec", `stty cols 120 rows 40; ${pull}`, "/dev/null"], {
      env: h.env,
    }).toString();
    assert.match(tty, /\d+%/, "a progress bar with a percentage");
    const zero = execFileSync("script", ["-qec", `stty cols 0 rows 0; ${pull}`, "/dev/null"], {
      env: h.env,
    }).toString();
    assert.doesNotMatch(zero, /\d+%/);
    assert.match(zero, /downloaded/);
  });

  test("a tag the registry does not have is one clear error", async () => {
    const r = await runCli(["pull", `${reg.host}/team/app:nope`], { env: h.env });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /not found/);
    assert.doesNotMatch(r.stderr, /^\s+at /m);
  });
});
