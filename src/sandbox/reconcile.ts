import { existsSync, lstatSync, readdirSync, statSync } from "node:fs";
import { basename, join } from "node:path";
import { messageOf } from "../api/errors.ts";
import { isVmId } from "../api/ids.ts";
import { type Paths, vmDir } from "../api/paths.ts";
import { deleteTable, deleteTap, listTables, listTaps, tapOfTable } from "../net/host-net.ts";
import { TAP_PREFIX } from "../net/names.ts";
import { writeTx } from "../state/db.ts";
import type { LifecycleRecord, Resources } from "../state/lifecycle.ts";
import {
  cmdline,
  findProcesses,
  isAlive,
  type ProcIdentity,
  parentPid,
  procStartTime,
} from "../state/procs.ts";
import { readRuntimeFile } from "../state/runtime-file.ts";
import type { StateStore } from "../state/store.ts";
import { VmNotFoundError, type VmRow, type VmStatus } from "../state/vms.ts";
import { finishCleanup, QEMU_EXE, removeTree, vmProcesses } from "./cleanup.ts";

/**
 * Reconcile: make the host match the records after a crash. A VM whose owning process is gone is
 * orphaned; its QEMU, disks, sockets and subnet are reclaimed from what the lifecycle record names,
 * and then by sweeping the host for anything of ours with no live owner (records are not the only
 * truth: a crash can come between creating a thing and recording its handle).
 */

/** The owner of a VM, verified by start time when we recorded it (rows from other tools: pid only). */
export function ownerOf(row: VmRow | undefined, lc: LifecycleRecord | undefined): ProcIdentity | undefined {
  if (lc?.resources.owner) return lc.resources.owner;
  if (row?.pid) {
    const start = procStartTime(row.pid);
    return start === undefined ? undefined : { pid: row.pid, start_time: start };
  }
  return undefined;
}

export function ownerAlive(row: VmRow | undefined, lc: LifecycleRecord | undefined): boolean {
  return isAlive(ownerOf(row, lc));
}

/** What `list` and `get` show: the row's status, and `paused` for a running VM that is paused (ours). */
export type ShownStatus = VmStatus | "paused";

/**
 * What `list` shows: a `running` row whose owner is dead is `crashed` (paused or not: a paused VM
 * dies with its owner like any other); a running one whose lifecycle records a pause is `paused`.
 */
export function effectiveStatus(row: VmRow, lc: LifecycleRecord | undefined): ShownStatus {
  if (row.status !== "running") return row.status;
  if (!ownerAlive(row, lc)) return "crashed";
  return isPaused(lc) ? "paused" : "running";
}

/** The lifecycle records a pause: phase running with `paused_at` (LifecycleStore.setPaused). */
export function isPaused(lc: LifecycleRecord | undefined): boolean {
  return lc?.phase === "running" && lc.resources.paused_at !== undefined;
}

/** Stopped or crashed: what `rm --stopped` and `prune` remove. A paused VM is alive, never stopped. */
export function isStoppedStatus(s: ShownStatus): boolean {
  return s === "stopped" || s === "crashed";
}

export type ReconcileOutcome = "cleaned" | "skipped" | "failed";

export interface ReconcileResult {
  id: string;
  outcome: ReconcileOutcome;
  detail: string;
  failedSteps: string[];
}

export interface ReconcileOptions {
  /** Reclaim VMs whose owner is still alive (the owner gets SIGTERM first). */
  forceRunning?: boolean;
  /** Also delete the VM dir (logs) — `rm` and `prune` do, `gc` keeps logs. */
  removeDir?: boolean;
}

