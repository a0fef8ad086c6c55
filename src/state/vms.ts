import type { SandboxConfig } from "../api/config.ts";
import { MatchlockError } from "../api/errors.ts";
import { type Db, nowIso, stmt, writeTx } from "./db.ts";

/** The `vms` table: one row per VM, `pid` being the owning matchlock process. */

export type VmStatus = "running" | "stopped" | "crashed";

export interface VmRow {
  id: string;
  pid: number;
  status: VmStatus;
  image: string;
  config_json: string;
  created_at: string;
  updated_at: string;
}

/**
 * The config as stored: secret values never reach the disk (SECURITY.md). Names, placeholders and
 * hosts stay, so `get` can show which secrets a VM was given.
 */
export function redactConfig(config: SandboxConfig): SandboxConfig {
  const secrets: SandboxConfig["network"]["secrets"] = {};
  for (const [name, s] of Object.entries(config.network.secrets)) {
    secrets[name] = {
      hosts: s.hosts,
      ...(s.placeholder === undefined ? {} : { placeholder: s.placeholder }),
    };
  }
  return { ...config, network: { ...config.network, secrets } };
}

/** No VM with this id is recorded: it never existed, or it was removed (perhaps by another process). */
export class VmNotFoundError extends MatchlockError {
  readonly vmId: string;
  constructor(vmId: string) {
    super("VM_NOT_FOUND", `no VM ${vmId}`, { hint: "`matchlock list` shows the VMs" });
    this.name = "VmNotFoundError";
    this.vmId = vmId;
  }
}

export class VmStore {
  private readonly db: Db;
  constructor(db: Db) {
    this.db = db;
  }

  insert(id: string, ownerPid: number, image: string, config: SandboxConfig): void {
    const now = nowIso();
    writeTx(this.db, () =>
      stmt(
        this.db,
        "INSERT INTO vms(id, pid, status, image, config_json, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
      ).run(id, ownerPid, "running", image, JSON.stringify(redactConfig(config)), now, now),
    );
  }

  setStatus(id: string, status: VmStatus): void {
    writeTx(this.db, () =>
      stmt(this.db, "UPDATE vms SET status = ?, updated_at = ? WHERE id = ?").run(status, nowIso(), id),
    );
  }

  get(id: string): VmRow | undefined {
    const row = stmt(
      this.db,
      "SELECT id, pid, status, image, CAST(config_json AS TEXT) AS config_json, created_at, updated_at FROM vms WHERE id = ?",
    ).get(id);
    return row as VmRow | undefined;
  }

  list(): VmRow[] {
    return stmt(
      this.db,
      "SELECT id, pid, status, image, CAST(config_json AS TEXT) AS config_json, created_at, updated_at FROM vms ORDER BY created_at, id",
    ).all() as VmRow[];
  }

  /**
   * A row rebuilt by gc for a VM found on disk with no record (state.db lost or replaced). The image
   * and config are not known any more. Returns false if a row appeared meanwhile (another gc).
   */
  adopt(id: string, ownerPid: number, status: VmStatus, createdAt: string): boolean {
    return writeTx(
      this.db,
      () =>
        stmt(
          this.db,
          "INSERT OR IGNORE INTO vms(id, pid, status, image, config_json, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ).run(id, ownerPid, status, "unknown", "{}", createdAt, nowIso()).changes > 0,
    );
  }

  /** Returns whether this call removed the row (false: it was already gone). */
  remove(id: string): boolean {
    return writeTx(this.db, () => stmt(this.db, "DELETE FROM vms WHERE id = ?").run(id).changes > 0);
  }
}
