import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  openSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
} from "node:fs";
import { dirname } from "node:path";
import Database from "better-sqlite3";
import { MatchlockError, messageOf } from "../api/errors.ts";
import { lockHolders } from "./locks.ts";

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

/**
 * A database file SQLite cannot use: truncated, overwritten, or cut off from its write-ahead log.
 * The hint says how to recover; the file itself is never deleted by us.
 */
export class DbCorruptError extends MatchlockError {
  readonly path: string;
  constructor(path: string, problem: string, hint: string, cause?: unknown) {
    super("DB_CORRUPT", `${path} is unusable: ${problem}`, {
      hint,
      ...(cause === undefined ? {} : { cause }),
    });
    this.name = "DbCorruptError";
    this.path = path;
  }
}

export interface OpenOptions {
  /** What to tell the user when the file turns out corrupt (each database recovers its own way). */
  recoverHint?: string;
}

const BUSY_TIMEOUT_MS = 10_000;
const SQLITE_MAGIC = "SQLite format 3\0";

export function openDb(path: string, modules: ModuleMigrations[], opts: OpenOptions = {}): Db {
  const hint =
    opts.recoverHint ??
    `move it aside with its -wal and -shm files (mv ${path} ${path}.corrupt; same for ${path}-wal, -shm) and retry: it is created anew`;
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  // Before SQLite touches it: an emptied file would otherwise wait out busy_timeout (see fileProblem).
  const problem = fileProblem(path);
  if (problem) throw new DbCorruptError(path, problem, hint);
  let db: Db;
  try {
    db = new Database(path);
  } catch (e) {
    throw new MatchlockError("INTERNAL", `cannot open ${path}: ${messageOf(e)}`, { cause: e });
  }
  try {
    setJournalMode(db, path, hint);
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
  } catch (e) {
    if (db.open) db.close();
    throw asDbError(e, path, hint);
  }
}

/** Creation races end in milliseconds; an emptied file held open by others never ends. */
const NEW_FILE_BUSY_MS = 2000;

/**
 * WAL mode. On a 0-byte file (new, or emptied with its -wal/-shm deleted too) this writes the header
 * under an EXCLUSIVE lock: another process creating the file at the same time holds it for a moment,
 * an owner of the emptied file holds its SHARED lock forever. So wait briefly, and if the file is
 * still empty when the wait runs out, say what it is instead of "database is locked".
 */
function setJournalMode(db: Db, path: string, hint: string): void {
  const empty = statSync(path).size === 0;
  db.pragma(`busy_timeout = ${empty ? NEW_FILE_BUSY_MS : BUSY_TIMEOUT_MS}`);
  try {
    db.pragma("journal_mode = WAL");
  } catch (e) {
    const busy = ((e as { code?: string }).code ?? "").startsWith("SQLITE_BUSY");
    if (busy && empty && statSync(path).size === 0) throw new DbCorruptError(path, EMPTY_HELD, hint, e);
    throw e;
  } finally {
    db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  }
}

/**
 * Why the file at `path` cannot be a healthy database, found without asking SQLite for a lock; or
 * undefined when it may be one (or does not exist yet).
 *
 * The emptied file is the case that matters: a WAL-mode connection (a running VM's owner) holds a
 * SHARED lock on state.db for as long as it is open. A 0-byte file has no header, so a newcomer sees
 * a new database in rollback mode, and its `journal_mode = WAL` must write the header under an
 * EXCLUSIVE lock that the owner's SHARED lock never yields: it waits out busy_timeout, then fails
 * "database is locked". SQLite itself writes the header before it creates -wal and -shm, so a 0-byte
 * file next to them was truncated after the fact.
 */
export function fileProblem(path: string): string | undefined {
  const orphaned = orphanedLogs(path);
  if (orphaned) return orphaned;
  let size: number;
  try {
    const st = statSync(path);
    if (!st.isFile()) return "it is not a regular file";
    size = st.size;
  } catch {
    return undefined; // missing: SQLite creates it
  }
  if (size === 0) {
    const logs = ["-wal", "-shm"].filter((x) => existsSync(`${path}${x}`));
    if (logs.length === 0) return undefined; // created, header not written yet: a new database
    const still = logs.length > 1 ? "files are still there" : "file is still there";
    return `it is empty (0 bytes) but its ${logs.join(" and ")} ${still}: it was truncated, probably while a matchlock process had it open`;
  }
  // Closing any descriptor of a file drops every POSIX lock this process holds on it, SQLite's
  // included: so read the header ourselves only when no connection of ours holds a lock on it.
  if (lockHolders(path).has(process.pid)) return undefined;
  if (readHead(path, SQLITE_MAGIC.length) !== SQLITE_MAGIC)
    return "it is not an SQLite database (no SQLite header: the file was overwritten)";
  return undefined;
}

/**
 * A -shm in use by processes that do not have the database file itself open: the file was deleted
 * or replaced under them. A newcomer would share their WAL index while writing another file's log,
 * which fails later ("disk I/O error") or worse; SQLite cannot tell, the locks can (locks.ts).
 */
