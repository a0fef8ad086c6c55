import { createReadStream, existsSync, statSync } from "node:fs";
import { join } from "node:path";
import type { Command } from "commander";
import { InvalidArgumentError, MatchlockError } from "../api/errors.ts";
import { paths } from "../api/paths.ts";
import {
  effectiveStatus,
  ownerOf,
  type ReconcileResult,
  reconcileVm,
  releaseOrphanSubnets,
  sweepOrphanProcesses,
  unrecordedVmDirs,
} from "../sandbox/reconcile.ts";
import { isAlive } from "../state/procs.ts";
import { openState, type StateStore } from "../state/store.ts";
import type { VmRow } from "../state/vms.ts";
import { table } from "./table.ts";

/** list, get, inspect, log, kill, rm, prune, gc: the VMs recorded in state.db. */

function withState<T>(fn: (s: StateStore) => Promise<T> | T): Promise<T> {
  const s = openState(paths());
  return Promise.resolve()
    .then(() => fn(s))
    .finally(() => s.close());
}

function mustGet(s: StateStore, id: string): VmRow {
  const row = s.vms.get(id);
  if (!row)
    throw new MatchlockError("INVALID_ARGUMENT", `no VM ${id}`, { hint: "`matchlock list` shows the VMs" });
  return row;
}

/** A VM as `get` and `inspect` show it: the row, its effective status, and the config parsed. */
function vmView(s: StateStore, row: VmRow) {
  return {
    ...row,
    status: effectiveStatus(row, s.lifecycle.current(row.id)),
    config: parseConfig(row),
    config_json: undefined,
  };
}

function parseConfig(row: VmRow): unknown {
  try {
    return JSON.parse(row.config_json);
  } catch {
    return null;
  }
}

function printResult(r: ReconcileResult): void {
  process.stdout.write(`${r.id}  ${r.outcome}  ${r.detail}\n`);
  for (const f of r.failedSteps) process.stdout.write(`    failed step ${f}\n`);
}

