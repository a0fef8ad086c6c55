import { existsSync, rmSync } from "node:fs";
import { join } from "node:path";
import { MatchlockError, messageOf } from "../api/errors.ts";
import { deleteTable, deleteTap } from "../net/host-net.ts";
import {
  type Cleanup,
  type CleanupStep,
  InvalidTransitionError,
  type Phase,
  type Resources,
} from "../state/lifecycle.ts";
import { findProcesses, isAlive, type ProcIdentity, procStartTime } from "../state/procs.ts";
import { readRuntimeFile } from "../state/runtime-file.ts";
import type { StateStore } from "../state/store.ts";
import { crashPoint } from "./faults.ts";

/**
 * The named cleanup steps that reclaim a VM's host resources. Used by `close` (the owner, in order)
 * and by reconcile/gc (any process, after a crash). Each step is idempotent and recorded; failures
 * are collected and reported, never swallowed.
 */

export const QEMU_EXE = /(^|\/)qemu-system-[\w-]+$/;

export interface CleanupResult {
  cleanup: Cleanup;
  errors: string[];
}

function step(status: CleanupStep["status"], error = ""): CleanupStep {
  return { status, error, updated_at: new Date().toISOString() };
}

/** Every QEMU process of this VM: the recorded ones (verified by start time) and any found in /proc. */
export function vmProcesses(resources: Resources): ProcIdentity[] {
  const found = new Map<number, ProcIdentity>();
  const dir = resources.vm_dir;
  const recorded: Array<ProcIdentity | undefined> = [];
  if (resources.qemu?.pid && resources.qemu.start_time !== undefined) {
    recorded.push({ pid: resources.qemu.pid, start_time: resources.qemu.start_time });
  }
  if (dir) recorded.push(readRuntimeFile(dir)?.qemu);
  for (const r of recorded) if (r && isAlive(r)) found.set(r.pid, r);
  // The scratch file may be missing or corrupt and the record may predate the spawn: the command line
  // names the VM dir (its sockets and disks live there), so /proc finds it anyway.
  if (dir) for (const p of findProcesses(`${dir}/`, QEMU_EXE)) found.set(p.pid, p);
  // A clone made ahead of time was started elsewhere: its command line names that dir.
  const marker = resources.qemu?.cmdline_marker;
  if (marker && marker !== `${dir}/`) for (const p of findProcesses(marker, QEMU_EXE)) found.set(p.pid, p);
  return [...found.values()];
}

