import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { parseSandboxConfig } from "../../src/api/config.ts";
import { MatchlockError, VmNotRunningError, VmPausedError } from "../../src/api/errors.ts";
import { paths } from "../../src/api/paths.ts";
import { relayVersion } from "../../src/cli/exec.ts";
import { AgentClient } from "../../src/guest/agent-client.ts";
import { type PauseTarget, VmPause } from "../../src/sandbox/pause.ts";
import { effectiveStatus, isStoppedStatus, reconcileVm } from "../../src/sandbox/reconcile.ts";
import { RELAY_VERSION, RelayServer, type RelayTarget } from "../../src/sandbox/relay.ts";
import { InvalidTransitionError } from "../../src/state/lifecycle.ts";
import { selfIdentity } from "../../src/state/procs.ts";
import { openState, type StateStore } from "../../src/state/store.ts";

/**
 * Pause and resume without a VM: the one-at-a-time, idempotent state machine (src/sandbox/pause.ts),
 * how the pause is recorded in state.db, and what list, rm, prune and gc make of a paused VM.
 */

/** A fake hypervisor: records the QMP commands it got, each taking `ms`, failing when told to. */
function fakeVm(ms = 5) {
  const calls: string[] = [];
  let failNext: Error | undefined;
  const run = (cmd: string) => async () => {
    calls.push(cmd);
    await new Promise((r) => setTimeout(r, ms));
    const e = failNext;
    failNext = undefined;
    if (e) throw e;
  };
  return { calls, vm: { pause: run("stop"), resume: run("cont") }, fail: (e: Error) => (failNext = e) };
}

function target(over: Partial<PauseTarget> = {}): PauseTarget & { records: Array<string | undefined> } {
  const records: Array<string | undefined> = [];
  return {
    id: "vm-0000abcd",
    vm: fakeVm().vm,
    record: (since) => records.push(since),
    refusal: () => undefined,
    failure: async (e) => e,
    records,
    ...over,
  };
}

describe("VmPause", () => {
  test("pause and resume are idempotent: only a change reaches the hypervisor and the record", async () => {
    const f = fakeVm();
    const t = target({ vm: f.vm });
    const p = new VmPause(t);
    assert.deepEqual(await p.change(false), { paused: false, changed: false });
    assert.deepEqual(await p.change(true), { paused: true, changed: true });
    assert.deepEqual(await p.change(true), { paused: true, changed: false });
    assert.equal(p.paused, true);
    assert.deepEqual(await p.change(false), { paused: false, changed: true });
    assert.deepEqual(f.calls, ["stop", "cont"]);
    assert.equal(t.records.length, 2);
    assert.match(t.records[0] ?? "", /^\d{4}-\d\d-\d\dT.*Z$/);
    assert.equal(t.records[1], undefined);
  });

  test("concurrent calls run one at a time in call order: the last one asked for wins", async () => {
    const f = fakeVm(20);
    const p = new VmPause(target({ vm: f.vm }));
    const results = await Promise.all([p.change(true), p.change(false), p.change(true), p.change(true)]);
    assert.deepEqual(
      results.map((r) => r.changed),
      [true, true, true, false],
    );
    assert.deepEqual(f.calls, ["stop", "cont", "stop"]);
    assert.equal(p.paused, true);
  });

  test("a paused VM refuses guest operations with VM_PAUSED, naming the way out", async () => {
    const p = new VmPause(target());
    p.refuseIfPaused();
    await p.change(true);
    assert.throws(
      () => p.refuseIfPaused(),
      (e: unknown) =>
        e instanceof VmPausedError &&
        e.code === "VM_PAUSED" &&
        e.message === "VM vm-0000abcd is paused: resume it first with `matchlock resume vm-0000abcd`",
    );
  });

  test("a failed QMP command changes nothing and reports the target's explanation", async () => {
    const f = fakeVm();
    const died = new MatchlockError("VM_FAILED", "VM vm-0000abcd died: QEMU was killed by SIGKILL");
    const t = target({ vm: f.vm, failure: async () => died });
    const p = new VmPause(t);
    f.fail(new Error("QMP connection closed"));
    await assert.rejects(p.change(true), (e) => e === died);
    assert.equal(p.paused, false);
    assert.deepEqual(t.records, []);
    // The queue goes on after a failure.
    assert.deepEqual(await p.change(true), { paused: true, changed: true });
  });

  test("a pause that cannot be recorded is undone: the VM never stays paused unseen by list and gc", async () => {
    const f = fakeVm();
    const p = new VmPause(
      target({
        vm: f.vm,
        record: () => {
          throw new Error("database is locked");
        },
      }),
    );
    await assert.rejects(p.change(true), /database is locked/);
    assert.deepEqual(f.calls, ["stop", "cont"]);
    assert.equal(p.paused, false);
    p.refuseIfPaused();
  });

  test("refused while stopping, except for the close's own resume", async () => {
    let closing = false;
    const f = fakeVm();
    const p = new VmPause(
      target({
        vm: f.vm,
        refusal: (byClose) =>
          closing && !byClose ? new VmNotRunningError("vm-0000abcd", "stopping") : undefined,
      }),
    );
    await p.change(true);
    closing = true;
    await assert.rejects(
      p.change(false),
      (e: unknown) => e instanceof VmNotRunningError && e.code === "VM_NOT_RUNNING",
    );
    assert.deepEqual(await p.change(false, { closing: true }), { paused: false, changed: true });
  });
});

