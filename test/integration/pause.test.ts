import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { Client, RPCError, Sandbox } from "../../src/sdk/index.ts";
import { qemuProcessesMentioning, runCli, tempHome } from "../helpers/cli.ts";
import { leftovers, listRows } from "../helpers/vms.ts";

/**
 * `matchlock pause` / `resume` on real VMs: a paused VM burns no CPU and runs nothing, is listed as
 * paused (never stopped, crashed or removable), refuses guest operations with one clear error, and
 * after the resume its command goes on exactly where it stopped. Stopping a paused VM works, and so
 * does `gc` after its owner is killed while it is paused.
 */

const h = tempHome();
after(async () => {
  await runCli(["kill", "--all"], { env: h.env });
  h.cleanup();
});
const cli = (args: string[], extra: NodeJS.ProcessEnv = {}, timeoutMs?: number) =>
  runCli(args, { env: { ...h.env, ...extra }, ...(timeoutMs === undefined ? {} : { timeoutMs }) });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** CPU time (user + system, in clock ticks) QEMU has used so far: fields 14 and 15 of /proc/PID/stat. */
function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

/** The numbers the counter printed so far, from the detached run's log. */
function counter(id: string): number[] {
  let text = "";
  try {
    text = readFileSync(join(h.home, "vms", id, "run.log"), "utf8");
  } catch {}
  return text
    .split("\n")
    .filter((l) => /^\d+$/.test(l))
    .map(Number);
}

async function waitFor(what: string, ok: () => boolean | Promise<boolean>, ms = 60_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

const COUNTER = ["sh", "-c", "i=0; while true; do echo $i; i=$((i+1)); sleep 0.2; done"];

describe("pause and resume through the CLI", () => {
  test("a paused VM uses no CPU, runs nothing, is listed paused; resumed, its command goes on with nothing lost", async () => {
    const d = await cli(["run", "-d", "--no-network", "--", ...COUNTER]);
    assert.equal(d.code, 0, d.stderr);
    const id = d.stdout.toString().trim();
    const [qemu] = qemuProcessesMentioning(join(h.home, "vms", id));
    assert.ok(qemu, "QEMU runs");
    await waitFor("the counter to reach 5", () => counter(id).length >= 5);

    const p = await cli(["pause", id]);
    assert.equal(p.code, 0, p.stderr);
    assert.equal(p.stdout.toString(), `${id}\n`);
    assert.equal(p.stderr, "");
    const atPause = counter(id).length;
    const cpu0 = cpuTicks(qemu);
    await sleep(2000);
    const cpuPaused = cpuTicks(qemu) - cpu0;
    // 100 ticks a second: at most 3 (30 ms of CPU in 2 s) for QEMU's idle main loop; the guest's
    // busy counter alone costs TCG far more than that.
    assert.ok(cpuPaused <= 3, `QEMU used ${cpuPaused} ticks of CPU in 2 s while paused`);
    assert.equal(counter(id).length, atPause, "the guest printed while paused");

    // Listed as paused: not running, not crashed, not stopped; still among the live VMs.
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "paused");
    assert.equal(listRows((await cli(["list", "--running"])).stdout.toString()).get(id), "paused");
    assert.equal(JSON.parse((await cli(["get", id])).stdout.toString()).status, "paused");
    const inspect = JSON.parse((await cli(["inspect", id])).stdout.toString());
    assert.equal(inspect.lifecycle.phase, "running", "the phase stays Matchlock's running");
    assert.match(inspect.lifecycle.resources.paused_at, /^\d{4}-\d\d-\d\dT/);
    assert.equal(inspect.vm.status, "paused");

    // Idempotent, with a note.
    const again = await cli(["pause", id]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, new RegExp(`${id} was already paused`));

    // Guest operations are refused, each with one clear error naming the way out.
    const e = await cli(["exec", id, "--", "echo", "hi"], {}, 20_000);
    assert.equal(e.code, 1);
    assert.equal(e.stdout.toString(), "");
    assert.match(e.stderr, new RegExp(`VM ${id} is paused: resume it first with \`matchlock resume ${id}\``));
    const pf = await cli(["port-forward", id, "0:80"], {}, 20_000);
    assert.equal(pf.code, 1, "port-forward should refuse, not wait");
    assert.match(pf.stderr, /is paused/);
    // A paused VM is alive: rm refuses it, prune and rm --stopped leave it alone.
    const rm = await cli(["rm", id]);
    assert.equal(rm.code, 1);
    assert.match(rm.stderr, new RegExp(`${id} is paused; stop it first with \`matchlock kill ${id}\``));
    assert.equal((await cli(["prune"])).code, 0);
    assert.equal((await cli(["rm", "--stopped"])).code, 0);
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "paused");

    const r = await cli(["resume", id]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.toString(), `${id}\n`);
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "running");
    const r2 = await cli(["resume", id]);
    assert.equal(r2.code, 0);
    assert.match(r2.stderr, new RegExp(`${id} was not paused`));

    await waitFor("the counter to go on", () => counter(id).length >= atPause + 5);
    const seq = counter(id);
    assert.deepEqual(
      seq,
      seq.map((_, i) => i),
      "the counter goes on from where it stopped: no gap, nothing repeated",
    );
    assert.ok(cpuTicks(qemu) - cpu0 > cpuPaused, "QEMU runs the guest again");
    assert.equal((await cli(["exec", id, "--", "echo", "back"])).stdout.toString(), "back\n");
    const history = JSON.parse((await cli(["inspect", id])).stdout.toString()).history as Array<{
      phase: string;
      resources: { paused_at?: string };
    }>;
    assert.deepEqual(
      history.slice(-3).map((v) => [v.phase, v.resources.paused_at !== undefined]),
      [
        ["running", false],
        ["running", true],
        ["running", false],
      ],
      "the history shows the pause and the resume",
    );

    // Stopping a paused VM: the owner resumes it so its command ends gracefully, and nothing is left.
    assert.equal((await cli(["pause", id])).code, 0);
    const k = await cli(["kill", id], {}, 60_000);
    assert.equal(k.code, 0, k.stderr);
    assert.ok(k.ms < 20_000, `kill of a paused VM took ${k.ms} ms`);
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "stopped");
    assert.deepEqual(leftovers(h.env, id), []);

    // Not applicable any more: clear errors.
    const stopped = await cli(["pause", id]);
    assert.equal(stopped.code, 1);
    assert.match(stopped.stderr, new RegExp(`VM ${id} is not running \\(stopped\\)`));
    assert.match((await cli(["resume", id])).stderr, /is not running \(stopped\)/);
    assert.equal((await cli(["rm", id])).code, 0);
    const unknown = await cli(["pause", "vm-deadbeef"]);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /no VM vm-deadbeef/);
  });

  test("owner SIGKILLed while its VM is paused: listed crashed, and gc leaves nothing", async () => {
    // No parent-death signal: the paused QEMU outlives its owner, for gc to find.
    const env = { MATCHLOCK_TEST_NO_PDEATHSIG: "1" };
    const id = (await cli(["run", "-d", "--", "sleep", "600"], env)).stdout.toString().trim();
    assert.equal((await cli(["pause", id])).code, 0);
    const row = (
      JSON.parse((await cli(["list", "--json"])).stdout.toString()) as Array<{ id: string; pid: number }>
    ).find((v) => v.id === id);
    assert.ok(row);
    process.kill(row.pid, "SIGKILL");
    await waitFor("the owner to die", () => {
      try {
        process.kill(row.pid, 0);
        return false;
      } catch {
        return true;
      }
    });
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "crashed");
    assert.ok(
      qemuProcessesMentioning(join(h.home, "vms", id)).length > 0,
      "the paused QEMU outlived its owner",
    );
    const refused = await cli(["resume", id]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /is not running \(crashed\)/);
    const gc = await cli(["gc"]);
    assert.equal(gc.code, 0, gc.stdout.toString() + gc.stderr);
    assert.match(gc.stdout.toString(), new RegExp(`${id}\\s+cleaned`));
    assert.deepEqual(leftovers(h.env, id), []);
    assert.equal((await cli(["rm", id])).code, 0);
  });

  test("the --timeout lifetime keeps running while paused: the VM is resumed, its command stopped, nothing left", async () => {
    const id = (await cli(["run", "-d", "--no-network", "--timeout", "8", "--", "sleep", "600"])).stdout
      .toString()
      .trim();
    assert.equal((await cli(["pause", id])).code, 0);
    await waitFor(
      "the lifetime to end the paused VM",
      async () => listRows((await cli(["list"])).stdout.toString()).get(id) === "stopped",
    );
    const log = readFileSync(join(h.home, "vms", id, "run.log"), "utf8");
    assert.match(log, /the 8 s limit \(--timeout\) ran out/);
    assert.match(
      log,
      /command exited with 143/,
      "SIGTERM reached the command: the VM was resumed to stop it",
    );
    assert.deepEqual(leftovers(h.env, id), []);
    assert.equal((await cli(["rm", id])).code, 0);
  });
});

