import { execFileSync } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { paths } from "../../src/api/paths.ts";
import { openState } from "../../src/state/store.ts";
import { qemuProcessesMentioning } from "./cli.ts";

/**
 * The lifecycle phases the crash tests SIGKILL the owner at (MATCHLOCK_TEST_CRASH_AT), each with a
 * command that keeps the VM up through that phase.
 */
export const CRASH_PHASES: ReadonlyArray<readonly [string, string[]]> = [
  ["creating", ["sleep", "600"]],
  ["created", ["sleep", "600"]],
  ["starting", ["sleep", "600"]],
  ["running", ["sleep", "600"]],
  ["stopping", ["true"]],
  ["cleaning", ["true"]],
];

/** `matchlock list` output as id → status. */
export function listRows(out: string): Map<string, string> {
  const rows = new Map<string, string>();
  for (const line of out.trim().split("\n").slice(1)) {
    const [id, status] = line.split(/\s+/);
    if (id && status) rows.set(id, status);
  }
  return rows;
}

/** `cmd args` in network namespace `ns` (the root one when undefined), its stdout. */
function inNs(ns: string | undefined, cmd: string, args: string[]): string {
  const argv = ns === undefined ? [cmd, ...args] : ["ip", "netns", "exec", ns, cmd, ...args];
  return execFileSync(argv[0] as string, argv.slice(1), { encoding: "utf8" });
}

/** The VM's TAP and nftables tables, if any are left in network namespace `ns`. */
export function networkLeftovers(id: string, ns?: string): string[] {
  const tap = `fc-${id.slice(3)}`;
  const out: string[] = [];
  const links = JSON.parse(inNs(ns, "ip", ["-j", "link", "show"])) as Array<{ ifname: string }>;
  if (links.some((l) => l.ifname === tap)) out.push(`TAP ${tap}`);
  const tables = JSON.parse(inNs(ns, "nft", ["-j", "list", "tables"])) as {
    nftables: Array<{ table?: { family: string; name: string } }>;
  };
  for (const e of tables.nftables) if (e.table?.name.endsWith(tap)) out.push(`table ${e.table.name}`);
  return out;
}

/**
 * What of a VM's is left on the host: QEMU processes, disk and socket files, subnet rows, its TAP
 * and firewall table (in network namespace `ns`).
 */
export function leftovers(env: NodeJS.ProcessEnv, id: string, ns?: string): string[] {
  const p = paths(env);
  const out: string[] = [];
  const dir = join(p.vms, id);
  if (qemuProcessesMentioning(dir).length > 0) out.push("qemu process");
  if (existsSync(dir)) for (const f of readdirSync(dir)) if (/\.(ext4|sock)$/.test(f)) out.push(f);
  const s = openState(p);
  if (s.subnets.get(id)) out.push("subnet row");
  s.close();
  out.push(...networkLeftovers(id, ns));
  return out;
}