const scratch = mkdtempSync(join(tmpdir(), "matchlock-pause-"));
after(() => rmSync(scratch, { recursive: true, force: true }));
let n = 0;

/** A state.db with one VM in phase running, owned by `owner` (this process unless given). */
function runningVm(owner = selfIdentity()): { s: StateStore; id: string } {
  const p = paths({ MATCHLOCK_HOME: join(scratch, `home${n++}`), MATCHLOCK_CACHE: join(scratch, "cache") });
  const s = openState(p);
  const id = "vm-0000beef";
  s.vms.insert(id, owner.pid, "img", parseSandboxConfig({}));
  s.lifecycle.transition(id, "creating", {
    backend: "qemu",
    resources: { vm_dir: join(p.vms, id), qemu: { cmdline_marker: `${join(p.vms, id)}/` }, owner },
  });
  for (const phase of ["created", "starting", "running"] as const) s.lifecycle.transition(id, phase);
  return { s, id };
}

/** A process that has exited: the owner of a VM whose owner crashed. */
function deadOwner(): { pid: number; start_time: number } {
  const r = spawnSync("sh", ["-c", "cut -d' ' -f1,22 /proc/self/stat"], { encoding: "utf8" });
  const [pid, start] = r.stdout.trim().split(" ").map(Number);
  return { pid: pid as number, start_time: start as number };
}

describe("a paused VM in state.db", () => {
  test("recorded as a new version in phase running with paused_at; vms.status stays running (Matchlock's readers)", () => {
    const { s, id } = runningVm();
    const before = s.lifecycle.current(id);
    const rec = s.lifecycle.setPaused(id, "2026-01-02T03:04:05.000Z");
    assert.equal(rec.phase, "running");
    assert.equal(rec.version, (before?.version ?? 0) + 1);
    assert.equal(rec.resources.paused_at, "2026-01-02T03:04:05.000Z");
    assert.deepEqual(
      { ...rec.resources, paused_at: undefined },
      { ...before?.resources, paused_at: undefined },
    );
    assert.equal(s.vms.get(id)?.status, "running");
    // the raw columns as sqlite3 (and Matchlock) read them: a known phase, an extra JSON key
    const raw = s.db
      .prepare("SELECT phase, resources_json FROM vm_lifecycle WHERE vm_id = ? ORDER BY version DESC LIMIT 1")
      .get(id) as { phase: string; resources_json: string };
    assert.equal(raw.phase, "running");
    assert.equal(JSON.parse(raw.resources_json).paused_at, "2026-01-02T03:04:05.000Z");

    const resumed = s.lifecycle.setPaused(id, undefined);
    assert.equal("paused_at" in resumed.resources, false);
    assert.equal(s.lifecycle.current(id)?.resources.paused_at, undefined);
    s.close();
  });

  test("only a running VM can be recorded paused", () => {
    const { s, id } = runningVm();
    s.lifecycle.transition(id, "stopping");
    assert.throws(() => s.lifecycle.setPaused(id, new Date().toISOString()), InvalidTransitionError);
    assert.throws(() => s.lifecycle.setPaused("vm-00000000", undefined), InvalidTransitionError);
    s.close();
  });

  test("list shows paused while its owner lives, crashed once the owner is dead; neither counts as running", () => {
    const live = runningVm();
    live.s.lifecycle.setPaused(live.id, new Date().toISOString());
    const row = live.s.vms.get(live.id);
    assert.ok(row);
    assert.equal(effectiveStatus(row, live.s.lifecycle.current(live.id)), "paused");
    live.s.lifecycle.setPaused(live.id, undefined);
    assert.equal(effectiveStatus(row, live.s.lifecycle.current(live.id)), "running");
    live.s.close();

    const dead = runningVm(deadOwner());
    dead.s.lifecycle.setPaused(dead.id, new Date().toISOString());
    const deadRow = dead.s.vms.get(dead.id);
    assert.ok(deadRow);
    assert.equal(effectiveStatus(deadRow, dead.s.lifecycle.current(dead.id)), "crashed");
    dead.s.close();
  });

  test("rm --stopped and prune never take a paused VM (it is alive); stopped and crashed ones they do", () => {
    assert.equal(isStoppedStatus("paused"), false);
    assert.equal(isStoppedStatus("running"), false);
    assert.equal(isStoppedStatus("stopped"), true);
    assert.equal(isStoppedStatus("crashed"), true);
  });

  test("gc skips a paused VM whose owner lives, and reclaims one whose owner died", async () => {
    const live = runningVm();
    live.s.lifecycle.setPaused(live.id, new Date().toISOString());
    const skipped = await reconcileVm(live.s, live.id);
    assert.equal(skipped.outcome, "skipped");
    assert.match(skipped.detail, /owner pid \d+ is alive/);
    live.s.close();

    const dead = runningVm(deadOwner());
    dead.s.lifecycle.setPaused(dead.id, new Date().toISOString());
    const cleaned = await reconcileVm(dead.s, dead.id);
    assert.equal(cleaned.outcome, "cleaned", cleaned.detail);
    assert.equal(dead.s.lifecycle.current(dead.id)?.phase, "cleaned");
    assert.equal(dead.s.vms.get(dead.id)?.status, "crashed");
    dead.s.close();
  });
});

