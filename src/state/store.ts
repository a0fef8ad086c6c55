import { join } from "node:path";
import type { Paths } from "../api/paths.ts";
import { asDbError, checkDb, type Db, type DbHealth, moveAside, openDb } from "./db.ts";
import { LifecycleStore } from "./lifecycle.ts";
import { LIFECYCLE_MIGRATIONS, SNAPSHOT_MIGRATIONS, STATE_MIGRATIONS } from "./schema.ts";
import { SnapshotStore } from "./snapshots.ts";
import { SubnetStore } from "./subnets.ts";
import { VmStore } from "./vms.ts";

/** ~/.matchlock/state.db and the stores over it. */
export interface StateStore {
  readonly db: Db;
  readonly vms: VmStore;
  readonly lifecycle: LifecycleStore;
  readonly subnets: SubnetStore;
  readonly snapshots: SnapshotStore;
  close(): void;
}

export function stateDbPath(p: Paths): string {
  return join(p.home, "state.db");
}

/**
 * How to get going again after state.db is found unusable. `gc --repair` only renames (never
 * deletes) the file, and the VM dirs and /proc still say what each VM holds, so nothing is lost.
 */
export const STATE_RECOVER_HINT =
  "run `matchlock gc --repair`: it moves state.db aside (as state.db.corrupt-<time>), starts a fresh one\n" +
  "and rebuilds the records of the VMs still on disk from their dirs and QEMU processes";

export function openState(p: Paths): StateStore {
  const db = openDb(stateDbPath(p), [STATE_MIGRATIONS, LIFECYCLE_MIGRATIONS, SNAPSHOT_MIGRATIONS], {
    recoverHint: STATE_RECOVER_HINT,
  });
  return {
    db,
    vms: new VmStore(db),
    lifecycle: new LifecycleStore(db),
    subnets: new SubnetStore(db),
    snapshots: new SnapshotStore(db),
    close: () => db.close(),
  };
}

/** An error raised while using state.db, as a DbCorruptError with the recovery hint if SQLite found it corrupt. */
export function stateError(e: unknown, p: Paths): unknown {
  return asDbError(e, stateDbPath(p), STATE_RECOVER_HINT);
}

export function checkState(p: Paths): DbHealth {
  return checkDb(stateDbPath(p));
}

export interface RepairResult {
  health: DbHealth;
  /** Where the unusable file went; undefined when there was nothing to repair. */
  movedTo?: string;
}

/** `gc --repair`: moves an unusable state.db (and its logs) aside; a healthy one is left alone. */
export function repairState(p: Paths): RepairResult {
  const health = checkState(p);
  if (health.status !== "corrupt") return { health };
  return { health, movedTo: moveAside(stateDbPath(p)) };
}
