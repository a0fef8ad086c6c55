import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { runCommand } from "../../src/host/command.ts";
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
function rpcPids(mark: string, opts: { sparesOnly?: boolean } = {}): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const argv = readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0").filter(Boolean);
      if (argv.at(-1) !== "rpc") continue;
      if (/\) [ZX] /.test(readFileSync(`/proc/${entry}/stat`, "latin1"))) continue;
      const env = readFileSync(`/proc/${entry}/environ`, "utf8").split("\0");
      if (!env.includes(`SPARE_TEST_MARK=${mark}`)) continue;
      // Spares carry the SDK's prestart hint; a Client's own child never does (the SDK strips it).
      if (opts.sparesOnly && !env.some((e) => e.startsWith("MATCHLOCK_RPC_PRESTART="))) continue;
      pids.push(Number(entry));
    } catch {}
  }
  return pids.sort((a, b) => a - b);
}

/** What a process is, for a failure message: pid, parent, whether it is a spare (has the hint), state. */
function describeProc(pid: number): string {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
    const [state, ppid] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const spare = readFileSync(`/proc/${pid}/environ`, "utf8").includes("MATCHLOCK_RPC_PRESTART=");
    return `${pid} (parent ${ppid}, state ${state}${spare ? ", a spare" : ""}; this test is ${process.pid})`;
  } catch {
    return `${pid} (gone)`;
  }
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

/** The dirs of clones made ahead of time by the rpc process `pid` (sandbox/prestart.ts). */
function clonesOf(pid: number): string[] {
  try {
    return readdirSync(join(h.home, "spares")).filter((n) => n.startsWith(`${pid}-`));
  } catch {
    return [];
  }
}

/** Running QEMU processes whose command line names `dir`. */
function qemuIn(dir: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || !alive(Number(entry))) continue;
    try {
      const argv = readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0");
      if (/qemu-system/.test(argv[0] ?? "") && argv.some((a) => a.includes(`${dir}/`)))
        pids.push(Number(entry));
    } catch {}
  }
  return pids;
}

async function linkNames(): Promise<string[]> {
  const r = await runCommand("ip", ["-j", "link", "show"]);
  return (JSON.parse(r.stdout.toString("utf8")) as Array<{ ifname: string }>).map((l) => l.ifname);
}

/** Waits until the link `name` exists (or, `present` false, is gone: the kernel removes a TAP a moment after its last user exits). */
async function linkState(name: string, present: boolean): Promise<void> {
  const end = Date.now() + 10_000;
  while ((await linkNames()).includes(name) !== present) {
    if (Date.now() > end) assert.fail(`the link ${name} is ${present ? "missing" : "still there"}`);
    await sleep(25);
  }
}

/** The clone the idle spare `spare` holds, once its QEMU runs: its dir name, dir, QEMU and TAP. */
async function heldClone(spare: number): Promise<{ name: string; dir: string; qemu: number; tap: string }> {
  const name = await until("the spare's clone", () => clonesOf(spare)[0], 20_000);
  const dir = join(h.home, "spares", name);
  const qemu = await until("its QEMU", () => qemuIn(dir)[0], 20_000);
  const tap = `mls-${name.slice(-8)}`;
  await linkState(tap, true);
  return { name, dir, qemu, tap };
}

/** The VM's boot.log. */
function bootLog(id: string): string {
  return readFileSync(join(h.home, "vms", id, "boot.log"), "utf8");
}

