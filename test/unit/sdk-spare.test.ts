import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { Client } from "../../src/sdk/index.ts";
import { SparePool, type SpawnSpec, spawnKey } from "../../src/sdk/spare.ts";

/** The SDK's pool of spare rpc children, with a stand-in rpc (no VM needed). */

const dir = mkdtempSync(join(tmpdir(), "matchlock-spare-"));
const pool = new SparePool({ max: 2, stderrTail: 64 });
after(() => {
  pool.clear();
  rmSync(dir, { recursive: true, force: true });
});

// Says hello on stderr, echoes each line, ignores SIGTERM (only EOF ends it, as `matchlock rpc`).
const fake = join(dir, "fake-rpc.mjs");
writeFileSync(
  fake,
  `import { createInterface } from "node:readline";
   process.on("SIGTERM", () => {});
   process.stderr.write("x".repeat(100) + "hello from " + process.pid + "\\n");
   for await (const line of createInterface({ input: process.stdin })) process.stdout.write("echo " + line + "\\n");`,
);

function spec(extra: Partial<SpawnSpec> = {}): SpawnSpec {
  return { cmd: process.execPath, args: [fake], env: { PATH: process.env.PATH ?? "" }, cwd: dir, ...extra };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

const gone = (pid: number) =>
  !existsSync(`/proc/${pid}`) || /\) [ZX] /.test(readFileSync(`/proc/${pid}/stat`, "latin1"));

describe("SparePool", () => {
  test("the spare filled for a spec is the child taken for it, with what it printed while idle", async () => {
    pool.fill(spec());
    const pid = pool.pidOf(spec());
    assert.ok(pid);
    await sleep(500);
    const a = pool.take(spec());
    assert.equal(a?.child.pid, pid);
    assert.equal(pool.size, 0);
    // The tail is kept, bounded: the end of the line, not its start.
    assert.equal(a?.stderrTail.length, 64);
    assert.match(a?.stderrTail ?? "", new RegExp(`hello from ${pid}\\n$`));
    const child = a?.child;
    assert.ok(child);
    const out = new Promise<string>((r) => child.stdout.once("data", (d: Buffer) => r(d.toString())));
    child.stdin.write("ping\n");
    assert.equal(await out, "echo ping\n");
    child.stdin.end();
    await new Promise((r) => child.once("close", r));
    assert.equal(pool.take(spec()), undefined, "taken once");
  });

  test("one spare per spec; a spec differing in env, args or cwd does not get it", () => {
    pool.fill(spec());
    const pid = pool.pidOf(spec());
    pool.fill(spec());
    assert.equal(pool.pidOf(spec()), pid);
    assert.equal(pool.size, 1);
    assert.equal(pool.take(spec({ env: { PATH: "/x" } })), undefined);
    assert.equal(pool.take(spec({ args: [fake, "rpc"] })), undefined);
    assert.equal(pool.take(spec({ cwd: tmpdir() })), undefined);
    assert.equal(pool.pidOf(spec()), pid, "still there for its own spec");
    pool.clear();
  });

  test("the key does not depend on the order of the env", () => {
    assert.equal(
      spawnKey(spec({ env: { A: "1", B: "2" } })),
      spawnKey(spec({ env: { B: "2", A: "1", C: undefined } })),
    );
  });

  test("past max, the oldest spare is ended", async () => {
    const p = new SparePool({ max: 2, stderrTail: 64 });
    const specs = ["1", "2", "3"].map((n) => spec({ env: { N: n } }));
    for (const s of specs) p.fill(s);
    const oldest = p.pidOf(specs[0] as SpawnSpec);
    assert.equal(oldest, undefined, "the first one left");
    assert.equal(p.size, 2);
    p.clear();
  });

  test("a spare killed a moment ago is not taken (Node has not seen its exit yet)", async () => {
    pool.fill(spec());
    const pid = pool.pidOf(spec()) as number;
    await sleep(300);
    process.kill(pid, "SIGKILL");
    // No await in between: the child's exit event cannot have run.
    const t = Date.now();
    while (!gone(pid) && Date.now() - t < 2000) {}
    assert.equal(pool.take(spec()), undefined);
    assert.equal(pool.size, 0);
  });

  test("a spare that dies while idle leaves the pool", async () => {
    pool.fill(spec());
    const pid = pool.pidOf(spec()) as number;
    process.kill(pid, "SIGKILL");
    await until("the pool to drop it", () => pool.size === 0);
  });

  test("a spare that cannot start is dropped", async () => {
    const p = new SparePool({ max: 2, stderrTail: 64 });
    p.fill(spec({ cmd: join(dir, "no-such-binary") }));
    await until("the spawn error", () => p.size === 0);
    assert.equal(p.take(spec({ cmd: join(dir, "no-such-binary") })), undefined);
  });

  test("an idle spare does not keep the program alive, and ends on EOF when the program is gone", async () => {
    const pidFile = join(dir, "spare.pid");
    const program = `
      import { SparePool } from ${JSON.stringify(new URL("../../src/sdk/spare.ts", import.meta.url).href)};
      import { writeFileSync } from "node:fs";
      const p = new SparePool({ max: 2, stderrTail: 64 });
      const s = ${JSON.stringify(spec())};
      p.fill(s);
      writeFileSync(${JSON.stringify(pidFile)}, String(p.pidOf(s)));`;
    const t = Date.now();
    const prog = spawn(process.execPath, ["--input-type=module", "-e", program], { stdio: "inherit" });
    const code = await new Promise((r) => prog.once("close", r));
    assert.equal(code, 0);
    assert.ok(Date.now() - t < 5000, `exited after ${Date.now() - t} ms`);
    const pid = Number(readFileSync(pidFile, "utf8"));
    assert.ok(pid > 0);
    // The stand-in ignores SIGTERM: only the closed stdin ends it.
    await until("the spare to exit", () => gone(pid));
  });
});

