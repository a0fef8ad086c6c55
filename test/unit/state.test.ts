import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { parseSandboxConfig } from "../../src/api/config.ts";
import { paths } from "../../src/api/paths.ts";
import { cleanupResources } from "../../src/sandbox/cleanup.ts";
import { MigrationError, openDb } from "../../src/state/db.ts";
import { canTransition, PHASES, TRANSITIONS } from "../../src/state/lifecycle.ts";
import { isAlive, killVerified, procStartTime } from "../../src/state/procs.ts";
import { LIFECYCLE_MIGRATIONS, STATE_MIGRATIONS } from "../../src/state/schema.ts";
import { openState, stateDbPath } from "../../src/state/store.ts";

/** state.db: schema compatibility, the phase machine, migrations, concurrency and process identity. */

const scratch = mkdtempSync(join(tmpdir(), "matchlock-state-"));
after(() => rmSync(scratch, { recursive: true, force: true }));
let n = 0;
const freshPaths = () =>
  paths({ MATCHLOCK_HOME: join(scratch, `home${n++}`), MATCHLOCK_CACHE: join(scratch, "cache") });

function sqlite(db: string, sql: string): string {
  const r = spawnSync("sqlite3", [db, sql], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
}

function fileHash(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

describe("state.db", () => {
  test("Matchlock's tables, columns and pragmas", () => {
    const p = freshPaths();
    const s = openState(p);
    assert.equal(s.db.pragma("journal_mode", { simple: true }), "wal");
    assert.equal(s.db.pragma("foreign_keys", { simple: true }), 1);
    assert.ok((s.db.pragma("busy_timeout", { simple: true }) as number) > 0);
    const cols = (t: string) =>
      (s.db.pragma(`table_info(${t})`) as Array<{ name: string }>).map((c) => c.name);
    assert.deepEqual(cols("vms"), [
      "id",
      "pid",
      "status",
      "image",
      "config_json",
      "created_at",
      "updated_at",
    ]);
    assert.deepEqual(cols("subnet_allocations"), [
      "vm_id",
      "octet",
      "gateway_ip",
      "guest_ip",
      "subnet",
      "created_at",
    ]);
    assert.deepEqual(cols("vm_lifecycle"), [
      "vm_id",
      "version",
      "backend",
      "phase",
      "updated_at",
      "last_error",
      "resources_json",
      "cleanup_json",
    ]);
    assert.deepEqual(cols("vm_lifecycle_head"), ["vm_id", "last_version"]);
    assert.deepEqual(cols("schema_migrations"), ["module", "version", "name", "applied_at"]);
    s.close();
  });

  test("the documented sqlite3 diagnostic works verbatim", () => {
    const p = freshPaths();
    const s = openState(p);
    s.vms.insert("vm-0000abcd", process.pid, "img", parseSandboxConfig({}));
    s.lifecycle.transition("vm-0000abcd", "creating", { backend: "qemu" });
    s.lifecycle.transition("vm-0000abcd", "create_failed", { error: "boom" });
    s.close();
    const out = sqlite(
      stateDbPath(p),
      'select vm_id,version,phase,updated_at,last_error from vm_lifecycle where vm_id="vm-0000abcd" order by version;',
    );
    const lines = out.trim().split("\n");
    assert.equal(lines.length, 2);
    assert.match(lines[0] as string, /^vm-0000abcd\|1\|creating\|.+\|$/);
    assert.match(lines[1] as string, /^vm-0000abcd\|2\|create_failed\|.+\|boom$/);
  });

  test("the phase machine allows exactly PROTOCOLS.md's transitions, and self-transitions", () => {
    assert.ok(canTransition("creating", "created"));
    assert.ok(canTransition("running", "running"));
    assert.ok(!canTransition("running", "created"));
    assert.ok(!canTransition("cleaned", "cleaning"));
    assert.ok(!canTransition("stopped", "running"));
    for (const from of PHASES) for (const to of TRANSITIONS[from]) assert.ok(PHASES.includes(to));
    const s = openState(freshPaths());
    s.lifecycle.transition("vm-00000001", "creating", { resources: { vm_dir: "/x", disks: ["/x/a"] } });
    s.lifecycle.transition("vm-00000001", "created");
    const rec = s.lifecycle.transition("vm-00000001", "starting", { resources: { sockets: ["/x/s"] } });
    assert.equal(rec.version, 3);
    assert.deepEqual(
      rec.resources,
      { vm_dir: "/x", disks: ["/x/a"], sockets: ["/x/s"] },
      "resources accumulate",
    );
    assert.throws(
      () => s.lifecycle.transition("vm-00000001", "stopped"),
      /cannot go from starting to stopped/,
    );
    assert.throws(
      () => s.lifecycle.transition("vm-00000002", "running"),
      /cannot go from creating to running/,
    );
    assert.deepEqual(
      s.lifecycle.history("vm-00000001").map((r) => r.phase),
      ["creating", "created", "starting"],
      "append-only history",
    );
    s.close();
  });

  test("the error that ended a VM stays on its current record through clean-up; a new phase clears it otherwise", () => {
    const s = openState(freshPaths());
    const id = "vm-00000003";
    for (const phase of ["creating", "created", "starting", "running", "stopping"] as const)
      s.lifecycle.transition(id, phase);
    s.lifecycle.transition(id, "stop_failed", { error: "the VM died: QEMU was killed by SIGKILL" });
    s.lifecycle.transition(id, "cleaning");
    assert.equal(s.lifecycle.transition(id, "cleaned").last_error, "the VM died: QEMU was killed by SIGKILL");
    assert.equal(s.lifecycle.current(id)?.last_error, "the VM died: QEMU was killed by SIGKILL");
    const ok = "vm-00000004";
    for (const phase of ["creating", "created", "starting"] as const) s.lifecycle.transition(ok, phase);
    assert.equal(s.lifecycle.transition(ok, "running").last_error, "");
    s.close();
  });

  test("secret values are never written to state.db", () => {
    const p = freshPaths();
    const s = openState(p);
    const secret = "sk-live-VERY-SECRET-0123456789";
    const cfg = parseSandboxConfig({
      network: { secrets: { API_KEY: { value: secret, hosts: ["api.example.com"], placeholder: "PH" } } },
    });
    s.vms.insert("vm-00000003", process.pid, "img", cfg);
    const stored = JSON.parse(s.vms.get("vm-00000003")?.config_json ?? "{}");
    assert.deepEqual(stored.network.secrets, { API_KEY: { hosts: ["api.example.com"], placeholder: "PH" } });
    s.db.pragma("wal_checkpoint(TRUNCATE)");
    s.close();
    const bytes = readFileSync(stateDbPath(p)).toString("latin1");
    assert.ok(!bytes.includes(secret), "the secret value is in the database file");
  });

  test("a failing migration rolls back, leaves the database byte-for-byte as it was, and names itself", () => {
    const p = freshPaths();
    const s = openState(p);
    s.vms.insert("vm-00000004", process.pid, "img", parseSandboxConfig({}));
    s.db.pragma("wal_checkpoint(TRUNCATE)");
    s.close();
    const before = fileHash(stateDbPath(p));
    const broken = {
      module: "state",
      migrations: [
        ...STATE_MIGRATIONS.migrations,
        {
          version: 3,
          name: "add_broken_things",
          sql: "CREATE TABLE half_done(x); INSERT INTO no_such_table VALUES (1);",
        },
      ],
    };
    assert.throws(
      () => openDb(stateDbPath(p), [broken, LIFECYCLE_MIGRATIONS]),
      (e: Error) =>
        e instanceof MigrationError && /state migration 3 \(add_broken_things\) failed/.test(e.message),
    );
    assert.equal(fileHash(stateDbPath(p)), before);
    const again = openState(p);
    assert.equal(again.vms.get("vm-00000004")?.image, "img");
    const tables = again.db.prepare("SELECT name FROM sqlite_master WHERE name = 'half_done'").all();
    assert.deepEqual(tables, []);
    again.close();
  });

  test("50 processes allocating subnets at once: no duplicate, none lost", async () => {
    const p = freshPaths();
    openState(p).close();
    const storeUrl = new URL("../../src/state/store.ts", import.meta.url).href;
    const pathsUrl = new URL("../../src/api/paths.ts", import.meta.url).href;
    const script = `
      const { openState } = await import(${JSON.stringify(storeUrl)});
      const { paths } = await import(${JSON.stringify(pathsUrl)});
      const s = openState(paths());
      const a = s.subnets.allocate(process.argv[1]);
      process.stdout.write(String(a.octet));
      s.close();`;
    const runs = Array.from({ length: 50 }, (_, i) => {
      const id = `vm-${String(i).padStart(8, "0")}`;
      return new Promise<string>((resolve, reject) => {
        const c = spawn(process.execPath, ["--input-type=module", "-e", script, id], {
          env: { ...process.env, MATCHLOCK_HOME: p.home },
        });
        let out = "";
        let err = "";
        c.stdout.on("data", (d: Buffer) => (out += d.toString()));
        c.stderr.on("data", (d: Buffer) => (err += d.toString()));
        c.on("close", (code) => (code === 0 ? resolve(out) : reject(new Error(err))));
      });
    });
    const octets = (await Promise.all(runs)).map(Number);
    assert.equal(new Set(octets).size, 50, `duplicates in ${octets.join(",")}`);
    const s = openState(p);
    assert.equal(s.subnets.list().length, 50);
    s.close();
  });
});

describe("process identity", () => {
  test("PID reuse: a live process with the recorded pid but another start time is not ours and is not killed", async () => {
    const victim = spawn("sleep", ["60"]);
    try {
      const pid = victim.pid as number;
      const start = procStartTime(pid) as number;
      assert.ok(isAlive({ pid, start_time: start }));
      const recorded = { pid, start_time: start - 1 }; // what we would have recorded for a former owner of the pid
      assert.equal(isAlive(recorded), false);
      assert.equal(killVerified(recorded, "SIGKILL"), false);
      // gc's cleanup of a VM whose record names this pid as its QEMU leaves it alone too.
      const p = freshPaths();
      const s = openState(p);
      const r = await cleanupResources(
        s,
        "vm-00000005",
        { vm_dir: join(p.vms, "vm-00000005"), qemu: { ...recorded, cmdline_marker: "x" } },
        { removeDir: true },
      );
      s.close();
      assert.equal(r.cleanup.qemu_process?.status, "skipped");
      assert.equal(procStartTime(pid), start, "the unrelated process is still alive");
    } finally {
      victim.kill("SIGKILL");
    }
  });

  test("a zombie or missing pid is not alive", () => {
    assert.equal(isAlive({ pid: 0, start_time: 0 }), false);
    assert.equal(isAlive({ pid: 2 ** 22 + 12345, start_time: 1 }), false);
    assert.equal(procStartTime(-1), undefined);
  });
});