function orphanedLogs(path: string): string | undefined {
  // /proc/locks is not read atomically and processes open and close all the time: only a process
  // seen holding the -shm but not the file in several snapshots is a real stranger.
  let strangers: number[] = [];
  for (let look = 0; look < 3; look++) {
    if (look > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10);
    const dbHolders = lockHolders(path);
    const seen = [...lockHolders(`${path}-shm`)].filter((pid) => !dbHolders.has(pid));
    strangers = look === 0 ? seen : strangers.filter((pid) => seen.includes(pid));
    if (strangers.length === 0) return undefined;
  }
  const what = existsSync(path) ? "it was replaced" : "it was deleted";
  return `${what} while process ${strangers.join(", ")} still had it open: its -wal/-shm belong to the old file`;
}

function readHead(path: string, n: number): string {
  const buf = Buffer.alloc(n);
  const fd = openSync(path, "r");
  try {
    return buf.subarray(0, readSync(fd, buf, 0, n, 0)).toString("latin1");
  } finally {
    closeSync(fd);
  }
}

/** SQLite's words for a file it cannot use as a database (as opposed to busy, full, read-only…). */
export function isCorruption(e: unknown): boolean {
  const code = (e as { code?: unknown })?.code;
  if (typeof code !== "string") return false;
  return /^SQLITE_(CORRUPT|NOTADB)/.test(code) || code === "SQLITE_IOERR_SHORT_READ";
}

function corruptionProblem(e: unknown): string {
  const code = (e as { code?: string }).code ?? "";
  if (code.startsWith("SQLITE_NOTADB")) return "it is not an SQLite database";
  if (code === "SQLITE_IOERR_SHORT_READ")
    return "its write-ahead log (-wal, -shm) belongs to another copy of the file: it was deleted or replaced while a matchlock process had it open";
  return `it is corrupt (SQLite: ${messageOf(e)})`;
}

/** `e` as a DbCorruptError if SQLite found the file unusable; any other error unchanged. */
export function asDbError(e: unknown, path: string, hint: string): unknown {
  if (e instanceof DbCorruptError || !isCorruption(e)) return e;
  return new DbCorruptError(path, corruptionProblem(e), hint, e);
}

export type DbHealth =
  | { status: "missing" }
  | { status: "ok"; detail: string }
  | { status: "corrupt"; problem: string };

/**
 * A full check for `diagnose` and repair: the file checks, then SQLite's `quick_check` (every page
 * and index). Opens without migrations, so a healthy database is left as it was.
 */
export function checkDb(path: string): DbHealth {
  if (!existsSync(path)) return { status: "missing" };
  const problem = fileProblem(path) ?? emptyButHeld(path);
  if (problem) return { status: "corrupt", problem };
  let db: Db | undefined;
  try {
    db = new Database(path, { fileMustExist: true });
    db.pragma("busy_timeout = 2000");
    const rows = db.pragma("quick_check(10)") as Array<{ quick_check: string }>;
    const found = rows.map((r) => r.quick_check).filter((r) => r !== "ok");
    if (found.length > 0) return { status: "corrupt", problem: `quick_check: ${found.join("; ")}` };
    return { status: "ok", detail: "quick_check ok" };
  } catch (e) {
    if (isCorruption(e)) return { status: "corrupt", problem: corruptionProblem(e) };
    throw e;
  } finally {
    db?.close();
  }
}

const EMPTY_HELD = "it is empty (0 bytes) but other processes hold it open: it was truncated under them";

/**
 * What setJournalMode finds on open, found without opening: a 0-byte file that other processes
 * still hold after the time a creator needs to write the header (quick_check calls an empty file fine).
 */
function emptyButHeld(path: string): string | undefined {
  const deadline = Date.now() + NEW_FILE_BUSY_MS;
  for (;;) {
    if (statSync(path).size > 0) return undefined;
    if ([...lockHolders(path)].every((pid) => pid === process.pid)) return undefined;
    if (Date.now() >= deadline) return EMPTY_HELD;
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
  }
}

/**
 * Renames a database and its -wal/-shm/-journal to `<path>.corrupt-<time>[-wal…]`, so SQLite starts
 * afresh at `path` and the old files stay together for inspection (`sqlite3 <aside> .recover`).
 * The logs go first: a process opening `path` meanwhile must not pair a new file with the old logs,
 * which a live process may still be using. Returns the new name.
 */
export function moveAside(path: string): string {
  const stamp = new Date().toISOString().replace(/[:.]/g, "-");
  let aside = `${path}.corrupt-${stamp}`;
  if (existsSync(aside)) aside = `${aside}-${process.pid}`;
  for (const x of ["-wal", "-shm", "-journal"]) {
    if (existsSync(`${path}${x}`)) renameSync(`${path}${x}`, `${aside}${x}`);
  }
  if (existsSync(path)) renameSync(path, aside);
  return aside;
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
