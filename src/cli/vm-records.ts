import { createReadStream, existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { InvalidArgumentError, MatchlockError } from "../api/errors.ts";
import { parseVmId } from "../api/ids.ts";
import { type Paths, paths, vmDir } from "../api/paths.ts";
import { VM_LOG_FILES } from "../sandbox/entrypoint.ts";
import { sweepSpares } from "../sandbox/prestart.ts";
import {
  adoptVmDir,
  effectiveStatus,
  isStoppedStatus,
  ownerOf,
  type ReconcileResult,
  reconcileVm,
  releaseOrphanSubnets,
  type ShownStatus,
  sweepOrphanNetworks,
  sweepOrphanProcesses,
  unrecordedVmDirs,
} from "../sandbox/reconcile.ts";
import { sweepTemplates } from "../sandbox/snapshots.ts";
import { isAlive } from "../state/procs.ts";
import { openState, repairState, type StateStore, stateDbPath, stateError } from "../state/store.ts";
import { VmNotFoundError, type VmRow } from "../state/vms.ts";
import { table } from "./table.ts";

/** What list, get, inspect, log, kill, rm, prune and gc do (their flags and help: vms.ts). */

/** Runs `fn` on state.db; SQLite finding the file corrupt on the way becomes one line and a hint. */
export async function withState<T>(fn: (s: StateStore, p: Paths) => Promise<T> | T): Promise<T> {
  const p = paths();
  const s = openState(p);
  try {
    return await fn(s, p);
  } catch (e) {
    throw stateError(e, p);
  } finally {
    s.close();
  }
}

/** A recorded VM's dir and owning process (for commands that read its files, live or not). */
export async function locateVm(id: string): Promise<{ dir: string; owner: ReturnType<typeof ownerOf> }> {
  parseVmId(id);
  return withState((s, p) => {
    const row = mustGet(s, id);
    const lc = s.lifecycle.current(id);
    return { dir: lc?.resources.vm_dir ?? vmDir(id, p), owner: ownerOf(row, lc) };
  });
}

/** A recorded VM's status as `list` shows it (VmNotFoundError if there is no such VM). */
export async function statusOf(id: string): Promise<ShownStatus> {
  parseVmId(id);
  return withState((s) => effectiveStatus(mustGet(s, id), s.lifecycle.current(id)));
}

function mustGet(s: StateStore, id: string): VmRow {
  const row = s.vms.get(id);
  if (!row) throw new VmNotFoundError(id);
  return row;
}

/** An error that ends one VM of many, printed as the CLI edge prints errors; the rest go on. */
function printError(e: MatchlockError): void {
  process.stderr.write(`matchlock: ${e.message}\n`);
  if (e.hint) process.stderr.write(`${e.hint.replace(/^/gm, "  ")}\n`);
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

function printResult(r: ReconcileResult, note = ""): void {
  process.stdout.write(`${r.id}  ${r.outcome}  ${r.detail}${note}\n`);
  for (const f of r.failedSteps) process.stdout.write(`    failed step ${f}\n`);
}

const isStopped = (s: StateStore, r: VmRow) => isStoppedStatus(effectiveStatus(r, s.lifecycle.current(r.id)));

export function listVms(flags: { running?: boolean; json?: boolean }) {
  return withState((s) => {
    const vms = s.vms
      .list()
      .map((r) => ({
        id: r.id,
        status: effectiveStatus(r, s.lifecycle.current(r.id)),
        image: r.image,
        created_at: r.created_at,
        pid: r.pid,
      }))
      .filter((v) => !flags.running || !isStoppedStatus(v.status));
    if (flags.json) {
      process.stdout.write(`${JSON.stringify(vms, null, 2)}\n`);
      return;
    }
    const rows = [["ID", "STATUS", "IMAGE", "CREATED", "PID"]];
    for (const v of vms) {
      rows.push([v.id, v.status, v.image, v.created_at.replace("T", " ").slice(0, 19), String(v.pid)]);
    }
    process.stdout.write(`${table(rows)}\n`);
  });
}

export function getVm(id: string) {
  parseVmId(id);
  return withState((s) => {
    process.stdout.write(`${JSON.stringify(vmView(s, mustGet(s, id)), null, 2)}\n`);
  });
}

export function inspectVm(id: string) {
  parseVmId(id);
  return withState((s) => {
    const vm = vmView(s, mustGet(s, id));
    const lc = s.lifecycle.current(id);
    process.stdout.write(
      `${JSON.stringify({ vm, lifecycle: lc ?? null, history: s.lifecycle.history(id) }, null, 2)}\n`,
    );
  });
}

export async function logVm(id: string, flags: { follow?: boolean }) {
  const { dir, owner } = await locateVm(id);
  const files = VM_LOG_FILES.map((f) => join(dir, f));
  if (!files.some((f) => existsSync(f)))
    throw new MatchlockError("INVALID_ARGUMENT", `${id} has no logs (removed?)`);
  await followLogs(files, flags.follow === true ? () => isAlive(owner) : () => false);
}

export function killVms(id: string | undefined, flags: { all?: boolean }) {
  if (!id && !flags.all) throw new InvalidArgumentError("give a VM id or --all");
  if (id !== undefined) parseVmId(id);
  return withState(async (s) => {
    // --all takes the rows as listed: one removed meanwhile by another process is simply gone.
    const rows = flags.all ? s.vms.list() : [mustGet(s, id as string)];
    let failures = 0;
    for (const row of rows) {
      const owner = ownerOf(row, s.lifecycle.current(row.id));
      if (!isAlive(owner)) {
        if (!flags.all) process.stderr.write(`matchlock: ${row.id} is not running\n`);
        if (!flags.all) failures++;
        continue;
      }
      if (!(await stopOwner(row.id, owner as { pid: number; start_time: number }))) failures++;
    }
    if (failures > 0) process.exitCode = 1;
  });
}

export function removeVms(ids: string[], flags: { stopped?: boolean }) {
  if (ids.length === 0 && !flags.stopped) throw new InvalidArgumentError("give VM ids or --stopped");
  // Every id is checked before anything is removed.
  for (const id of ids) parseVmId(id);
  return withState(async (s) => {
    let failures = 0;
    if (flags.stopped) {
      for (const r of s.vms.list()) if (isStopped(s, r) && (await removeVm(s, r.id)) === "failed") failures++;
    }
    for (const id of ids) if (!(await removeNamed(s, id))) failures++;
    if (failures > 0) process.exitCode = 1;
  });
}

export function pruneVms() {
  return withState(async (s) => {
    let failures = 0;
    for (const r of s.vms.list()) {
      if (isStopped(s, r) && (await removeVm(s, r.id)) === "failed") failures++;
    }
    for (const v of releaseOrphanSubnets(s)) process.stdout.write(`released subnet of ${v}\n`);
    if (failures > 0) process.exitCode = 1;
  });
}

export function gcVms(id: string | undefined, flags: { forceRunning?: boolean; repair?: boolean }) {
  if (id !== undefined) parseVmId(id);
  if (flags.repair) repairStateDb();
  return withState((s, p) => gc(s, p, id, flags.forceRunning === true));
}

function repairStateDb(): void {
  const p = paths();
  const r = repairState(p);
  if (r.health.status === "corrupt" && r.movedTo !== undefined) {
    process.stdout.write(`${stateDbPath(p)} was unusable: ${r.health.problem}\n`);
    process.stdout.write(`moved it aside to ${r.movedTo}; starting a fresh state.db\n`);
  } else {
    const what = r.health.status === "missing" ? "does not exist yet" : "is healthy";
    process.stdout.write(`${stateDbPath(p)} ${what}: nothing to repair\n`);
  }
}

async function gc(s: StateStore, p: Paths, id: string | undefined, forceRunning: boolean): Promise<void> {
  // VM dirs with no record first: their QEMU and disks are reclaimed like any other VM's.
  const adopted = new Set<string>();
  const dirs = id ? [vmDir(id, p)] : unrecordedVmDirs(s, p);
  for (const d of dirs) {
    const vm = d.slice(p.vms.length + 1);
    if (adoptVmDir(s, p, vm)) adopted.add(vm);
  }
  const ids = id ? [mustGet(s, id).id] : s.vms.list().map((r) => r.id);
  let failures = 0;
  for (const vm of ids) {
    let r: ReconcileResult;
    try {
      r = await reconcileVm(s, vm, { forceRunning });
    } catch (e) {
      if (e instanceof VmNotFoundError && !id) continue; // removed meanwhile by a concurrent rm/prune
      throw e;
    }
    printResult(r, adopted.has(vm) ? "; record rebuilt from its VM dir" : "");
    if (r.outcome === "failed") failures++;
  }
  if (!id) {
    for (const k of await sweepOrphanProcesses(s, p))
      process.stdout.write(`${k.id}  cleaned  killed orphan QEMU pid ${k.pid}\n`);
    for (const v of releaseOrphanSubnets(s)) process.stdout.write(`${v}  cleaned  released orphan subnet\n`);
    for (const n of await sweepOrphanNetworks(s))
      process.stdout.write(`${n.id}  cleaned  deleted orphan ${n.what}\n`);
    for (const t of await sweepTemplates(s, p))
      process.stdout.write(`snapshot ${t.key}  removed  ${t.why}\n`);
    for (const name of await sweepSpares(p))
      process.stdout.write(`spare clone ${name}  removed  its owner is gone\n`);
  }
  if (failures > 0) process.exitCode = 1;
}

/** SIGTERM to a VM's owner, which stops the command and the VM; waits up to 30 s. */
async function stopOwner(vm: string, owner: { pid: number; start_time: number }): Promise<boolean> {
  try {
    process.kill(owner.pid, "SIGTERM");
  } catch {} // it exited since we looked (a concurrent kill): the wait below sees it gone
  const deadline = Date.now() + 30_000;
  while (isAlive(owner) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  if (isAlive(owner)) {
    process.stderr.write(`matchlock: ${vm}: owner ${owner.pid} did not stop within 30 s\n`);
    return false;
  }
  process.stdout.write(`${vm}\n`);
  return true;
}

/** `rm ID`: the user named it, so a VM that is not there, or is running, is an error they hear about. */
async function removeNamed(s: StateStore, id: string): Promise<boolean> {
  const row = s.vms.get(id);
  if (!row) {
    printError(new VmNotFoundError(id));
    return false;
  }
  const status = effectiveStatus(row, s.lifecycle.current(id));
  if (!isStoppedStatus(status)) {
    // running or paused: either way alive, and a kill stops it (a paused one is resumed to stop).
    process.stderr.write(`matchlock: ${id} is ${status}; stop it first with \`matchlock kill ${id}\`\n`);
    return false;
  }
  const outcome = await removeVm(s, id);
  if (outcome === "gone") process.stderr.write(`matchlock: ${id} was removed meanwhile by another process\n`);
  return outcome === "removed";
}

/**
 * rm semantics: reconcile first; keep the metadata if reconcile fails. "gone" when another process
 * (a concurrent rm or prune) removed the VM first: for bulk removal that is not an error, the VM is
 * gone as asked; only the process that deleted the record prints the id.
 */
async function removeVm(s: StateStore, id: string): Promise<"removed" | "gone" | "failed"> {
  let r: ReconcileResult;
  try {
    r = await reconcileVm(s, id, { removeDir: true });
  } catch (e) {
    if (e instanceof VmNotFoundError) return "gone";
    throw e;
  }
  if (r.outcome === "failed") {
    process.stderr.write(
      `matchlock: ${id}: could not reclaim its resources, keeping its record: ${r.detail}\n`,
    );
    for (const f of r.failedSteps) process.stderr.write(`    failed step ${f}\n`);
    return "failed";
  }
  const removedRow = s.vms.remove(id);
  s.lifecycle.remove(id);
  if (!removedRow) return "gone";
  process.stdout.write(`${id}\n`);
  return "removed";
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
      // Piped, not written as read: a large log to a slow reader must not pile up in memory.
      await pipeline(createReadStream(f, { start: from, end: size - 1 }), process.stdout, { end: false });
      offsets.set(f, size);
    }
  };
  try {
    await pump();
    while (alive()) {
      await new Promise((r) => setTimeout(r, 250));
      await pump();
    }
    await pump();
  } catch (e) {
    // The reader went away (`log -f ID | head`): stop following, quietly, as a pipeline would.
    if ((e as NodeJS.ErrnoException).code !== "EPIPE") throw e;
  }
}
