import { readdirSync, readFileSync } from "node:fs";

/**
 * Process identity for reconcile: a pid is only "ours" if its start time (field 22 of
 * /proc/PID/stat, in clock ticks since boot) matches what we recorded. PIDs are reused, so
 * `kill(pid, 0)` alone could make us kill an unrelated process.
 */

export interface ProcIdentity {
  pid: number;
  start_time: number;
}

/** Fields 3… of /proc/PID/stat (state, ppid, …), or undefined if there is no such process (or a zombie). */
function statFields(pid: number): string[] | undefined {
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined;
  }
  // comm (field 2) may contain spaces and parentheses: split after the last ')'.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return rest[0] === "Z" || rest[0] === "X" ? undefined : rest;
}

/** The start time of `pid`, or undefined if there is no such process (or it is a zombie). */
export function procStartTime(pid: number): number | undefined {
  const start = Number(statFields(pid)?.[19]); // field 22 overall = index 19 after pid and comm
  return Number.isFinite(start) ? start : undefined;
}

/** The parent of `pid` (field 4), or undefined if there is no such process. */
export function parentPid(pid: number): number | undefined {
  const ppid = Number(statFields(pid)?.[1]);
  return Number.isInteger(ppid) && ppid > 0 ? ppid : undefined;
}

export function selfIdentity(): ProcIdentity {
  return { pid: process.pid, start_time: procStartTime(process.pid) ?? 0 };
}

/** True only if the process with this pid is the same one we recorded. */
export function isAlive(id: ProcIdentity | undefined): boolean {
  if (!id?.pid) return false;
  const start = procStartTime(id.pid);
  return start !== undefined && start === id.start_time;
}

export function cmdline(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
  } catch {
    return [];
  }
}

/** Live processes whose command line contains `marker` (e.g. a VM dir) and whose argv[0] matches. */
export function findProcesses(marker: string, exe: RegExp): ProcIdentity[] {
  const out: ProcIdentity[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === process.pid) continue;
    const argv = cmdline(pid);
    if (argv.length === 0 || !exe.test(argv[0] ?? "")) continue;
    if (!argv.some((a) => a.includes(marker))) continue;
    const start = procStartTime(pid);
    if (start !== undefined) out.push({ pid, start_time: start });
  }
  return out;
}

/** Sends `signal` only if the process is still the recorded one. Returns whether it was sent. */
export function killVerified(id: ProcIdentity, signal: NodeJS.Signals): boolean {
  if (!isAlive(id)) return false;
  try {
    process.kill(id.pid, signal);
    return true;
  } catch {
    return false;
  }
}
