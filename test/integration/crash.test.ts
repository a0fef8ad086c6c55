import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import { openState, stateDbPath } from "../../src/state/store.ts";
import { CLI, qemuProcessesMentioning, runCli, tempHome } from "../helpers/cli.ts";
import { CRASH_PHASES, leftovers, listRows } from "../helpers/vms.ts";

/**
 * Crash safety: the owner is SIGKILLed at each lifecycle phase (MATCHLOCK_TEST_CRASH_AT), with the
 * parent-death signal off so its QEMU survives; then `gc` must reclaim every process, disk, socket
 * and subnet row, and `list` must tell the truth. Plus the long-lived VM commands end to end.
 */

const h = tempHome();
after(async () => {
  await runCli(["kill", "--all"], { env: h.env });
  h.cleanup();
});
const cli = (args: string[], extra: NodeJS.ProcessEnv = {}, input?: Buffer | string) =>
  runCli(args, { env: { ...h.env, ...extra }, ...(input === undefined ? {} : { input }) });

describe("SIGKILL of the owner at each phase, then gc", () => {
  for (const [phase, cmd] of CRASH_PHASES) {
    test(`crash at ${phase}: gc reclaims everything and list tells the truth`, async () => {
      const env = { MATCHLOCK_TEST_CRASH_AT: phase, MATCHLOCK_TEST_NO_PDEATHSIG: "1" };
      const r = await cli(["run", "--", ...cmd], env);
      assert.equal(r.signal, "SIGKILL", `the owner should have died at ${phase}: ${r.stderr}`);
      const before = listRows((await cli(["list"])).stdout.toString());
      const ids = [...before.keys()];
      assert.equal(ids.length, 1, `one VM recorded: ${[...before]}`);
      const id = ids[0] as string;
      // A VM whose owner died while it was running shows as crashed, not running.
      assert.notEqual(before.get(id), "running");
      if (phase === "starting" || phase === "running") {
        assert.equal(before.get(id), "crashed");
        assert.ok(qemuProcessesMentioning(join(h.home, "vms", id)).length > 0, "QEMU outlived its owner");
      }

      const gc = await cli(["gc"]);
      assert.equal(gc.code, 0, gc.stdout.toString() + gc.stderr);
      assert.match(gc.stdout.toString(), new RegExp(`${id}\\s+(cleaned|skipped)`));
      assert.deepEqual(leftovers(h.env, id), []);
      const lc = spawnSync(
        "sqlite3",
        [
          stateDbPath(paths(h.env)),
          `select phase from vm_lifecycle where vm_id="${id}" order by version desc limit 1;`,
        ],
        { encoding: "utf8" },
      );
      assert.equal(lc.stdout.trim(), "cleaned");
      const afterGc = listRows((await cli(["list"])).stdout.toString());
      assert.ok(["crashed", "stopped"].includes(afterGc.get(id) ?? ""), `list says ${afterGc.get(id)}`);

      const prune = await cli(["prune"]);
      assert.equal(prune.code, 0, prune.stderr);
      assert.deepEqual([...listRows((await cli(["list"])).stdout.toString()).keys()], []);
      assert.equal(existsSync(join(h.home, "vms", id)), false);
    });
  }

  test("a corrupt scratch file and no pid in the record: gc still finds the QEMU through /proc", async () => {
    const r = await cli(["run", "--", "sleep", "600"], {
      MATCHLOCK_TEST_CRASH_AT: "running",
      MATCHLOCK_TEST_NO_PDEATHSIG: "1",
    });
    assert.equal(r.signal, "SIGKILL");
    const id = [...listRows((await cli(["list"])).stdout.toString()).keys()][0] as string;
    const dir = join(h.home, "vms", id);
    writeFileSync(join(dir, "runtime.json"), "{ this is not json");
    const s = openState(paths(h.env));
    s.db
      .prepare(
        "UPDATE vm_lifecycle SET resources_json = json_remove(resources_json, '$.qemu.pid', '$.qemu.start_time') WHERE vm_id = ?",
      )
      .run(id);
    s.close();
    assert.ok(qemuProcessesMentioning(dir).length > 0);
    const gc = await cli(["gc", id]);
    assert.equal(gc.code, 0, gc.stdout.toString());
    assert.deepEqual(leftovers(h.env, id), []);
    await cli(["rm", id]);
  });
});

