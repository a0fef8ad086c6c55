import type { Command } from "commander";

/**
 * list, get, inspect, log, kill, rm, prune, gc: the VMs recorded in state.db. Their work is in
 * vm-records.ts, loaded when one runs: `matchlock --help` and other commands never open SQLite.
 */
const records = () => import("./vm-records.ts");

export function registerVmCommands(program: Command): void {
  program
    .command("list")
    .alias("ls")
    .summary("list VMs")
    .option("--running", "only live VMs: running and paused ones (STATUS says which)")
    .option("--json", "a JSON array of {id, status, image, created_at, pid}, for scripts")
    .action(async (flags: { running?: boolean; json?: boolean }) => (await records()).listVms(flags));

  program
    .command("get")
    .summary("print a VM's record as JSON (secret values are never stored)")
    .argument("<id>")
    .action(async (id: string) => (await records()).getVm(id));

  program
    .command("inspect")
    .alias("stat")
    .summary("print a VM's record, current lifecycle phase and phase history as JSON")
    .argument("<id>")
    .action(async (id: string) => (await records()).inspectVm(id));

  program
    .command("log")
    .summary("print a VM's console, run output and launched entrypoint's output")
    .argument("<id>")
    .option("-f, --follow", "keep printing as the logs grow, until the VM stops")
    .action(async (id: string, flags: { follow?: boolean }) => (await records()).logVm(id, flags));

  program
    .command("kill")
    .summary("stop a VM: SIGTERM to its owning process, which stops the command and the VM")
    .argument("[id]")
    .option("--all", "every running VM")
    .action(async (id: string | undefined, flags: { all?: boolean }) => (await records()).killVms(id, flags));

  program
    .command("rm")
    .alias("remove")
    .summary("remove stopped VMs: reclaim what they hold, then delete their records and logs")
    .argument("[id...]")
    .option("--stopped", "every stopped or crashed VM")
    .action(async (ids: string[], flags: { stopped?: boolean }) => (await records()).removeVms(ids, flags));

  program
    .command("prune")
    .summary("reclaim and remove every stopped or crashed VM, and drop orphan subnet rows")
    .action(async () => (await records()).pruneVms());

  program
    .command("gc")
    .summary(
      "reclaim what crashed VMs left behind: processes, disks, sockets, TAPs, firewall tables, subnets",
    )
    .description(
      [
        "For each VM whose owning process is gone (or the one given): kill its QEMU (verified by process " +
          "start time), remove its disks and sockets, delete its TAP and nftables table and release its subnet, " +
          "recording each step. Then sweep the host for QEMU processes of ours with no live owner, and this " +
          "network namespace for fc-* TAPs and matchlock_* tables whose owner is gone (by name, even with no " +
          "record). Also stale or interrupted snapshots, and the dirs of clones made ahead of time by SDK spare " +
          "`matchlock rpc` children that were killed. Logs and records stay for `matchlock log` and `rm`.",
        "A VM dir with no record (state.db lost or replaced) gets its record rebuilt from the dir and /proc.",
        "--repair: if state.db is unusable (truncated, overwritten, cut off from its -wal/-shm), rename it and " +
          "its -wal/-shm to state.db.corrupt-<time> (nothing is deleted), start a fresh state.db, and rebuild " +
          "the records of every VM dir, running VMs included. A healthy state.db is left alone.",
      ].join("\n\n"),
    )
    .argument("[id]")
    .option("--force-running", "also reclaim VMs whose owner is alive (it is stopped first)")
    .option("--repair", "move an unusable state.db aside and rebuild the VM records from the host")
    .action(async (id: string | undefined, flags: { forceRunning?: boolean; repair?: boolean }) =>
      (await records()).gcVms(id, flags),
    );
}
