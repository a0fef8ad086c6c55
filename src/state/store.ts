import { join } from "node:path";
import type { Paths } from "../api/paths.ts";
import { type Db, openDb } from "./db.ts";
import { LifecycleStore } from "./lifecycle.ts";
import { LIFECYCLE_MIGRATIONS, STATE_MIGRATIONS } from "./schema.ts";
import { SubnetStore } from "./subnets.ts";
import { VmStore } from "./vms.ts";

/** ~/.matchlock/state.db and the stores over it. */
export interface StateStore {
  readonly db: Db;
  readonly vms: VmStore;
  readonly lifecycle: LifecycleStore;
  readonly subnets: SubnetStore;
  close(): void;
}

export function stateDbPath(p: Paths): string {
  return join(p.home, "state.db");
}

export function openState(p: Paths): StateStore {
  const db = openDb(stateDbPath(p), [STATE_MIGRATIONS, LIFECYCLE_MIGRATIONS]);
  return {
    db,
    vms: new VmStore(db),
    lifecycle: new LifecycleStore(db),
    subnets: new SubnetStore(db),
    close: () => db.close(),
  };
}
