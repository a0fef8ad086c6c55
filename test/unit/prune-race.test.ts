import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { parseSandboxConfig } from "../../src/api/config.ts";
import { type Paths, paths, vmDir } from "../../src/api/paths.ts";
import type { Resources } from "../../src/state/lifecycle.ts";
import { openState } from "../../src/state/store.ts";
import { runCli, tempHome } from "../helpers/cli.ts";

/**
 * Several `prune` / `rm --stopped` at once over the same stopped VMs, through the real CLI on one
 * real state.db: every VM goes exactly once, and no loser fails because a winner got there first.
 * The VMs are records and dirs as a stopped owner leaves them (their owner process has exited).
 */

const h = tempHome();
after(() => h.cleanup());
const p: Paths = paths(h.env);

/** A process that has exited: what a stopped VM's record names as its owner. */
function deadOwner(): { pid: number; start_time: number } {
  const r = spawnSync("sh", ["-c", "cut -d' ' -f1,22 /proc/self/stat"], { encoding: "utf8" });
  const [pid, start] = r.stdout.trim().split(" ").map(Number);
  return { pid: pid as number, start_time: start as number };
}

function stoppedVm(id: string): void {
  const dir = vmDir(id, p);
  mkdirSync(dir, { recursive: true });
  for (const f of ["upper.ext4", "console.log", "run.log"]) writeFileSync(join(dir, f), "x");
  const owner = deadOwner();
  const resources: Resources = {
    vm_dir: dir,
    disks: [join(dir, "upper.ext4")],
    sockets: [join(dir, "agent.sock"), join(dir, "qmp.sock"), join(dir, "relay.sock")],
    qemu: { cmdline_marker: `${dir}/` },
    owner,
  };
  const s = openState(p);
  s.vms.insert(id, owner.pid, "matchlock/default:latest", parseSandboxConfig({}));
  s.lifecycle.transition(id, "creating", { backend: "qemu", resources });
  for (const phase of ["created", "starting", "running", "stopping", "stopped"] as const)
    s.lifecycle.transition(id, phase);
  s.vms.setStatus(id, "stopped");
  s.subnets.allocate(id);
  s.close();
}

const idsOf = (out: string) => out.split("\n").filter((l) => /^vm-[0-9a-f]{8}$/.test(l));

describe("concurrent bulk removal", () => {
  test("four prune and two rm --stopped at once: each stopped VM removed exactly once, every process exits 0 with no error", async () => {
    const ids = Array.from({ length: 12 }, (_, i) => `vm-${(0xc0de00 + i).toString(16).padStart(8, "0")}`);
    for (const id of ids) stoppedVm(id);
    const cmds = [["prune"], ["rm", "--stopped"], ["prune"], ["prune"], ["rm", "--stopped"], ["prune"]];
    const results = await Promise.all(cmds.map((args) => runCli(args, { env: h.env })));
    const printed: string[] = [];
    results.forEach((r, i) => {
      assert.equal(r.code, 0, `${cmds[i]}: ${r.stderr}`);
      assert.equal(r.stderr, "", `${cmds[i]} complained`);
      printed.push(...idsOf(r.stdout.toString()));
    });
    assert.deepEqual(printed.sort(), ids, "each VM reported removed by exactly one process");
    for (const id of ids) assert.equal(existsSync(vmDir(id, p)), false, `${id}'s dir is left`);
    const s = openState(p);
    assert.deepEqual(s.vms.list(), []);
    assert.deepEqual(s.subnets.list(), []);
    assert.deepEqual(s.lifecycle.unfinished(), []);
    s.close();
  });

  test("rm ID of a VM that is already gone still says so, with exit 1", async () => {
    const r = await runCli(["rm", "vm-00c0de00"], { env: h.env });
    assert.equal(r.code, 1);
    assert.equal(r.stderr, "matchlock: no VM vm-00c0de00\n  `matchlock list` shows the VMs\n");
  });

  test("rm of several ids: a missing one is reported, the others are still removed", async () => {
    stoppedVm("vm-00c0de20");
    const r = await runCli(["rm", "vm-00c0de21", "vm-00c0de20"], { env: h.env });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^matchlock: no VM vm-00c0de21\n/);
    assert.deepEqual(idsOf(r.stdout.toString()), ["vm-00c0de20"]);
    assert.equal(existsSync(vmDir("vm-00c0de20", p)), false);
  });
});
