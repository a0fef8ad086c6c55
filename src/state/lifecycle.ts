import { MatchlockError } from "../api/errors.ts";
import { type Db, nowIso, stmt, writeTx } from "./db.ts";
import type { ProcIdentity } from "./procs.ts";

/**
 * The lifecycle of a VM as an append-only history (vm_lifecycle) with a head pointer
 * (vm_lifecycle_head): every phase change is a new version carrying the full resource list and
 * cleanup state, so a crash at any moment leaves a record of what to reclaim.
 */

export const PHASES = [
  "creating",
  "created",
  "starting",
  "running",
  "stopping",
  "stopped",
  "cleaning",
  "cleaned",
  "create_failed",
  "start_failed",
  "stop_failed",
  "cleanup_failed",
] as const;
export type Phase = (typeof PHASES)[number];

/** PROTOCOLS.md §4; a phase may also move to itself. */
export const TRANSITIONS: Record<Phase, readonly Phase[]> = {
  creating: ["created", "create_failed", "cleaning"],
  created: ["starting", "stopping", "cleaning"],
  starting: ["running", "start_failed", "stopping", "cleaning"],
  running: ["stopping", "cleaning"],
  stopping: ["stopped", "stop_failed", "cleaning"],
  stopped: ["cleaning", "cleaned"],
  cleaning: ["cleaned", "cleanup_failed"],
  create_failed: ["cleaning", "cleanup_failed"],
  start_failed: ["stopping", "cleaning", "cleanup_failed"],
  stop_failed: ["cleaning", "cleanup_failed"],
  cleanup_failed: ["cleaning", "cleaned"],
  cleaned: [],
};

export function canTransition(from: Phase, to: Phase): boolean {
  return from === to || TRANSITIONS[from].includes(to);
}

/**
 * Every host resource a VM holds. Written before the resource is created; a field that names a
 * thing that does not exist (yet, or any more) is harmless to clean.
 */
export interface Resources {
  vm_dir?: string;
  disks?: string[];
  sockets?: string[];
  /** The hypervisor process: its command line names the VM dir, so it can be found without the pid. */
  qemu?: { pid?: number; start_time?: number; cmdline_marker: string };
  /** The owning matchlock process; the VM is orphaned when it is gone. */
  owner?: ProcIdentity;
  /** The network, under Matchlock's keys (its diagnostics read them); absent with no network. */
  tap_name?: string;
  /** The VM's nftables table (family inet). Matchlock also names a `nat_table`; we create none. */
  firewall_table?: string;
  gateway_ip?: string;
  guest_ip?: string;
  subnet_cidr?: string;
  /**
   * Not a resource: set (to when) while the VM is paused, absent otherwise. Matchlock has no
   * pause; its readers parse resources_json into a struct and skip keys they do not know, so this
   * is where a pause can be recorded without a phase or a vms.status value they would misread
   * (see `LifecycleStore.setPaused`).
   */
  paused_at?: string;
}

export interface CleanupStep {
  status: "ok" | "failed" | "skipped";
  error: string;
  updated_at: string;
}

export type Cleanup = Record<string, CleanupStep>;

export interface LifecycleRecord {
  vm_id: string;
  version: number;
  backend: string;
  phase: Phase;
  updated_at: string;
  last_error: string;
  resources: Resources;
  cleanup: Cleanup;
}

interface Row {
  vm_id: string;
  version: number;
  backend: string;
  phase: string;
  updated_at: string;
  last_error: string;
  resources_json: string;
  cleanup_json: string;
}

function parseJson<T>(s: string, fallback: T): T {
  try {
    return JSON.parse(s) as T;
  } catch {
    return fallback;
  }
}

function fromRow(r: Row): LifecycleRecord {
  return {
    vm_id: r.vm_id,
    version: r.version,
    backend: r.backend,
    phase: (PHASES as readonly string[]).includes(r.phase) ? (r.phase as Phase) : "cleanup_failed",
    updated_at: r.updated_at,
    last_error: r.last_error,
    resources: parseJson<Resources>(r.resources_json, {}),
    cleanup: parseJson<Cleanup>(r.cleanup_json, {}),
  };
}

export class InvalidTransitionError extends MatchlockError {
  constructor(vmId: string, from: Phase, to: Phase) {
    super("INTERNAL", `${vmId}: lifecycle cannot go from ${from} to ${to}`);
    this.name = "InvalidTransitionError";
  }
}

export class LifecycleStore {
  private readonly db: Db;
  constructor(db: Db) {
    this.db = db;
  }

  current(vmId: string): LifecycleRecord | undefined {
    const r = stmt(
      this.db,
      `SELECT l.* FROM vm_lifecycle l JOIN vm_lifecycle_head h ON h.vm_id = l.vm_id AND h.last_version = l.version
         WHERE l.vm_id = ?`,
    ).get(vmId) as Row | undefined;
    return r ? fromRow(r) : undefined;
  }

  history(vmId: string): LifecycleRecord[] {
    return (
      stmt(this.db, "SELECT * FROM vm_lifecycle WHERE vm_id = ? ORDER BY version").all(vmId) as Row[]
    ).map(fromRow);
  }