describe("pause and resume through RPC (SDK)", () => {
  test("pause refuses exec with -32000, is idempotent, and close works on a paused VM", async () => {
    const c = new Client({ env: h.env });
    await c.launch(new Sandbox().withMemory(256));
    try {
      assert.deepEqual(await c.pause(), { paused: true, changed: true });
      assert.deepEqual(await c.pause(), { paused: true, changed: false });
      assert.equal(listRows((await cli(["list"])).stdout.toString()).get(c.vmId), "paused");
      await assert.rejects(
        c.exec("true"),
        (e: Error) => e instanceof RPCError && e.code === -32000 && /is paused/.test(e.message),
      );
      await assert.rejects(
        c.readFile("/etc/hostname"),
        (e: Error) => e instanceof RPCError && /is paused/.test(e.message),
      );
      assert.deepEqual(await c.resume(), { paused: false, changed: true });
      assert.deepEqual(await c.resume(), { paused: false, changed: false });
      assert.equal((await c.exec("echo ok")).stdout, "ok\n");
      assert.deepEqual(await c.pause(), { paused: true, changed: true });
      const started = Date.now();
      await c.close();
      assert.ok(Date.now() - started < 20_000, "close of a paused VM is prompt");
      assert.equal(listRows((await cli(["list"])).stdout.toString()).get(c.vmId), "stopped");
      assert.deepEqual(leftovers(h.env, c.vmId), []);
    } finally {
      await c.close();
      await c.remove().catch(() => {});
    }
  });
});