describe("Client and its spare (stand-in rpc)", () => {
  // Logs its start; answers create at once and exec after 500 ms, as a slow first command.
  const log = join(dir, "starts.log");
  const bin = join(dir, "timed-rpc.mjs");
  writeFileSync(
    bin,
    `import { appendFileSync } from "node:fs";
     import { createInterface } from "node:readline";
     appendFileSync(${JSON.stringify(log)}, process.pid + " " + Date.now() + "\\n");
     for await (const line of createInterface({ input: process.stdin })) {
       const m = JSON.parse(line);
       if (m.id === undefined) continue;
       const reply = (result) => process.stdout.write(JSON.stringify({ jsonrpc: "2.0", id: m.id, result }) + "\\n");
       if (m.method === "create") reply({ id: "vm-0000abcd" });
       else if (m.method === "exec") setTimeout(() => reply({ exit_code: 0, stdout: "", stderr: "", duration_ms: 1 }), 500);
       else reply({});
     }`,
  );
  writeFileSync(log, "");
  const starts = () =>
    readFileSync(log, "utf8")
      .trim()
      .split("\n")
      .filter(Boolean)
      .map((l) => l.split(" ").map(Number) as [number, number]);
  const env = { PATH: process.env.PATH ?? "" };

  test("the spare starts after the create's first command, and the next Client takes it", async () => {
    const c1 = new Client({ binaryPath: bin, env });
    await c1.create({});
    const created = Date.now();
    await c1.exec("first");
    const execDone = Date.now();
    await until("the spare", () => starts().length === 2);
    const [[own], [spare, spareAt]] = starts() as [[number, number], [number, number]];
    assert.ok(spareAt >= created + 400, "not while the first command ran");
    assert.ok(spareAt >= execDone - 20);
    await c1.close();
    assert.equal(existsSync(`/proc/${own}`) && !gone(own), false);

    const c2 = new Client({ binaryPath: bin, env });
    await c2.create({});
    assert.equal(starts().length, 2, "no new child for c2: it took the spare");
    assert.ok(!gone(spare));
    // With no call after the create, the next spare starts at once.
    await until("the next spare", () => starts().length === 3);
    await c2.close();
    await until("the taken spare to end with c2", () => gone(spare));
  });

  test("spare: false and MATCHLOCK_SDK_SPARE=0 take no spare and start none", async () => {
    for (const opts of [
      { binaryPath: bin, env, spare: false },
      { binaryPath: bin, env: { ...env, MATCHLOCK_SDK_SPARE: "0" } },
    ]) {
      const before = starts().length;
      const c = new Client(opts);
      await c.create({});
      await sleep(400);
      assert.equal(starts().length, before + 1, "its own child only");
      await c.close();
    }
  });
});
