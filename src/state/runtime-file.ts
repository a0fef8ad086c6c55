import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { ProcIdentity } from "./procs.ts";

/**
 * Transient process handles of a running VM, kept apart from the durable record: a small JSON file
 * in the VM dir, written atomically. If it is missing or corrupt, reconcile rediscovers the QEMU
 * process from /proc (its command line names the VM dir).
 */

export interface RuntimeFile {
  owner?: ProcIdentity;
  qemu?: ProcIdentity;
  relay_socket?: string;
}

export function runtimeFilePath(vmDir: string): string {
  return join(vmDir, "runtime.json");
}

export function writeRuntimeFile(vmDir: string, data: RuntimeFile): void {
  const path = runtimeFilePath(vmDir);
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, `${JSON.stringify(data)}\n`, { mode: 0o600 });
  renameSync(tmp, path);
}

export function readRuntimeFile(vmDir: string): RuntimeFile | undefined {
  try {
    const v = JSON.parse(readFileSync(runtimeFilePath(vmDir), "utf8")) as unknown;
    return typeof v === "object" && v !== null ? (v as RuntimeFile) : undefined;
  } catch {
    return undefined;
  }
}