export function registerVmCommands(program: Command): void {
  program
    .command("list")
    .alias("ls")
    .summary("list VMs")
    .option("--running", "only running VMs")
    .action((flags: { running?: boolean }) =>
      withState((s) => {
        const rows = [["ID", "STATUS", "IMAGE", "CREATED", "PID"]];
        for (const r of s.vms.list()) {
          const status = effectiveStatus(r, s.lifecycle.current(r.id));
          if (flags.running && status !== "running") continue;
          rows.push([r.id, status, r.image, r.created_at.replace("T", " ").slice(0, 19), String(r.pid)]);
        }
        process.stdout.write(`${table(rows)}\n`);
      }),
    );

  program
    .command("get")
    .summary("print a VM's record as JSON (secret values are never stored)")
    .argument("<id>")
    .action((id: string) =>
      withState((s) => {
        process.stdout.write(`${JSON.stringify(vmView(s, mustGet(s, id)), null, 2)}\n`);
      }),
    );

  program
    .command("inspect")
    .alias("stat")
    .summary("print a VM's record, current lifecycle phase and phase history as JSON")
    .argument("<id>")
    .action((id: string) =>
      withState((s) => {
        const vm = vmView(s, mustGet(s, id));
        const lc = s.lifecycle.current(id);
        process.stdout.write(
          `${JSON.stringify({ vm, lifecycle: lc ?? null, history: s.lifecycle.history(id) }, null, 2)}\n`,
        );
      }),
    );

  program
    .command("log")
    .summary("print a VM's console and run output")
    .argument("<id>")
    .option("-f, --follow", "keep printing as the logs grow, until the VM stops")
    .action(async (id: string, flags: { follow?: boolean }) => {
      const { dir, owner } = await withState((s) => {
        mustGet(s, id);
        const lc = s.lifecycle.current(id);
        return { dir: lc?.resources.vm_dir ?? join(paths().vms, id), owner: ownerOf(s.vms.get(id), lc) };
      });
      const files = ["console.log", "run.log"].map((f) => join(dir, f));
      if (!files.some((f) => existsSync(f)))
        throw new MatchlockError("INVALID_ARGUMENT", `${id} has no logs (removed?)`);
      await followLogs(files, flags.follow === true ? () => isAlive(owner) : () => false);
    });

  program
    .command("kill")
    .summary("stop a VM: SIGTERM to its owning process, which stops the command and the VM")
    .argument("[id]")
    .option("--all", "every running VM")
    .action((id: string | undefined, flags: { all?: boolean }) =>
      withState(async (s) => {
        if (!id && !flags.all) throw new InvalidArgumentError("give a VM id or --all");
        const ids = flags.all ? s.vms.list().map((r) => r.id) : [id as string];
        let failures = 0;
        for (const vm of ids) {
          const row = mustGet(s, vm);
          const owner = ownerOf(row, s.lifecycle.current(vm));
          if (!isAlive(owner)) {
            if (!flags.all) process.stderr.write(`matchlock: ${vm} is not running\n`);
            if (!flags.all) failures++;
            continue;
          }
          process.kill((owner as { pid: number }).pid, "SIGTERM");
          const deadline = Date.now() + 30_000;
          while (isAlive(owner) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
          if (isAlive(owner)) {
            process.stderr.write(`matchlock: ${vm}: owner ${owner?.pid} did not stop within 30 s\n`);
            failures++;
          } else process.stdout.write(`${vm}\n`);
        }
        if (failures > 0) process.exitCode = 1;
      }),
    );

  program
    .command("rm")
    .alias("remove")
    .summary("remove stopped VMs: reclaim what they hold, then delete their records and logs")
    .argument("[id...]")
    .option("--stopped", "every stopped or crashed VM")
    .action((ids: string[], flags: { stopped?: boolean }) =>
      withState(async (s) => {
        if (ids.length === 0 && !flags.stopped) throw new InvalidArgumentError("give VM ids or --stopped");
        const targets = flags.stopped
          ? s.vms
              .list()
              .filter((r) => effectiveStatus(r, s.lifecycle.current(r.id)) !== "running")
              .map((r) => r.id)
          : ids;
        let failures = 0;
        for (const id of targets) {
          const row = mustGet(s, id);
          if (effectiveStatus(row, s.lifecycle.current(id)) === "running") {
            process.stderr.write(
              `matchlock: ${id} is running; stop it first with \`matchlock kill ${id}\`\n`,
            );
            failures++;
            continue;
          }
          if (!(await removeVm(s, id))) failures++;
        }
        if (failures > 0) process.exitCode = 1;
      }),
    );

  program
    .command("prune")
    .summary("reclaim and remove every stopped or crashed VM, and drop orphan subnet rows")
    .action(() =>
      withState(async (s) => {
        let failures = 0;
        for (const r of s.vms.list()) {
          if (effectiveStatus(r, s.lifecycle.current(r.id)) === "running") continue;
          if (!(await removeVm(s, r.id))) failures++;
        }
        for (const v of releaseOrphanSubnets(s)) process.stdout.write(`released subnet of ${v}\n`);
        if (failures > 0) process.exitCode = 1;
      }),
    );

  program
    .command("gc")
    .summary("reclaim what crashed VMs left behind: processes, disks, sockets, subnets")
    .description(
      "For each VM whose owning process is gone (or the one given): kill its QEMU (verified by process start\n" +
        "time), remove its disks and sockets and release its subnet, recording each step. Then sweep the host\n" +
        "for QEMU processes of ours with no live owner. Logs and records stay for `matchlock log` and `rm`.",
    )
    .argument("[id]")
    .option("--force-running", "also reclaim VMs whose owner is alive (it is stopped first)")
    .action((id: string | undefined, flags: { forceRunning?: boolean }) =>
      withState(async (s) => {
        const p = paths();
        const ids = id ? [mustGet(s, id).id] : s.vms.list().map((r) => r.id);
        let failures = 0;
        for (const vm of ids) {
          const r = await reconcileVm(s, vm, { forceRunning: flags.forceRunning === true });
          printResult(r);
          if (r.outcome === "failed") failures++;
        }
        if (!id) {
          for (const k of await sweepOrphanProcesses(s, p))
            process.stdout.write(`${k.id}  cleaned  killed orphan QEMU pid ${k.pid}\n`);
          for (const v of releaseOrphanSubnets(s))
            process.stdout.write(`${v}  cleaned  released orphan subnet\n`);
          for (const d of unrecordedVmDirs(s, p))
            process.stdout.write(`${d}  skipped  VM dir with no record (remove it by hand)\n`);
        }
        if (failures > 0) process.exitCode = 1;
      }),
    );
}

/** rm semantics: reconcile first; keep the metadata if reconcile fails. */
async function removeVm(s: StateStore, id: string): Promise<boolean> {
  const r = await reconcileVm(s, id, { removeDir: true });
  if (r.outcome === "failed") {
    process.stderr.write(
      `matchlock: ${id}: could not reclaim its resources, keeping its record: ${r.detail}\n`,
    );
    for (const f of r.failedSteps) process.stderr.write(`    failed step ${f}\n`);
    return false;
  }
  s.vms.remove(id);
  s.lifecycle.remove(id);
  process.stdout.write(`${id}\n`);
  return true;
}

/** Prints files in order; with `follow`, keeps printing what is appended while `alive()` holds. */
async function followLogs(files: string[], alive: () => boolean): Promise<void> {
  const offsets = new Map<string, number>();
  const pump = async () => {
    for (const f of files) {
      if (!existsSync(f)) continue;
      const size = statSync(f).size;
      const from = offsets.get(f) ?? 0;
      if (size <= from) continue;
      await new Promise<void>((resolve, reject) => {
        const rs = createReadStream(f, { start: from, end: size - 1 });
        rs.on("data", (d) => process.stdout.write(d));
        rs.on("end", () => resolve());
        rs.on("error", reject);
      });
      offsets.set(f, size);
    }
  };
  await pump();
  while (alive()) {
    await new Promise((r) => setTimeout(r, 250));
    await pump();
  }
  await pump();
}