async function stopOwner(owner: ProcIdentity): Promise<void> {
  try {
    process.kill(owner.pid, "SIGTERM");
  } catch {}
  const deadline = Date.now() + 10_000;
  while (isAlive(owner) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  if (isAlive(owner)) {
    try {
      process.kill(owner.pid, "SIGKILL");
    } catch {}
    while (isAlive(owner) && Date.now() < deadline + 2000) await new Promise((r) => setTimeout(r, 20));
  }
}

export async function reconcileVm(
  state: StateStore,
  id: string,
  opts: ReconcileOptions = {},
): Promise<ReconcileResult> {
  const row = state.vms.get(id);
  const lc = state.lifecycle.current(id);
  if (!row && !lc) throw new VmNotFoundError(id);
  const owner = ownerOf(row, lc);
  if (isAlive(owner)) {
    if (!opts.forceRunning) {
      return {
        id,
        outcome: "skipped",
        detail: `running (owner pid ${owner?.pid} is alive)`,
        failedSteps: [],
      };
    }
    await stopOwner(owner as ProcIdentity);
  }
  // Only a cleaned VM needs the scan here; otherwise cleanupResources scans /proc itself.
  const leftovers = lc?.phase === "cleaned" ? vmProcesses(lc.resources) : [];
  const dirLeft = lc?.resources.vm_dir !== undefined && existsSync(lc.resources.vm_dir);
  if (lc?.phase === "cleaned" && leftovers.length === 0 && !(opts.removeDir && dirLeft)) {
    return { id, outcome: "skipped", detail: "nothing to reclaim", failedSteps: [] };
  }
  try {
    if (lc?.phase === "cleaned") {
      for (const p of leftovers) if (isAlive(p)) process.kill(p.pid, "SIGKILL");
      if (opts.removeDir && lc.resources.vm_dir) removeTree(lc.resources.vm_dir);
    } else {
      await finishCleanup(state, id, { removeDir: opts.removeDir ?? false, removeRecords: false });
    }
    if (row?.status === "running") state.vms.setStatus(id, "crashed");
    return { id, outcome: "cleaned", detail: `was ${lc?.phase ?? "unrecorded"}`, failedSteps: [] };
  } catch (e) {
    const cleanup = state.lifecycle.current(id)?.cleanup ?? {};
    const failed = Object.entries(cleanup)
      .filter(([, s]) => s.status === "failed")
      .map(([name, s]) => `${name}: ${s.error}`);
    return { id, outcome: "failed", detail: messageOf(e), failedSteps: failed };
  }
}

/**
 * Sweeps the host for QEMU processes of ours (their command line names a dir under our vms dir)
 * whose VM has no live owner, and kills them. Returns what it killed.
 */
export async function sweepOrphanProcesses(
  state: StateStore,
  p: Paths,
): Promise<Array<{ id: string; pid: number }>> {
  const killed: Array<{ id: string; pid: number }> = [];
  for (const proc of findProcesses(`${p.vms}/vm-`, QEMU_EXE)) {
    const cmd = cmdline(proc.pid).join(" ");
    const m = new RegExp(`${escapeRe(p.vms)}/(vm-[0-9a-f]{8})/`).exec(cmd);
    if (!m?.[1]) continue;
    const id = m[1];
    if (ownerAlive(state.vms.get(id), state.lifecycle.current(id))) continue;
    if (isAlive(proc)) {
      try {
        process.kill(proc.pid, "SIGKILL");
        killed.push({ id, pid: proc.pid });
      } catch {}
    }
  }
  return killed;
}

/** Subnet rows whose VM is gone or cleaned: nothing holds them any more. */
export function releaseOrphanSubnets(state: StateStore): string[] {
  const released: string[] = [];
  for (const s of state.subnets.list()) {
    const row = state.vms.get(s.vm_id);
    const lc = state.lifecycle.current(s.vm_id);
    if (!row || !lc || lc.phase === "cleaned" || (!ownerAlive(row, lc) && row.status !== "running")) {
      if (state.subnets.release(s.vm_id)) released.push(s.vm_id);
    }
  }
  return released;
}

/**
 * Sweeps this network namespace for VM networks with no live owner: `fc-*` TAPs and `matchlock_*`
 * tables (any family, Matchlock's NAT tables too), by name, even when no record names them. A TAP's
 * owner is in its alias; a TAP without one (made by Matchlock itself) counts as live while a QEMU
 * holds it or its record's owner lives. A table goes with its TAP, and a table without a TAP is an
 * orphan (tables are created after their TAP; a closing VM removes both at once). Returns what it
 * deleted.
 */
export async function sweepOrphanNetworks(state: StateStore): Promise<Array<{ id: string; what: string }>> {
  const idOf = (tap: string) => `vm-${tap.slice(TAP_PREFIX.length)}`;
  const taps = await listTaps();
  const live = new Set<string>();
  for (const t of taps) {
    const id = idOf(t.name);
    const alive = t.owner
      ? isAlive(t.owner)
      : (isVmId(id) && ownerAlive(state.vms.get(id), state.lifecycle.current(id))) ||
        findProcesses(`ifname=${t.name},`, QEMU_EXE).length > 0;
    if (alive) live.add(t.name);
  }
  const removed: Array<{ id: string; what: string }> = [];
  for (const table of await listTables()) {
    const tap = tapOfTable(table.name);
    if (tap === undefined || live.has(tap)) continue;
    if (await deleteTable(table.name))
      removed.push({ id: idOf(tap), what: `nftables table ${table.family} ${table.name}` });
  }
  for (const t of taps) {
    if (live.has(t.name)) continue;
    if (await deleteTap(t.name)) removed.push({ id: idOf(t.name), what: `TAP ${t.name}` });
  }
  return removed;
}

/** VM dirs on disk with no record at all (a crash before the first write, or a lost database). */
export function unrecordedVmDirs(state: StateStore, p: Paths): string[] {
  if (!existsSync(p.vms)) return [];
  return readdirSync(p.vms, { withFileTypes: true })
    .filter((d) => d.isDirectory() && isVmId(d.name))
    .filter((d) => !state.vms.get(d.name) && !state.lifecycle.current(d.name))
    .map((d) => join(p.vms, d.name));
}

/**
 * What the host itself says a VM holds, for a VM dir with no record: the owner and QEMU from
 * runtime.json, else from /proc (QEMU's command line names the dir; its parent is the owner if that
 * is a matchlock process), and the disks and sockets in the dir.
 */
export function resourcesOnHost(dir: string): Resources {
  const runtime = readRuntimeFile(dir);
  const qemu = [runtime?.qemu].find((q) => q && isAlive(q)) ?? findProcesses(`${dir}/`, QEMU_EXE)[0];
  const owner = runtime?.owner ?? (qemu ? matchlockParent(qemu.pid) : undefined);
  const files = readdirSync(dir);
  const named = (ext: string) => files.filter((f) => f.endsWith(ext)).map((f) => join(dir, f));
  return {
    vm_dir: dir,
    disks: named(".ext4"),
    sockets: [...new Set([...named(".sock"), ...(runtime?.relay_socket ? [runtime.relay_socket] : [])])],
    qemu: { ...(qemu ?? {}), cmdline_marker: `${dir}/` },
    ...(owner ? { owner } : {}),
  };
}

/** The parent of a QEMU, if it is a matchlock process (`matchlock …` or node running our CLI). */
function matchlockParent(pid: number): ProcIdentity | undefined {
  const ppid = parentPid(pid);
  if (ppid === undefined || ppid === 1) return undefined;
  const ours = cmdline(ppid).some((a) => basename(a) === "matchlock" || /\/cli\/main\.[jt]s$/.test(a));
  const start = procStartTime(ppid);
  return ours && start !== undefined ? { pid: ppid, start_time: start } : undefined;
}

/**
 * Rebuilds the records of a VM found on disk with no record (state.db lost, emptied or moved aside
 * by `gc --repair`), so that list, kill, gc and rm know it again and nothing it holds is forgotten.
 * Returns false if there is no such dir or another process recorded it meanwhile.
 */
export function adoptVmDir(state: StateStore, p: Paths, id: string): boolean {
  const dir = vmDir(id, p);
  // A real directory only: cleanup removes files in it, so a symlink must not lead elsewhere.
  if (!lstatSync(dir, { throwIfNoEntry: false })?.isDirectory()) return false;
  if (state.vms.get(id) || state.lifecycle.current(id)) return false;
  const resources = resourcesOnHost(dir);
  const ownerLive = isAlive(resources.owner);
  const running = ownerLive || resources.qemu?.pid !== undefined;
  const st = statSync(dir);
  const created = new Date(st.birthtimeMs > 0 ? st.birthtimeMs : st.ctimeMs).toISOString();
  // One transaction: a crash in between must not leave a lifecycle record that `gc` never lists.
  return writeTx(state.db, () => {
    const adopted = state.lifecycle.adopt(id, running ? "running" : "stopped", {
      backend: "qemu",
      error: `record rebuilt by gc from ${dir} and /proc: state.db had no record of this VM`,
      resources,
    });
    return (
      adopted !== undefined &&
      state.vms.adopt(id, resources.owner?.pid ?? 0, ownerLive ? "running" : "crashed", created)
    );
  });
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
