import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { Client } from "../../src/sdk/index.ts";
import { CLI, runCli, tempHome } from "../helpers/cli.ts";

/**
 * The SDK's spare `matchlock rpc` child against real VMs: after a create, the next Client with the
 * same spec takes the spare instead of starting Node and the CLI. The rpc processes are found in
 * /proc by a marker in their environment, one per test, so the tests never see each other's.
 */

const h = tempHome();
const marks: string[] = [];
after(() => {
  for (const m of marks) for (const pid of rpcPids(m)) process.kill(pid, "SIGKILL");
  h.cleanup();
});

function envFor(mark: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  marks.push(mark);
  return { ...h.env, SPARE_TEST_MARK: mark, ...extra };
}

/** Running `matchlock rpc` processes (not zombies) whose environment carries `mark`. */
function rpcPids(mark: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const argv = readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0").filter(Boolean);
      if (argv.at(-1) !== "rpc") continue;
      if (/\) [ZX] /.test(readFileSync(`/proc/${entry}/stat`, "latin1"))) continue;
      const env = readFileSync(`/proc/${entry}/environ`, "utf8").split("\0");
      if (env.includes(`SPARE_TEST_MARK=${mark}`)) pids.push(Number(entry));
    } catch {}
  }
  return pids.sort((a, b) => a - b);
}

function alive(pid: number): boolean {
  try {
    return !/\) [ZX] /.test(readFileSync(`/proc/${pid}/stat`, "latin1"));
  } catch {
    return false;
  }
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, get: () => T | undefined, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = get();
    if (v !== undefined) return v;
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

/** Creates, runs one command, closes and removes: a Client's whole life. */
async function oneVm(c: Client): Promise<void> {
  await c.create({});
  assert.equal((await c.exec("echo ok")).stdout, "ok\n");
  await c.close();
  await c.remove();
}

/** The one rpc process left once the clients with `mark` are closed: the spare. */
const theSpare = (mark: string) =>
  until("exactly one idle rpc child", () => {
    const p = rpcPids(mark);
    return p.length === 1 ? p[0] : undefined;
  });

describe("the SDK's spare rpc child", () => {
  test("`matchlock rpc` with nothing created exits on EOF and leaves nothing (not even its home)", async () => {
    const home = join(h.home, "never-used");
    const child = spawn(process.execPath, [CLI, "rpc"], {
      env: { ...h.env, MATCHLOCK_HOME: home },
      stdio: ["pipe", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d));
    await sleep(1500); // idle: its warm-up runs
    const t = Date.now();
    child.stdin.end();
    const code = await new Promise((r) => child.once("close", r));
    assert.equal(code, 0, stderr);
    assert.ok(Date.now() - t < 3000, `exited ${Date.now() - t} ms after EOF`);
    assert.equal(stderr, "");
    assert.equal(existsSync(home), false);
  });

  test("the next Client takes the spare started after the previous create", async () => {
    const env = envFor("sequential");
    await oneVm(new Client({ env }));
    const spare = await theSpare("sequential");
    const c = new Client({ env });
    await c.create({});
    assert.ok(alive(spare));
    // A new spare for the next one, and the taken one serves this client: it ends with its close.
    const next = await until("a new spare", () => rpcPids("sequential").find((p) => p !== spare));
    await c.close();
    await c.remove();
    await until("the taken child to exit with its client", () => (alive(spare) ? undefined : true));
    assert.deepEqual(rpcPids("sequential"), [next]);
  });

  test("MATCHLOCK_SDK_SPARE=0 and spare: false start no spare", async () => {
    for (const [mark, opts] of [
      ["env-off", { env: envFor("env-off", { MATCHLOCK_SDK_SPARE: "0" }) }],
      ["option-off", { env: envFor("option-off"), spare: false }],
    ] as const) {
      const c = new Client(opts);
      await c.create({});
      await sleep(500);
      assert.equal(rpcPids(mark).length, 1, `${mark}: only the client's own child`);
      await c.close();
      await c.remove();
      await sleep(300);
      assert.deepEqual(rpcPids(mark), [], mark);
    }
  });

  test("a spare that was killed is not used: the next create starts a child of its own", async () => {
    const env = envFor("killed");
    await oneVm(new Client({ env }));
    const spare = await theSpare("killed");
    process.kill(spare, "SIGKILL");
    const c = new Client({ env });
    await c.create({});
    assert.equal((await c.exec("echo ok")).stdout, "ok\n");
    assert.equal(alive(spare), false);
    await c.close();
    await c.remove();
  });

  test("a program that creates, closes and returns exits by itself, and leaves no rpc child or VM", async () => {
    const mark = "program";
    const program = `
      import { Client } from ${JSON.stringify(new URL("../../src/sdk/index.ts", import.meta.url).href)};
      const c = new Client();
      await c.create({});
      await c.exec("true"); // the spare starts when this returns
      await c.close();
      await c.remove();
      process.stdout.write("returning\\n");`;
    const prog = spawn(process.execPath, ["--input-type=module", "-e", program], {
      env: envFor(mark),
      stdio: ["ignore", "pipe", "inherit"],
    });
    const guard = setTimeout(() => prog.kill("SIGKILL"), 60_000); // a program kept alive fails, not hangs
    const seen = new Set<number>();
    const poll = setInterval(() => {
      for (const p of rpcPids(mark)) seen.add(p);
    }, 20);
    let returnedAt = 0;
    prog.stdout.on("data", (d: Buffer) => {
      if (d.toString().includes("returning")) returnedAt = Date.now();
    });
    const code = await new Promise((r) => prog.once("close", r));
    clearInterval(poll);
    clearTimeout(guard);
    assert.equal(code, 0);
    assert.ok(returnedAt > 0);
    assert.ok(Date.now() - returnedAt < 2000, `exited ${Date.now() - returnedAt} ms after main returned`);
    assert.ok(seen.size >= 2, `its own child and a spare ran (saw ${[...seen].join(", ")})`);
    await until("no rpc child left", () => (rpcPids(mark).length === 0 ? true : undefined), 5000);
    const list = await runCli(["list"], { env: h.env });
    assert.doesNotMatch(list.stdout.toString(), /vm-/);
    assert.deepEqual(h.vmDirs(), []);
  });
});