/** A `matchlock rpc` of our own, driven by raw JSON-RPC lines. */
function rpcChild(env: NodeJS.ProcessEnv) {
  const child = spawn(process.execPath, [CLI, "rpc"], { env, stdio: ["pipe", "pipe", "pipe"] });
  const exited = new Promise<void>((res) => child.once("exit", () => res()));
  const replies: Array<{ id?: number; result?: unknown; error?: unknown }> = [];
  let buf = "";
  child.stdout.on("data", (d: Buffer) => {
    buf += d.toString();
    for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
      replies.push(JSON.parse(buf.slice(0, i)));
      buf = buf.slice(i + 1);
    }
  });
  child.stderr.resume();
  let next = 1;
  const send = (method: string, params: unknown): number => {
    const id = next++;
    child.stdin.write(`${JSON.stringify({ jsonrpc: "2.0", id, method, params })}\n`);
    return id;
  };
  const call = async (method: string, params: unknown): Promise<Record<string, unknown>> => {
    const id = send(method, params);
    const r = await until(method, () => replies.find((m) => m.id === id), 120_000);
    assert.equal(r.error, undefined, JSON.stringify(r.error));
    return r.result as Record<string, unknown>;
  };
  assert.ok(child.pid !== undefined);
  return {
    pid: child.pid,
    exited,
    send,
    call,
    /** Runs `command` in the VM; its stdout. */
    sh: async (command: string) =>
      Buffer.from((await call("exec", { command })).stdout as string, "base64").toString(),
    /** EOF: the VM is closed and the process exits. */
    end: async () => {
      child.stdin.end();
      await exited;
    },
  };
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
  until("exactly one idle rpc child, a spare", () => {
    const p = rpcPids(mark);
    return p.length === 1 && rpcPids(mark, { sparesOnly: true })[0] === p[0] ? p[0] : undefined;
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
    const id = await c.create({});
    assert.ok(alive(spare));
    // The spare made this VM: it is the VM's owner.
    assert.equal(JSON.parse(readFileSync(join(h.home, "vms", id, "runtime.json"), "utf8")).owner.pid, spare);
    // A new spare for the next one, and the taken one serves this client: it ends with its close.
    const next = await until("a new spare", () =>
      rpcPids("sequential", { sparesOnly: true }).find((p) => p !== spare),
    );
    await c.close();
    await c.remove();
    await until("the taken child to exit with its client", () => (alive(spare) ? undefined : true));
    const left = rpcPids("sequential");
    assert.deepEqual(
      left,
      [next],
      `rpc processes left: ${left.map(describeProc).join("; ")} (spare ${spare})`,
    );
  });

  test("the spare restores a clone ahead of time; the next create adopts it as its own VM", async () => {
    const env = envFor("prestart");
    await oneVm(new Client({ env }));
    /** Waits for the idle spare (the rpc child none of `busy` is) and its clone; a new Client adopts it. */
    const adopt = async (host: string, busy: number[]) => {
      const spare = await until("one idle spare", () => {
        const idle = rpcPids("prestart").filter((p) => !busy.includes(p));
        return idle.length === 1 ? idle[0] : undefined;
      });
      const held = await heldClone(spare);
      const c = new Client({ env });
      // add_hosts does not change the kind of snapshot: the held clone fits.
      const id = await c.create({ network: { add_hosts: [{ host, ip: "10.77.0.9" }] } });
      return { spare, held, c, id, dir: join(h.home, "vms", id) };
    };
    const a = await adopt("db.prestart.test", []);
    assert.match(
      readFileSync(join(a.dir, "boot.log"), "utf8"),
      /restored from snapshot [0-9a-f]+ \(a clone made ahead of time\)/,
    );
    // The same QEMU now runs this VM, from the VM's dir, on the VM's own TAP.
    assert.ok(alive(a.held.qemu));
    assert.equal(JSON.parse(readFileSync(join(a.dir, "runtime.json"), "utf8")).qemu.pid, a.held.qemu);
    assert.equal(existsSync(a.held.dir), false);
    const names = await linkNames();
    assert.equal(names.includes(a.held.tap), false, "the clone's TAP took the VM's name");
    assert.ok(names.includes(`fc-${a.id.slice(3, 11)}`));
    // And it is this VM: its hostname, clock and network (DNS from this VM's listeners).
    assert.equal((await a.c.exec("hostname")).stdout, `${a.id}\n`);
    assert.match((await a.c.exec("nslookup db.prestart.test")).stdout, /10\.77\.0\.9/);
    const clock = Number((await a.c.exec("date +%s")).stdout);
    assert.ok(Math.abs(clock - Date.now() / 1000) < 30, `guest clock ${clock}`);

    // A second one, made by the next spare while the first VM runs: each has its own randomness.
    const b = await adopt("db2.prestart.test", [a.spare]);
    assert.match(readFileSync(join(b.dir, "boot.log"), "utf8"), /a clone made ahead of time/);
    const ids =
      "head -c 16 /dev/urandom | od -An -tx1; cat /proc/sys/kernel/random/boot_id /proc/sys/kernel/random/uuid";
    const [ra, rb] = [(await a.c.exec(ids)).stdout, (await b.c.exec(ids)).stdout];
    assert.equal(ra.split("\n").length, rb.split("\n").length);
    for (const [la, lb] of ra.split("\n").map((l, i) => [l, rb.split("\n")[i]])) {
      if (la !== "") assert.notEqual(la, lb);
    }
    for (const x of [a, b]) {
      await x.c.close();
      await x.c.remove();
      assert.equal(alive(x.held.qemu), false);
      await linkState(`fc-${x.id.slice(3, 11)}`, false);
    }
  });

  test("a clone made ahead for host folders serves this VM's folders once adopted", async () => {
    const env = envFor("prestart-folders");
    const host = mkdtempSync(join(h.home, "folder-"));
    writeFileSync(join(host, "hello.txt"), "from the host\n");
    const config = { vfs: { mounts: { "/workspace/h": { type: "host_fs" as const, host_path: host } } } };
    const first = new Client({ env });
    await first.create(config);
    await first.close();
    await first.remove();
    const held = await heldClone(await theSpare("prestart-folders"));
    const c = new Client({ env });
    const id = await c.create(config);
    assert.match(readFileSync(join(h.home, "vms", id, "boot.log"), "utf8"), /a clone made ahead of time/);
    assert.ok(alive(held.qemu));
    assert.equal((await c.exec("cat /workspace/h/hello.txt")).stdout, "from the host\n");
    assert.equal((await c.exec("echo back > /workspace/h/back.txt")).exitCode, 0);
    assert.equal(readFileSync(join(host, "back.txt"), "utf8"), "back\n");
    await c.close();
    await c.remove();
  });

  test("a held clone of another kind is discarded, and the create restores as usual", async () => {
    const env = envFor("other-kind");
    await oneVm(new Client({ env }));
    const held = await heldClone(await theSpare("other-kind"));
    const c = new Client({ env });
    const id = await c.create({ network: { no_network: true } });
    assert.doesNotMatch(readFileSync(join(h.home, "vms", id, "boot.log"), "utf8"), /made ahead/);
    assert.equal((await c.exec("echo ok")).stdout, "ok\n");
    await until("the held clone's QEMU to be stopped", () => (alive(held.qemu) ? undefined : true));
    await until("its dir to be removed", () => (existsSync(held.dir) ? undefined : true));
    await linkState(held.tap, false);
    await c.close();
    await c.remove();
  });

  test("SIGTERM to an idle `matchlock rpc` holding a clone removes the clone, then ends it as before", async () => {
    const env = envFor("sigterm");
    await oneVm(new Client({ env })); // the snapshot exists
    const child = spawn(process.execPath, [CLI, "rpc"], {
      env: { ...env, MATCHLOCK_RPC_PRESTART: "{}" },
      stdio: ["pipe", "ignore", "pipe"],
    });
    const exit = new Promise<NodeJS.Signals | null>((r) => child.once("exit", (_code, signal) => r(signal)));
    assert.ok(child.pid !== undefined);
    const held = await heldClone(child.pid);
    child.kill("SIGTERM");
    assert.equal(await exit, "SIGTERM");
    assert.equal(existsSync(held.dir), false);
    assert.equal(alive(held.qemu), false);
    await linkState(held.tap, false);
  });

  test("a create sent at once adopts the clone being made", async () => {
    const env = envFor("at-once");
    await oneVm(new Client({ env })); // the snapshot exists
    const rpc = rpcChild({ ...env, MATCHLOCK_RPC_PRESTART: "{}" });
    const { id } = (await rpc.call("create", {})) as { id: string };
    assert.match(bootLog(id), /a clone made ahead of time/);
    const [name, clock] = (await rpc.sh("hostname; date +%s")).trim().split("\n");
    assert.equal(name, id);
    assert.ok(Math.abs(Number(clock) - Date.now() / 1000) < 30);
    await rpc.end();
    assert.deepEqual(clonesOf(rpc.pid), []);
  });

  /**
   * A `matchlock rpc` holding a clone whose QEMU the create kills at `fault`; the create names
   * `host` (10.77.0.7) in add_hosts, for a DNS check from the guest.
   */
  async function createWithFault(fault: string, host: string) {
    const env = envFor(fault);
    await oneVm(new Client({ env })); // the snapshot exists
    const rpc = rpcChild({ ...env, MATCHLOCK_RPC_PRESTART: "{}", MATCHLOCK_TEST_FAULT: fault });
    const held = await heldClone(rpc.pid);
    const { id } = (await rpc.call("create", {
      network: { add_hosts: [{ host, ip: "10.77.0.7" }] },
    })) as { id: string };
    assert.equal(alive(held.qemu), false);
    return { rpc, id };
  }

  test("a clone that dies when taken: the create makes its network and VM as usual", async () => {
    const { rpc, id } = await createWithFault("clone-dies-when-taken", "db.taken.test");
    assert.match(bootLog(id), /the clone made ahead of time died before it was adopted/);
    assert.match(bootLog(id), /restored from snapshot [0-9a-f]+\n/);
    assert.equal((await rpc.sh("hostname")).trim(), id);
    assert.match(await rpc.sh("nslookup db.taken.test"), /10\.77\.0\.7/);
    await rpc.end();
    await linkState(`fc-${id.slice(3, 11)}`, false);
    assert.deepEqual(clonesOf(rpc.pid), []);
  });

  test("a clone that dies once adopted: the VM boots cold on the same network", async () => {
    const { rpc, id } = await createWithFault("clone-dies-when-adopted", "db.adopted.test");
    assert.match(bootLog(id), /could not be restored \(.*\); booting cold/);
    // The TAP went with the clone's QEMU: made again, same name and address, under the same table.
    assert.ok((await linkNames()).includes(`fc-${id.slice(3, 11)}`));
    assert.equal((await rpc.sh("hostname")).trim(), id);
    assert.match(await rpc.sh("nslookup db.adopted.test"), /10\.77\.0\.7/);
    await rpc.end();
    await linkState(`fc-${id.slice(3, 11)}`, false);
  });

  test("SIGKILL right after a clone is adopted: gc finds its QEMU and leaves nothing", async () => {
    const env = envFor("crash-adopted");
    await oneVm(new Client({ env }));
    const before = new Set(h.vmDirs());
    const rpc = rpcChild({
      ...env,
      MATCHLOCK_RPC_PRESTART: "{}",
      MATCHLOCK_TEST_CRASH_AT: "adopted",
      MATCHLOCK_TEST_NO_PDEATHSIG: "1",
    });
    const held = await heldClone(rpc.pid);
    rpc.send("create", {});
    await rpc.exited;
    assert.ok(alive(held.qemu), "without a parent-death signal its QEMU outlives it");
    const gc = await runCli(["gc"], { env: h.env });
    assert.equal(gc.code, 0, gc.stderr);
    await until("the clone's QEMU to be killed", () => (alive(held.qemu) ? undefined : true));
    await linkState(held.tap, false);
    assert.deepEqual(clonesOf(rpc.pid), []);
    const made = h.vmDirs().filter((d) => !before.has(d));
    assert.equal(made.length, 1, "the VM that adopted the clone");
    assert.equal(
      existsSync(join(h.home, "vms", made[0] ?? "", "upper.ext4")),
      false,
      "its disk is reclaimed",
    );
    // gc keeps its record and logs, as for any crashed VM; rm removes them.
    assert.equal((await runCli(["rm", made[0] ?? ""], { env: h.env })).code, 0);
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
    const held = await heldClone(spare);
    process.kill(spare, "SIGKILL");
    // Its clone's QEMU dies with it (parent-death signal) and takes its TAP along; `gc` removes the dir.
    await until("the clone's QEMU to die with its owner", () => (alive(held.qemu) ? undefined : true));
    await linkState(held.tap, false);
    assert.ok(existsSync(held.dir));
    const gc = await runCli(["gc"], { env: h.env });
    assert.equal(gc.code, 0, gc.stderr);
    assert.match(gc.stdout.toString(), new RegExp(`spare clone ${held.name}  removed`));
    assert.equal(existsSync(held.dir), false);
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
    // The spare's clone made ahead of time went with it.
    for (const pid of seen) assert.deepEqual(clonesOf(pid), [], `clones left by rpc ${pid}`);
    const list = await runCli(["list"], { env: h.env });
    assert.doesNotMatch(list.stdout.toString(), /vm-/);
    assert.deepEqual(h.vmDirs(), []);
  });
});
