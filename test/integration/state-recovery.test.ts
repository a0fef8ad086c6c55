import assert from "node:assert/strict";
import { existsSync, readFileSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import { stateDbPath } from "../../src/state/store.ts";
import { qemuProcessesMentioning, runCli, tempHome } from "../helpers/cli.ts";
import { leftovers, listRows } from "../helpers/vms.ts";

/**
 * state.db emptied under a running VM (issue #8): every command answers at once with the way out
 * instead of waiting out busy_timeout on "database is locked", and the way out (`gc --repair`)
 * forgets nothing the VM holds: its record is rebuilt from the VM dir and /proc.
 */

const h = tempHome();
after(async () => {
  await runCli(["kill", "--all"], { env: h.env });
  await runCli(["gc", "--force-running"], { env: h.env });
  h.cleanup();
});
const cli = (args: string[]) => runCli(args, { env: h.env });
const db = stateDbPath(paths(h.env));

/** One line and the hint, at once: no stack trace, no 10 s wait on a lock. */
function assertCorruptAnswer(args: string[], r: { code: number | null; stderr: string; ms: number }): void {
  assert.equal(r.code, 1, `${args.join(" ")}: ${r.stderr}`);
  assert.ok(r.ms < 5000, `${args.join(" ")} took ${r.ms} ms`);
  const lines = r.stderr.trimEnd().split("\n");
  assert.match(lines[0] ?? "", /^matchlock: .*state\.db is unusable: it is empty \(0 bytes\) but its -wal/);
  assert.match(lines[1] ?? "", /matchlock gc --repair/);
  assert.ok(!/database is locked|\n\s+at /.test(r.stderr), r.stderr);
}

describe("state.db emptied under a running VM", () => {
  test("emptied state.db under a running VM: list answers at once, gc --repair keeps the VM's record, and gc reclaims the VM after kill", async () => {
    const started = await cli(["run", "-d", "--", "sleep", "600"]);
    assert.equal(started.code, 0, started.stderr);
    const id = started.stdout.toString().trim();
    const dir = join(h.home, "vms", id);
    assert.ok(qemuProcessesMentioning(dir).length > 0);

    truncateSync(db, 0);
    for (const args of [["list"], ["kill", id], ["gc"], ["inspect", id]])
      assertCorruptAnswer(args, await cli(args));
    assert.ok(qemuProcessesMentioning(dir).length > 0, "a refused command touched the VM");

    const repair = await cli(["gc", "--repair"]);
    assert.equal(repair.code, 0, repair.stdout.toString() + repair.stderr);
    const out = repair.stdout.toString();
    const aside = /moved it aside to (\S+);/.exec(out)?.[1] as string;
    assert.ok(aside && existsSync(aside), out);
    assert.equal(readFileSync(aside).length, 0, "the user's (emptied) file is kept as it was");
    assert.match(
      out,
      new RegExp(`${id}\\s+skipped\\s+running \\(owner pid \\d+ is alive\\); record rebuilt from its VM dir`),
    );

    // The VM is known again, and still works: exec goes through its relay.
    assert.equal(listRows((await cli(["list"])).stdout.toString()).get(id), "running");
    const e = await cli(["exec", id, "--", "echo", "still-here"]);
    assert.equal(e.stdout.toString(), "still-here\n", e.stderr);
    const inspect = JSON.parse((await cli(["inspect", id])).stdout.toString());
    assert.ok(inspect.lifecycle.resources.qemu.pid > 0, "the QEMU found through runtime.json and /proc");
    assert.deepEqual(inspect.lifecycle.resources.disks, [join(dir, "upper.ext4")]);

    // Its owner still writes to the old, moved-aside file; when it is stopped, gc reclaims the rest.
    const k = await cli(["kill", id]);
    assert.equal(k.code, 0, k.stderr);
    const gc = await cli(["gc"]);
    assert.equal(gc.code, 0, gc.stdout.toString() + gc.stderr);
    assert.deepEqual(leftovers(h.env, id), []);
    const rm = await cli(["rm", id]);
    assert.equal(rm.code, 0, rm.stderr);
    assert.equal(existsSync(dir), false);

    // And matchlock goes on with the fresh state.db.
    const r = await cli(["run", "--", "echo", "fresh"]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.toString(), "fresh\n");
    assert.deepEqual([...listRows((await cli(["list"])).stdout.toString()).keys()], []);
  });
});
