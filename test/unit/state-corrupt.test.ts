import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { type Paths, paths } from "../../src/api/paths.ts";
import { DbCorruptError } from "../../src/state/db.ts";
import { lockHolders } from "../../src/state/locks.ts";
import { checkState, openState, repairState, stateDbPath } from "../../src/state/store.ts";
import { runCli, tempHome } from "../helpers/cli.ts";

/**
 * A state.db that is emptied, overwritten or cut off from its -wal/-shm — under a process that has it
 * open, as a running VM's owner does — is found at once and named, with how to recover; the recovery
 * moves the file aside (never deletes it) and loses no VM.
 */

const homes: Array<{ cleanup(): void }> = [];
after(() => {
  for (const h of homes) h.cleanup();
});
function freshHome() {
  const h = tempHome();
  homes.push(h);
  return { ...h, p: paths(h.env) };
}

/** A real second process holding state.db open through its own connection, as an owner does. */
async function holdOpen(p: Paths): Promise<ChildProcess & { stop(): void }> {
  const storeUrl = new URL("../../src/state/store.ts", import.meta.url).href;
  const pathsUrl = new URL("../../src/api/paths.ts", import.meta.url).href;
  const script = `
    const { openState } = await import(${JSON.stringify(storeUrl)});
    const { paths } = await import(${JSON.stringify(pathsUrl)});
    const s = openState(paths());
    s.subnets.allocate("vm-0000ffff"); // a write: its WAL now holds frames the file does not
    s.vms.list();
    process.stdout.write("ready\\n");
    process.stdin.resume();
    process.stdin.on("end", () => { s.close(); process.exit(0); });`;
  const c = spawn(process.execPath, ["--input-type=module", "-e", script], {
    env: { ...process.env, MATCHLOCK_HOME: p.home },
    stdio: ["pipe", "pipe", "inherit"],
  });
  await new Promise<void>((resolve, reject) => {
    c.stdout?.on("data", (d: Buffer) => d.toString().includes("ready") && resolve());
    c.on("exit", (code) => reject(new Error(`holder exited ${code}`)));
  });
  return Object.assign(c, { stop: () => c.stdin?.end() });
}

function corruptError(fn: () => unknown): DbCorruptError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof DbCorruptError, `not a DbCorruptError: ${e instanceof Error ? e.stack : e}`);
    return e;
  }
  assert.fail("state.db opened");
}

function seed(p: Paths): void {
  const s = openState(p);
  s.subnets.allocate("vm-0a1b2c3d");
  s.close();
}

