import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { paths } from "../../src/api/paths.ts";
import { openState } from "../../src/state/store.ts";
import { qemuProcessesMentioning } from "./cli.ts";

/** `matchlock list` output as id → status. */
export function listRows(out: string): Map<string, string> {
  const rows = new Map<string, string>();
  for (const line of out.trim().split("\n").slice(1)) {
    const [id, status] = line.split(/\s+/);
    if (id && status) rows.set(id, status);
  }
  return rows;
}

/** What of a VM's is left on the host: QEMU processes, disk and socket files, subnet rows. */
export function leftovers(env: NodeJS.ProcessEnv, id: string): string[] {
  const p = paths(env);
  const out: string[] = [];
  const dir = join(p.vms, id);
  if (qemuProcessesMentioning(dir).length > 0) out.push("qemu process");
  if (existsSync(dir)) for (const f of readdirSync(dir)) if (/\.(ext4|sock)$/.test(f)) out.push(f);
  const s = openState(p);
  if (s.subnets.get(id)) out.push("subnet row");
  s.close();
  return out;
}