describe("long-lived VMs", () => {
  test("run -d, exec (exit code, -i binary stdin, -u, -w), log, kill, rm", async () => {
    const d = await cli(["run", "-d", "--", "sh", "-c", "echo started-detached; sleep 600"]);
    assert.equal(d.code, 0, d.stderr);
    const id = d.stdout.toString().trim();
    assert.match(id, /^vm-[0-9a-f]{8}$/);
    assert.equal(listRows((await cli(["list", "--running"])).stdout.toString()).get(id), "running");

    const e = await cli(["exec", id, "--", "sh", "-c", "echo hi from $(hostname); exit 9"]);
    assert.equal(e.code, 9);
    assert.equal(e.stdout.toString(), `hi from ${id}\n`);
    const data = Buffer.alloc(3 * 1024 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7919) & 0xff;
    const cat = await cli(["exec", "-i", id, "--", "cat"], {}, data);
    assert.equal(cat.code, 0);
    assert.ok(cat.stdout.equals(data), "binary stdin came back intact");
    const who = await cli([
      "exec",
      "-u",
      "user",
      "-w",
      "/home/user/x",
      id,
      "--",
      "sh",
      "-c",
      "id -u; pwd; touch ok",
    ]);
    assert.equal(who.stdout.toString(), "1000\n/home/user/x\n", who.stderr);

    const log = await cli(["log", id]);
    assert.match(log.stdout.toString(), /started-detached/);
    const inspect = JSON.parse((await cli(["inspect", id])).stdout.toString());
    assert.equal(inspect.lifecycle.phase, "running");
    assert.deepEqual(
      inspect.history.map((x: { phase: string }) => x.phase),
      ["creating", "created", "starting", "starting", "running"],
    );

    const json = JSON.parse((await cli(["list", "--json", "--running"])).stdout.toString()) as Array<{
      id: string;
      status: string;
      pid: number;
    }>;
    assert.deepEqual(
      json.filter((v) => v.id === id).map((v) => v.status),
      ["running"],
    );
    const k = await cli(["kill", id]);
    assert.equal(k.code, 0, k.stderr);
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "stopped");
    assert.deepEqual(leftovers(h.env, id), []);
    const rm = await cli(["rm", id]);
    assert.equal(rm.code, 0, rm.stderr);
    assert.equal(listRows((await cli(["list"])).stdout.toString()).has(id), false);
    assert.equal(existsSync(join(h.home, "vms", id)), false);
  });

  test("an exec client that goes away cancels its command in the guest", async () => {
    const id = (await cli(["run", "-d"])).stdout.toString().trim();
    const client = spawn(process.execPath, [CLI, "exec", id, "--", "sleep", "4242"], {
      env: h.env,
      stdio: "ignore",
    });
    const ps = async () =>
      (await cli(["exec", id, "--", "sh", "-c", "ps -o args | grep -c '^sleep 4242' || true"])).stdout
        .toString()
        .trim();
    for (let i = 0; i < 100 && (await ps()) !== "1"; i++) await new Promise((r) => setTimeout(r, 100));
    assert.equal(await ps(), "1");
    client.kill("SIGKILL");
    let left = "1";
    for (let i = 0; i < 100 && left !== "0"; i++) {
      await new Promise((r) => setTimeout(r, 100));
      left = await ps();
    }
    assert.equal(left, "0", "the command outlived its client");
    await cli(["kill", id]);
    await cli(["rm", id]);
  });

  test("rm refuses a running VM; kill --all, rm --stopped and prune leave nothing", async () => {
    const a = (await cli(["run", "-d"])).stdout.toString().trim();
    const b = (await cli(["run", "-d"])).stdout.toString().trim();
    const refused = await cli(["rm", a]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /is running/);
    assert.equal((await cli(["kill", "--all"])).code, 0);
    const rows = listRows((await cli(["list"])).stdout.toString());
    assert.equal(rows.get(a), "stopped");
    assert.equal(rows.get(b), "stopped");
    assert.equal((await cli(["rm", "--stopped"])).code, 0);
    assert.deepEqual([...listRows((await cli(["list"])).stdout.toString()).keys()], []);
    assert.deepEqual(h.vmDirs(), []);
    assert.deepEqual(qemuProcessesMentioning(h.home), []);
  });

  test("run --rm=false keeps the VM until SIGTERM, then it is listed as stopped", async () => {
    const owner = spawn(process.execPath, [CLI, "run", "--rm=false", "--", "echo", "once"], {
      env: h.env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let err = "";
    owner.stderr.on("data", (d: Buffer) => (err += d.toString()));
    while (!/is running/.test(err)) await new Promise((r) => setTimeout(r, 100));
    const id = /VM (vm-[0-9a-f]{8})/.exec(err)?.[1] as string;
    assert.match(err, new RegExp(`matchlock exec ${id}`));
    assert.equal((await cli(["exec", id, "--", "echo", "still-here"])).stdout.toString(), "still-here\n");
    owner.kill("SIGTERM");
    await new Promise((r) => owner.on("close", r));
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "stopped");
    await cli(["rm", id]);
  });

  test("gc skips a running VM, and reclaims it with --force-running", async () => {
    const id = (await cli(["run", "-d", "--", "sleep", "600"])).stdout.toString().trim();
    const skipped = await cli(["gc", id]);
    assert.match(skipped.stdout.toString(), new RegExp(`${id}\\s+skipped\\s+running`));
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "running");
    const forced = await cli(["gc", "--force-running", id]);
    assert.equal(forced.code, 0, forced.stdout.toString());
    assert.notEqual(listRows((await cli(["list"])).stdout.toString()).get(id), "running");
    assert.deepEqual(leftovers(h.env, id), []);
    assert.equal((await cli(["rm", id])).code, 0);
  });

  test("exec into a VM that does not exist is one clear error", async () => {
    const r = await cli(["exec", "vm-deadbeef", "--", "true"]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /vm-deadbeef is not running/);
  });
});
