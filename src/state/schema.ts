import type { ModuleMigrations } from "./db.ts";

/**
 * state.db schema: the tables and columns of Matchlock's (PROTOCOLS.md §4), so its documented
 * sqlite3 diagnostics work on our database. Never edit an applied migration; add a new one.
 */

export const STATE_MIGRATIONS: ModuleMigrations = {
  module: "state",
  migrations: [
    {
      version: 1,
      name: "create_vms",
      sql: `
CREATE TABLE IF NOT EXISTS vms (
  id TEXT PRIMARY KEY,
  pid INTEGER NOT NULL DEFAULT 0,
  status TEXT NOT NULL,
  image TEXT NOT NULL DEFAULT '',
  config_json BLOB,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_vms_status ON vms(status);
CREATE INDEX IF NOT EXISTS idx_vms_created_at ON vms(created_at);`,
    },
    {
      version: 2,
      name: "create_subnet_allocations",
      sql: `
CREATE TABLE IF NOT EXISTS subnet_allocations (
  vm_id TEXT PRIMARY KEY,
  octet INTEGER NOT NULL UNIQUE,
  gateway_ip TEXT NOT NULL,
  guest_ip TEXT NOT NULL,
  subnet TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_subnet_allocations_octet ON subnet_allocations(octet);`,
    },
  ],
};

export const LIFECYCLE_MIGRATIONS: ModuleMigrations = {
  module: "lifecycle",
  migrations: [
    {
      version: 1,
      name: "create_append_only_vm_lifecycle_table",
      sql: `
CREATE TABLE IF NOT EXISTS vm_lifecycle (
  vm_id TEXT NOT NULL,
  version INTEGER NOT NULL,
  backend TEXT NOT NULL DEFAULT '',
  phase TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  last_error TEXT NOT NULL DEFAULT '',
  resources_json TEXT NOT NULL DEFAULT '{}',
  cleanup_json TEXT NOT NULL DEFAULT '{}',
  PRIMARY KEY (vm_id, version)
);
CREATE INDEX IF NOT EXISTS idx_vm_lifecycle_phase ON vm_lifecycle(phase);
CREATE INDEX IF NOT EXISTS idx_vm_lifecycle_vm_version ON vm_lifecycle(vm_id, version DESC);`,
    },
    {
      version: 2,
      name: "create_vm_lifecycle_head",
      sql: `
CREATE TABLE IF NOT EXISTS vm_lifecycle_head (
  vm_id TEXT PRIMARY KEY,
  last_version INTEGER NOT NULL
);`,
    },
  ],
};

/**
 * Ours (Matchlock has no snapshots): one row per snapshot template, written before its files exist
 * (`building`, with the building process as owner) and marked `ready` once they are complete, so
 * `gc` can tell a finished template from the remains of a crashed build.
 */
export const SNAPSHOT_MIGRATIONS: ModuleMigrations = {
  module: "snapshots",
  migrations: [
    {
      version: 1,
      name: "create_snapshot_templates",
      sql: `
CREATE TABLE IF NOT EXISTS snapshot_templates (
  key TEXT PRIMARY KEY,
  image TEXT NOT NULL,
  dir TEXT NOT NULL,
  status TEXT NOT NULL,
  owner_pid INTEGER NOT NULL DEFAULT 0,
  owner_start_time INTEGER NOT NULL DEFAULT 0,
  inputs_json TEXT NOT NULL DEFAULT '{}',
  bytes INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  last_used_at TEXT NOT NULL DEFAULT ''
);`,
    },
  ],
};