describe("a corrupt state.db is a typed error with a way out", () => {
  test("emptied state.db under a live connection: openState fails at once, not after busy_timeout's 10 s", async () => {
    const { p } = freshHome();
    seed(p);
    const holder = await holdOpen(p);
    try {
      truncateSync(stateDbPath(p), 0);
      const t0 = Date.now();
      const e = corruptError(() => openState(p));
      assert.ok(Date.now() - t0 < 1000, `took ${Date.now() - t0} ms`);
      assert.equal(e.code, "DB_CORRUPT");
      assert.match(e.message, /state\.db is unusable: it is empty \(0 bytes\) but its -wal/);
      assert.match(e.hint ?? "", /matchlock gc --repair/);
      assert.equal(checkState(p).status, "corrupt");
    } finally {
      holder.stop();
    }
  });

  test("emptied state.db with its -wal and -shm deleted too, under a live connection: DB_CORRUPT within 2 s, not 'database is locked' after 10", async () => {
    const { p } = freshHome();
    seed(p);
    const holder = await holdOpen(p);
    try {
      rmSync(`${stateDbPath(p)}-wal`);
      rmSync(`${stateDbPath(p)}-shm`);
      truncateSync(stateDbPath(p), 0);
      const t0 = Date.now();
      const e = corruptError(() => openState(p));
      assert.ok(Date.now() - t0 < 4000, `took ${Date.now() - t0} ms`);
      assert.match(e.message, /it is empty \(0 bytes\) but other processes hold it open/);
      assert.match(e.hint ?? "", /matchlock gc --repair/);
      assert.equal(checkState(p).status, "corrupt", "diagnose and gc --repair see it too");
    } finally {
      holder.stop();
    }
  });

  test("state.db deleted or replaced under a live connection (its -wal/-shm still in use): DB_CORRUPT at once", async () => {
    const { p } = freshHome();
    seed(p);
    const holder = await holdOpen(p);
    try {
      rmSync(stateDbPath(p));
      assert.match(
        corruptError(() => openState(p)).message,
        /it was deleted while process \d+ still had it open/,
      );
      assert.equal(existsSync(stateDbPath(p)), false, "nothing was created next to the orphaned -shm");
      // A healthy database moved over it is another file all the same.
      const other = freshHome();
      seed(other.p);
      renameSync(stateDbPath(other.p), stateDbPath(p));
      assert.match(
        corruptError(() => openState(p)).message,
        /it was replaced while process \d+ still had it open/,
      );
      assert.equal(checkState(p).status, "corrupt");
      // The way out the hint gives works while the other process still holds its files.
      const r = repairState(p);
      assert.ok(r.movedTo && existsSync(`${r.movedTo}-shm`), "the -shm went aside with the file");
      const s = openState(p);
      assert.deepEqual(s.vms.list(), []);
      s.close();
    } finally {
      holder.stop();
    }
  });

  test("a process writing through its connection while another opens the same state.db: no false alarm", async () => {
    const { p } = freshHome();
    seed(p);
    const holder = await holdOpen(p);
    try {
      for (let i = 0; i < 20; i++) {
        const s = openState(p);
        s.subnets.allocate(`vm-0000${String(i).padStart(4, "0")}`);
        s.close();
      }
      assert.equal(checkState(p).status, "ok");
    } finally {
      holder.stop();
    }
  });

  test("the checks never cost an open connection of this process its locks (POSIX drops them on any close)", () => {
    const { p } = freshHome();
    seed(p);
    const first = openState(p);
    first.vms.list();
    assert.ok(lockHolders(stateDbPath(p)).has(process.pid));
    for (let i = 0; i < 5; i++) {
      openState(p).close();
      assert.equal(checkState(p).status, "ok");
    }
    assert.ok(lockHolders(stateDbPath(p)).has(process.pid), "the first connection lost its SHARED lock");
    assert.ok(lockHolders(`${stateDbPath(p)}-shm`).has(process.pid));
    first.close();
  });

  test("state.db overwritten with random bytes or text: DB_CORRUPT naming the file", () => {
    for (const junk of [randomBytes(8192), Buffer.from("not a database\n")]) {
      const { p } = freshHome();
      seed(p);
      writeFileSync(stateDbPath(p), junk);
      const e = corruptError(() => openState(p));
      assert.equal(e.path, stateDbPath(p));
      assert.match(e.message, /is unusable: it is not an SQLite database/);
    }
  });

  test("damaged pages behind a valid file header: quick_check finds them", () => {
    const { p } = freshHome();
    const s = openState(p);
    for (let i = 0; i < 200; i++) s.subnets.allocate(`vm-${i.toString(16).padStart(8, "0")}`);
    s.db.pragma("wal_checkpoint(TRUNCATE)");
    s.close();
    const bytes = readFileSync(stateDbPath(p));
    assert.ok(bytes.length > 4 * 4096);
    bytes.fill(0xa5, 4096); // every page but the first (the header and the schema)
    writeFileSync(stateDbPath(p), bytes);
    const h = checkState(p);
    assert.equal(h.status, "corrupt", JSON.stringify(h));
  });

  test("a new, still empty state.db (0 bytes, no -wal/-shm) is not mistaken for a corrupt one", () => {
    const { p } = freshHome();
    mkdirSync(p.home, { recursive: true });
    writeFileSync(stateDbPath(p), "");
    const s = openState(p);
    assert.deepEqual(s.vms.list(), []);
    s.close();
    assert.equal(checkState(p).status, "ok");
  });
});

