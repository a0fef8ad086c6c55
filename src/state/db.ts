import { copyFileSync, existsSync, mkdirSync, rmSync } from "node:fs";
import { dirname } from "node:path";
import Database from "better-sqlite3";
import { MatchlockError, messageOf } from "../api/errors.ts";

/**
 * Opening a matchlock SQLite database (state.db, metadata.db): the pragmas of PROTOCOLS.md §4 and a
 * migration runner shared by every module. Many processes use a database at once, so transactions
 * are short, `busy_timeout` waits for locks, and writers take the lock up front (BEGIN IMMEDIATE).
 */

export type Db = Database.Database;

export interface Migration {
  version: number;
  name: string;
  sql: string;
}

export interface ModuleMigrations {
  module: string;
  migrations: Migration[];
}

export class MigrationError extends MatchlockError {
  constructor(message: string, cause: unknown) {
    super("INTERNAL", message, { cause });
    this.name = "MigrationError";
  }
}

const BUSY_TIMEOUT_MS = 10_000;

export function openDb(path: string, modules: ModuleMigrations[]): Db {
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  let db: Db;
  try {
    db = new Database(path);
  } catch (e) {
    throw new MatchlockError("INTERNAL", `cannot open ${path}: ${messageOf(e)}`, { cause: e });
  }
  db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  db.pragma("journal_mode = WAL");
  db.pragma("synchronous = NORMAL");
  db.pragma("foreign_keys = ON");
  db.exec(`CREATE TABLE IF NOT EXISTS schema_migrations (
    module TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    PRIMARY KEY (module, version)
  )`);
  for (const m of modules) db = migrate(db, path, m);
  return db;
}

function applied(db: Db, module: string): Set<number> {
  const rows = db.prepare("SELECT version FROM schema_migrations WHERE module = ?").all(module) as Array<{
    version: number;
  }>;
  return new Set(rows.map((r) => r.version));
}

/**
 * Applies the pending migrations of one module, each in its own transaction, after a `VACUUM INTO`
 * backup. A failed migration rolls back; if the database is then not intact, the backup is copied
 * back. Either way the error names the migration. Returns the (possibly reopened) handle.
 */
function migrate(db: Db, path: string, m: ModuleMigrations): Db {
  const pending = () => {
    const done = applied(db, m.module);
    return m.migrations.filter((x) => !done.has(x.version)).sort((a, b) => a.version - b.version);
  };
  if (pending().length === 0) return db;
  const backup = `${path}.backup-${m.module}-${Date.now()}-${process.pid}`;
  db.exec(`VACUUM INTO '${backup.replaceAll("'", "''")}'`);
  try {
    for (const mig of pending()) {
      const apply = db.transaction(() => {
        // Another process may have applied it since we looked: check again under the write lock.
        const again = db
          .prepare("SELECT 1 FROM schema_migrations WHERE module = ? AND version = ?")
          .get(m.module, mig.version);
        if (again) return;
        db.exec(mig.sql);
        db.prepare(
          "INSERT INTO schema_migrations(module, version, name, applied_at) VALUES (?, ?, ?, ?)",
        ).run(m.module, mig.version, mig.name, new Date().toISOString());
      });
      try {
        apply.immediate();
      } catch (e) {
        const intact = (db.pragma("quick_check", { simple: true }) as string) === "ok";
        let restored = "rolled back";
        if (!intact) {
          db.close();
          copyFileSync(backup, path);
          rmSync(`${path}-wal`, { force: true });
          rmSync(`${path}-shm`, { force: true });
          db = new Database(path);
          db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
          restored = `restored from ${backup}`;
        }
        throw new MigrationError(
          `${m.module} migration ${mig.version} (${mig.name}) failed: ${messageOf(e)}; the database was ${restored}`,
          e,
        );
      }
    }
  } catch (e) {
    if (e instanceof MigrationError) {
      db.close();
      throw e;
    }
    throw e;
  }
  if (existsSync(backup)) rmSync(backup, { force: true });
  return db;
}

/** Runs `fn` in a write transaction taken up front, retrying when SQLite still reports busy. */
export function writeTx<T>(db: Db, fn: () => T): T {
  const tx = db.transaction(fn);
  for (let attempt = 0; ; attempt++) {
    try {
      return tx.immediate();
    } catch (e) {
      const code = (e as { code?: string }).code ?? "";
      if (!code.startsWith("SQLITE_BUSY") || attempt >= 20) throw e;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20 + Math.random() * 80);
    }
  }
}

export function nowIso(): string {
  return new Date().toISOString();
}

const statements = new WeakMap<Db, Map<string, Database.Statement>>();

/** A prepared statement, compiled once per connection (preparing costs more than running most of ours). */
export function stmt(db: Db, sql: string): Database.Statement {
  let cache = statements.get(db);
  if (!cache) {
    cache = new Map();
    statements.set(db, cache);
  }
  let s = cache.get(sql);
  if (!s) {
    s = db.prepare(sql);
    cache.set(sql, s);
  }
  return s;
}
