import { type Db, nowIso, stmt, writeTx } from "./db.ts";
import type { ProcIdentity } from "./procs.ts";

/** The snapshot_templates table: which templates exist, which are being built, and by whom. */

export type TemplateStatus = "building" | "ready";

export interface TemplateRow {
  key: string;
  image: string;
  dir: string;
  status: TemplateStatus;
  owner_pid: number;
  owner_start_time: number;
  inputs_json: string;
  bytes: number;
  created_at: string;
  last_used_at: string;
}

export class SnapshotStore {
  private readonly db: Db;
  constructor(db: Db) {
    this.db = db;
  }

  /**
   * Records that `owner` starts building template `key` in `dir`. False if a row exists already
   * (built, or being built by someone): one builder per template, whoever inserts first.
   */
  claim(key: string, image: string, dir: string, owner: ProcIdentity, inputs: unknown): boolean {
    return writeTx(this.db, () => {
      if (this.get(key)) return false;
      stmt(
        this.db,
        "INSERT INTO snapshot_templates(key, image, dir, status, owner_pid, owner_start_time, inputs_json, created_at) VALUES (?, ?, ?, 'building', ?, ?, ?, ?)",
      ).run(key, image, dir, owner.pid, owner.start_time, JSON.stringify(inputs), nowIso());
      return true;
    });
  }

  markReady(key: string, bytes: number): void {
    writeTx(this.db, () =>
      stmt(
        this.db,
        "UPDATE snapshot_templates SET status = 'ready', bytes = ?, owner_pid = 0, owner_start_time = 0, last_used_at = ? WHERE key = ?",
      ).run(bytes, nowIso(), key),
    );
  }

  touch(key: string): void {
    writeTx(this.db, () =>
      stmt(this.db, "UPDATE snapshot_templates SET last_used_at = ? WHERE key = ?").run(nowIso(), key),
    );
  }

  get(key: string): TemplateRow | undefined {
    return stmt(this.db, "SELECT * FROM snapshot_templates WHERE key = ?").get(key) as
      | TemplateRow
      | undefined;
  }

  list(): TemplateRow[] {
    return stmt(
      this.db,
      "SELECT * FROM snapshot_templates ORDER BY image, created_at",
    ).all() as TemplateRow[];
  }

  /** Deletes the row; false if it was gone already (a concurrent rm or gc). */
  remove(key: string): boolean {
    return writeTx(
      this.db,
      () => stmt(this.db, "DELETE FROM snapshot_templates WHERE key = ?").run(key).changes > 0,
    );
  }
}