describe("relay versions", () => {
  test("the relay that serves PAUSE greets as version 4 or later; anything else reads as 0", () => {
    assert.ok(relayVersion(RELAY_VERSION) >= 4, RELAY_VERSION);
    assert.equal(relayVersion("matchlock-relay 3"), 3);
    assert.equal(relayVersion("matchlock-agent 1"), 0);
    assert.equal(relayVersion("matchlock-relay 4x"), 0);
  });
});

describe("the relay's PAUSE frame", () => {
  /** A relay over a fake owner that only pauses; every guest operation is refused while paused. */
  async function relayOver(p: VmPause) {
    const refuse = () => {
      p.refuseIfPaused();
      throw new Error("not in this test");
    };
    const target: RelayTarget = {
      exec: refuse,
      terminate: async () => {},
      openWrite: refuse,
      readFileStream: async () => refuse(),
      listFiles: async () => refuse(),
      tcpConnect: async () => refuse(),
      allowListAdd: refuse,
      allowListDelete: refuse,
      get paused() {
        return p.paused;
      },
      pause: () => p.change(true),
      resume: () => p.change(false),
    };
    const path = join(scratch, `relay${n++}.sock`);
    const server = await RelayServer.listen(path, target);
    const client = new AgentClient(connect(path));
    assert.equal(await client.ready, RELAY_VERSION);
    return {
      client,
      close: () => {
        client.close();
        server.close();
      },
    };
  }

  test("a client pauses, asks, resumes, each answered {paused, changed}; exec meanwhile gets the paused error", async () => {
    const r = await relayOver(new VmPause(target()));
    try {
      assert.deepEqual(await r.client.pauseVm("status"), { paused: false, changed: false });
      assert.deepEqual(await r.client.pauseVm("pause"), { paused: true, changed: true });
      assert.deepEqual(await r.client.pauseVm("pause"), { paused: true, changed: false });
      assert.deepEqual(await r.client.pauseVm("status"), { paused: true, changed: false });
      const h = r.client.exec(
        { argv: ["true"], env: [], cwd: "", user: "", tty: false, stdin: false, mkdirCwd: false },
        {},
      );
      const done = await h.done;
      assert.equal(done.exitCode, 1);
      assert.match(
        done.startError ?? "",
        /VM vm-0000abcd is paused: resume it first with `matchlock resume vm-0000abcd`/,
      );
      assert.deepEqual(await r.client.pauseVm("resume"), { paused: false, changed: true });
    } finally {
      r.close();
    }
  });

  test("a refusal by the owner comes back as an error carrying its message", async () => {
    const r = await relayOver(
      new VmPause(target({ refusal: () => new VmNotRunningError("vm-0000abcd", "stopping") })),
    );
    try {
      await assert.rejects(r.client.pauseVm("pause"), /VM vm-0000abcd is not running \(stopping\)/);
    } finally {
      r.close();
    }
  });
});