async function killAndWait(procs: ProcIdentity[]): Promise<string[]> {
  const errors: string[] = [];
  for (const p of procs) {
    try {
      if (isAlive(p)) process.kill(p.pid, "SIGKILL");
    } catch (e) {
      errors.push(`kill ${p.pid}: ${messageOf(e)}`);
    }
  }
  const deadline = Date.now() + 5000;
  while (procs.some((p) => isAlive(p)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  for (const p of procs)
    if (procStartTime(p.pid) === p.start_time) errors.push(`process ${p.pid} is still alive`);
  return errors;
}

/**
 * `rm -rf`, tolerating another process removing the same tree at the same moment (concurrent
 * `prune`s): what matters is that it is gone.
 */
export function removeTree(path: string): void {
  try {
    rmSync(path, { recursive: true, force: true });
  } catch (e) {
    if (existsSync(path)) throw e;
  }
}

export interface CleanupOptions {
  /** Remove the VM dir itself (logs included). Without it, logs stay for `matchlock log`. */
  removeDir: boolean;
}

/** Runs every step; returns what each did. */
export async function cleanupResources(
  state: StateStore,
  vmId: string,
  resources: Resources,
  opts: CleanupOptions,
): Promise<CleanupResult> {
  const cleanup: Cleanup = {};
  const errors: string[] = [];
  const run = async (name: string, fn: () => Promise<"ok" | "skipped">) => {
    try {
      cleanup[name] = step(await fn());
    } catch (e) {
      const msg = messageOf(e);
      cleanup[name] = step("failed", msg);
      errors.push(`${name}: ${msg}`);
    }
  };

  await run("qemu_process", async () => {
    const procs = vmProcesses(resources);
    if (procs.length === 0) return "skipped";
    const errs = await killAndWait(procs);
    if (errs.length > 0) throw new Error(errs.join("; "));
    return "ok";
  });
  await run("sockets", async () => {
    const socks = resources.sockets ?? [];
    for (const s of socks) rmSync(s, { force: true });
    return socks.length > 0 ? "ok" : "skipped";
  });
  await run("disks", async () => {
    const disks = resources.disks ?? [];
    for (const d of disks) rmSync(d, { force: true });
    return disks.length > 0 ? "ok" : "skipped";
  });
  // The table and the TAP at once (QEMU is gone by now, so no guest sends through the TAP): each
  // takes a command, the TAP's unregister ~30 ms in the kernel. A crash between them leaves a table
  // without its TAP, or a TAP whose owner is dead: `gc` removes either as an orphan.
  await Promise.all([
    run("firewall_table", async () => {
      if (!resources.firewall_table) return "skipped";
      return (await deleteTable(resources.firewall_table)) ? "ok" : "skipped";
    }),
    run("tap", async () => {
      if (!resources.tap_name) return "skipped";
      return (await deleteTap(resources.tap_name)) ? "ok" : "skipped";
    }),
  ]);
  await run("subnet", async () => (state.subnets.release(vmId) ? "ok" : "skipped"));
  await run("runtime_file", async () => {
    if (!resources.vm_dir) return "skipped";
    rmSync(join(resources.vm_dir, "runtime.json"), { force: true });
    return "ok";
  });
  if (opts.removeDir) {
    await run("vm_dir", async () => {
      if (!resources.vm_dir || !existsSync(resources.vm_dir)) return "skipped";
      removeTree(resources.vm_dir);
      return "ok";
    });
  }
  return { cleanup, errors };
}

/**
 * Moves the VM to `phase`; false if another process (a concurrent `prune`, `rm` or `gc`) has meanwhile
 * finished cleaning it or removed its records: then there is nothing left for us to do.
 */
function advance(
  state: StateStore,
  vmId: string,
  phase: Phase,
  patch: { error?: string; cleanup?: Cleanup } = {},
) {
  try {
    state.lifecycle.transition(vmId, phase, patch);
    return true;
  } catch (e) {
    const now = e instanceof InvalidTransitionError ? state.lifecycle.current(vmId) : undefined;
    if (e instanceof InvalidTransitionError && (now === undefined || now.phase === "cleaned")) return false;
    throw e;
  }
}

/**
 * Moves a VM through cleaning → cleaned (or cleanup_failed, with every failed step named), then
 * drops its records if asked. The resources come from the lifecycle record, so this works for a VM
 * whose owner died as well as for our own. Another process cleaning the same VM at the same time is
 * fine: every step is idempotent, and whoever finishes second finds the work done.
 */
export async function finishCleanup(
  state: StateStore,
  vmId: string,
  opts: { removeDir: boolean; removeRecords: boolean },
): Promise<CleanupResult> {
  const cur = state.lifecycle.current(vmId);
  let result: CleanupResult = { cleanup: {}, errors: [] };
  if (cur && cur.phase !== "cleaned") {
    if (!advance(state, vmId, "cleaning")) return result;
    crashPoint("cleaning");
    result = await cleanupResources(state, vmId, cur.resources, { removeDir: opts.removeDir });
    if (result.errors.length > 0) {
      const message = result.errors.join("; ");
      if (!advance(state, vmId, "cleanup_failed", { error: message, cleanup: result.cleanup })) return result;
      throw new MatchlockError("VM_FAILED", `cleaning up ${vmId} failed: ${message}`);
    }
    if (!advance(state, vmId, "cleaned", { cleanup: result.cleanup })) return result;
  } else if (cur && opts.removeDir && cur.resources.vm_dir) {
    removeTree(cur.resources.vm_dir);
  }
  if (opts.removeRecords) {
    state.vms.remove(vmId);
    state.lifecycle.remove(vmId);
  }
  return result;
}
