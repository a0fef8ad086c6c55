import type { Command } from "commander";
import { MatchlockError, VmNotRunningError } from "../api/errors.ts";
import { parseVmId } from "../api/ids.ts";
import { connectRelay, PAUSE_RELAY, relayVersion } from "./exec.ts";

/**
 * `matchlock pause ID…` / `matchlock resume ID…` (ours; Docker's names): the VM's owner freezes or
 * thaws its vCPUs (QMP stop/cont), reached through the VM's relay like `exec` and `allow-list`.
 */

async function changePause(id: string, op: "pause" | "resume"): Promise<void> {
  parseVmId(id);
  // Loaded when the command runs: `matchlock --help` never opens SQLite.
  const [{ isStoppedStatus }, { statusOf }] = await Promise.all([
    import("../sandbox/reconcile.ts"),
    import("./vm-records.ts"),
  ]);
  // From state.db first: an unknown VM and a stopped or crashed one get their own clear error.
  const status = await statusOf(id);
  if (isStoppedStatus(status)) throw new VmNotRunningError(id, status);
  const client = await connectRelay(id);
  try {
    if (relayVersion(await client.ready) < PAUSE_RELAY) {
      throw new MatchlockError("VM_FAILED", `VM ${id} is owned by an older matchlock that cannot ${op} it`, {
        hint: "VMs started by this version can be paused",
      });
    }
    const r = await client.pauseVm(op);
    process.stdout.write(`${id}\n`);
    if (!r.changed) {
      // Idempotent, as a script wants it, but a person typing it should know nothing happened.
      process.stderr.write(`matchlock: ${id} ${op === "pause" ? "was already paused" : "was not paused"}\n`);
    }
  } finally {
    client.close(`${op} done`);
  }
}

export function registerPauseCommands(program: Command): void {
  program
    .command("pause")
    .summary("freeze running VMs: nothing runs in them and they use no CPU until resumed")
    .description(
      "Stop the VM's virtual CPUs (QMP stop): its processes, timers and clock stand still where they are, and\n" +
        "QEMU uses no CPU for it. Memory, disks, host folders and connections are kept; `matchlock list`\n" +
        "shows it as paused. While paused, exec, port-forward and file operations are refused (commands\n" +
        "already running just wait); allow-list changes and logs work. `matchlock resume` lets it go on\n" +
        "exactly where it stopped (its clock does not advance while paused).\n\n" +
        "Pausing a paused VM does nothing and says so; a stopped or crashed VM is refused. The --timeout\n" +
        "lifetime keeps running while paused (the VM still holds its memory and disks). Stopping a paused\n" +
        "VM (`matchlock kill`, Ctrl-C on its run, its lifetime running out) resumes it first so that its\n" +
        "commands end gracefully; if its owner dies, `matchlock gc` reclaims it like any other.",
    )
    .argument("<id...>", "VM ids")
    .action((ids: string[]) => eachVm(ids, (id) => changePause(id, "pause")));

  program
    .command("resume")
    .summary("let paused VMs run again from where they stopped")
    .description(
      "Restart the virtual CPUs of VMs paused with `matchlock pause` (QMP cont): their commands go on where\n" +
        "they stopped, with nothing lost. Resuming a VM that is not paused does nothing and says so; a\n" +
        "stopped or crashed VM is refused.",
    )
    .argument("<id...>", "VM ids")
    .action((ids: string[]) => eachVm(ids, (id) => changePause(id, "resume")));
}

/** Every id is checked before any VM changes; one that fails is reported and the rest go on. */
async function eachVm(ids: string[], fn: (id: string) => Promise<void>): Promise<void> {
  for (const id of ids) parseVmId(id);
  if (ids.length === 1) return fn(ids[0] as string);
  let failed = 0;
  for (const id of ids) {
    try {
      await fn(id);
    } catch (e) {
      if (!(e instanceof MatchlockError)) throw e;
      failed++;
      process.stderr.write(`matchlock: ${e.message}\n`);
      if (e.hint) process.stderr.write(`${e.hint.replace(/^/gm, "  ")}\n`);
    }
  }
  if (failed > 0) process.exitCode = 1;
}