describe("matchlock on a corrupt state.db", () => {
  test("garbage state.db: list, kill --all and gc answer at once with one line and the fix; gc --repair moves it aside and matchlock starts afresh", async () => {
    const h = freshHome();
    seed(h.p);
    const junk = randomBytes(20_000);
    writeFileSync(stateDbPath(h.p), junk);
    for (const args of [["list"], ["kill", "--all"], ["gc"], ["prune"], ["get", "vm-0a1b2c3d"]]) {
      const r = await runCli(args, { env: h.env });
      assert.equal(r.code, 1, `${args}: ${r.stderr}`);
      assert.ok(r.ms < 5000, `${args} took ${r.ms} ms`);
      const lines = r.stderr.trimEnd().split("\n");
      assert.equal(
        lines[0],
        `matchlock: ${stateDbPath(h.p)} is unusable: it is not an SQLite database (no SQLite header: the file was overwritten)`,
      );
      assert.match(lines[1] ?? "", /^ {2}run `matchlock gc --repair`: it moves state\.db aside/);
      assert.ok(!/\n\s+at /.test(r.stderr), `a stack trace: ${r.stderr}`);
    }

    const d = await runCli(["diagnose", "--json"], { env: h.env, timeoutMs: 300_000 });
    assert.equal(d.code, 1);
    const check = (JSON.parse(d.stdout.toString()) as { checks: Array<Record<string, string>> }).checks.find(
      (c) => c.name === "state db",
    );
    assert.equal(check?.status, "fail");
    assert.match(check?.detail ?? "", /not an SQLite database/);
    assert.match(check?.fix ?? "", /matchlock gc --repair/);

    const repair = await runCli(["gc", "--repair"], { env: h.env });
    assert.equal(repair.code, 0, repair.stderr);
    const aside = /moved it aside to (\S+);/.exec(repair.stdout.toString())?.[1] as string;
    assert.ok(aside, repair.stdout.toString());
    assert.match(aside, /state\.db\.corrupt-[0-9T-]+Z$/);
    assert.deepEqual(readFileSync(aside), junk, "the user's file is kept byte for byte");
    const list = await runCli(["list"], { env: h.env });
    assert.equal(list.code, 0, list.stderr);
    assert.equal(list.stdout.toString().trim(), "ID  STATUS  IMAGE  CREATED  PID");
    const again = await runCli(["gc", "--repair"], { env: h.env });
    assert.match(again.stdout.toString(), /is healthy: nothing to repair/);
    assert.equal(readdirSync(h.home).filter((f) => f.includes("corrupt")).length, 1);
  });

  test("emptied state.db under a live owner: list answers at once; gc --repair rebuilds the live VM's record from its dir, and gc leaves it running", async () => {
    const h = freshHome();
    seed(h.p);
    const owner = await holdOpen(h.p);
    try {
      // A VM dir as its owner leaves it: runtime.json names the owner, a disk and sockets lie in it.
      const dir = join(h.p.vms, "vm-0badc0de");
      mkdirSync(dir, { recursive: true });
      const { procStartTime } = await import("../../src/state/procs.ts");
      const ownerId = { pid: owner.pid as number, start_time: procStartTime(owner.pid as number) as number };
      writeFileSync(
        join(dir, "runtime.json"),
        JSON.stringify({ owner: ownerId, relay_socket: join(dir, "relay.sock") }),
      );
      writeFileSync(join(dir, "upper.ext4"), "");
      writeFileSync(join(dir, "agent.sock"), "");
      truncateSync(stateDbPath(h.p), 0);

      const list = await runCli(["list"], { env: h.env });
      assert.equal(list.code, 1);
      assert.ok(list.ms < 5000, `list took ${list.ms} ms`);
      assert.match(list.stderr, /state\.db is unusable: it is empty \(0 bytes\)/);
      assert.ok(!/database is locked/.test(list.stderr));

      const repair = await runCli(["gc", "--repair"], { env: h.env });
      assert.equal(repair.code, 0, repair.stderr);
      assert.match(
        repair.stdout.toString(),
        new RegExp(
          `vm-0badc0de\\s+skipped\\s+running \\(owner pid ${ownerId.pid} is alive\\); record rebuilt from its VM dir`,
        ),
      );
      const rows = (await runCli(["list"], { env: h.env })).stdout.toString();
      assert.match(rows, new RegExp(`vm-0badc0de\\s+running\\s+unknown\\s+.*${ownerId.pid}`));
      const inspect = JSON.parse(
        (await runCli(["inspect", "vm-0badc0de"], { env: h.env })).stdout.toString(),
      );
      assert.deepEqual(inspect.lifecycle.resources.owner, ownerId);
      assert.deepEqual(inspect.lifecycle.resources.disks, [join(dir, "upper.ext4")]);
      assert.ok(existsSync(join(dir, "upper.ext4")), "a running VM's disk is left alone");
    } finally {
      owner.stop();
    }
  });

  test("a VM dir with no record and no runtime.json: gc finds its QEMU through /proc, rebuilds the record and reclaims it", async () => {
    const h = freshHome();
    const dir = join(h.p.vms, "vm-0dd0c0de");
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "upper.ext4"), "");
    writeFileSync(join(dir, "console.log"), "booted\n");
    // A real QEMU whose command line names the dir, as ours do; its parent (this test) is no matchlock owner.
    const qemu = spawn(
      "qemu-system-x86_64",
      ["-machine", "none", "-S", "-nodefaults", "-display", "none", "-pidfile", join(dir, "qemu.pid")],
      { stdio: "ignore" },
    );
    const exited = new Promise((resolve) => qemu.on("exit", resolve));
    try {
      for (let i = 0; i < 100 && !existsSync(join(dir, "qemu.pid")); i++)
        await new Promise((r) => setTimeout(r, 50));
      const gc = await runCli(["gc"], { env: h.env });
      assert.equal(gc.code, 0, gc.stdout.toString() + gc.stderr);
      assert.match(
        gc.stdout.toString(),
        /vm-0dd0c0de\s+cleaned\s+was running; record rebuilt from its VM dir/,
      );
      await exited;
      assert.equal(qemu.signalCode, "SIGKILL");
      assert.equal(existsSync(join(dir, "upper.ext4")), false);
      assert.ok(existsSync(join(dir, "console.log")), "gc keeps the logs");
      const rm = await runCli(["rm", "vm-0dd0c0de"], { env: h.env });
      assert.equal(rm.code, 0, rm.stderr);
      assert.equal(existsSync(dir), false);
    } finally {
      qemu.kill("SIGKILL");
    }
  });
});