  /**
   * Appends the next version. `patch` merges into the current record: resources and cleanup steps
   * accumulate, so each write carries the whole picture. Refuses a transition PROTOCOLS.md forbids.
   */
  transition(
    vmId: string,
    phase: Phase,
    patch: { backend?: string; error?: string; resources?: Resources; cleanup?: Cleanup } = {},
  ): LifecycleRecord {
    return writeTx(this.db, () => {
      const cur = this.current(vmId);
      if (cur && !canTransition(cur.phase, phase)) throw new InvalidTransitionError(vmId, cur.phase, phase);
      if (!cur && phase !== "creating") throw new InvalidTransitionError(vmId, "creating", phase);
      const rec: LifecycleRecord = {
        vm_id: vmId,
        version: this.nextVersion(vmId, "next"),
        backend: patch.backend ?? cur?.backend ?? "",
        phase,
        updated_at: nowIso(),
        // Cleaning up after a failure keeps the failure in view (inspect, list): it is why the VM ended.
        last_error:
          patch.error ?? (phase === "cleaning" || phase === "cleaned" ? (cur?.last_error ?? "") : ""),
        resources: { ...(cur?.resources ?? {}), ...(patch.resources ?? {}) },
        cleanup: { ...(cur?.cleanup ?? {}), ...(patch.cleanup ?? {}) },
      };
      this.insert(rec);
      return rec;
    });
  }

  /**
   * Records a pause (`since`, an ISO time) or a resume (undefined) of a running VM as a new version
   * in phase `running`: a pause is not a phase of Matchlock's lifecycle, and its tools must go on
   * seeing a live VM as running (never stopped: its `rm` would delete a VM that still runs). The
   * history shows when it was paused and resumed. Refused unless the VM is running.
   */
  setPaused(vmId: string, since: string | undefined): LifecycleRecord {
    return writeTx(this.db, () => {
      const cur = this.current(vmId);
      if (cur?.phase !== "running")
        throw new InvalidTransitionError(vmId, cur?.phase ?? "creating", "running");
      const { paused_at: _was, ...resources } = cur.resources;
      const rec: LifecycleRecord = {
        ...cur,
        version: this.nextVersion(vmId, "next"),
        updated_at: nowIso(),
        last_error: "",
        resources: since === undefined ? resources : { ...resources, paused_at: since },
      };
      this.insert(rec);
      return rec;
    });
  }

  /**
   * Allocates the next version in the head table. "next" follows the head; "after-rows" starts
   * after the highest version on record, whatever the head says (adopting a VM whose head is stale).
   */
  private nextVersion(vmId: string, from: "next" | "after-rows"): number {
    const onConflict = from === "next" ? "vm_lifecycle_head.last_version + 1" : "excluded.last_version";
    return (
      stmt(
        this.db,
        `INSERT INTO vm_lifecycle_head(vm_id, last_version)
           VALUES (?, COALESCE((SELECT MAX(version) FROM vm_lifecycle WHERE vm_id = ?), 0) + 1)
           ON CONFLICT(vm_id) DO UPDATE SET last_version = ${onConflict}
           RETURNING last_version`,
      ).get(vmId, vmId) as { last_version: number }
    ).last_version;
  }

  private insert(rec: LifecycleRecord): void {
    stmt(
      this.db,
      `INSERT INTO vm_lifecycle(vm_id, version, backend, phase, updated_at, last_error, resources_json, cleanup_json)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
    ).run(
      rec.vm_id,
      rec.version,
      rec.backend,
      rec.phase,
      rec.updated_at,
      rec.last_error,
      JSON.stringify(rec.resources),
      JSON.stringify(rec.cleanup),
    );
  }

  /** VMs whose latest phase is not `cleaned`: candidates for reconcile. */
  unfinished(): LifecycleRecord[] {
    return (
      stmt(
        this.db,
        `SELECT l.* FROM vm_lifecycle l JOIN vm_lifecycle_head h ON h.vm_id = l.vm_id AND h.last_version = l.version
           WHERE l.phase != 'cleaned' ORDER BY l.vm_id`,
      ).all() as Row[]
    ).map(fromRow);
  }

  /**
   * The first record of a VM found on disk with no record at all (gc, after state.db was lost):
   * one version at the phase the host shows, with what the VM dir and /proc say it holds, and
   * `error` saying where it came from. Returns undefined if a record appeared meanwhile.
   */
  adopt(
    vmId: string,
    phase: Phase,
    patch: { backend: string; error: string; resources: Resources },
  ): LifecycleRecord | undefined {
    return writeTx(this.db, () => {
      if (this.current(vmId)) return undefined;
      const rec: LifecycleRecord = {
        vm_id: vmId,
        version: this.nextVersion(vmId, "after-rows"),
        backend: patch.backend,
        phase,
        updated_at: nowIso(),
        last_error: patch.error,
        resources: patch.resources,
        cleanup: {},
      };
      this.insert(rec);
      return rec;
    });
  }

  /** Returns whether there was anything to remove. */
  remove(vmId: string): boolean {
    return writeTx(this.db, () => {
      const n = stmt(this.db, "DELETE FROM vm_lifecycle WHERE vm_id = ?").run(vmId).changes;
      return stmt(this.db, "DELETE FROM vm_lifecycle_head WHERE vm_id = ?").run(vmId).changes + n > 0;
    });
  }
}
