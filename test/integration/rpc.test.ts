import assert from "node:assert/strict";
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import * as v from "valibot";
import { type RpcMethod, RpcResults, RpcServerNotifications } from "../../src/api/rpc.ts";
import { Client, MatchlockError, RPC_CODES, RPCError, Sandbox } from "../../src/sdk/index.ts";
import { CLI, qemuProcessesMentioning, REPO, runCli, spawnCollect, tempHome } from "../helpers/cli.ts";
import { listRows } from "../helpers/vms.ts";

/** `matchlock rpc` through the SDK and on the raw wire, with real VMs. */

const h = tempHome();
after(() => h.cleanup());
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** A raw JSON-RPC session: write lines, read parsed messages. */
class Wire {
  readonly child: ChildProcessWithoutNullStreams;
  private buf = "";
  private readonly msgs: Array<Record<string, unknown>> = [];
  private waiters: Array<() => void> = [];
  constructor(env: NodeJS.ProcessEnv = {}) {
    this.child = spawn(process.execPath, [CLI, "rpc"], { env: { ...h.env, ...env } });
    this.child.stdout.setEncoding("utf8");
    this.child.stdout.on("data", (d: string) => {
      this.buf += d;
      let nl = this.buf.indexOf("\n");
      while (nl >= 0) {
        this.msgs.push(JSON.parse(this.buf.slice(0, nl)));
        this.buf = this.buf.slice(nl + 1);
        nl = this.buf.indexOf("\n");
      }
      for (const w of this.waiters.splice(0)) w();
    });
    this.child.stderr.resume();
  }
  write(line: string | Buffer): void {
    this.child.stdin.write(line);
  }
  request(id: number, method: string, params?: unknown): void {
    this.write(
      `${JSON.stringify({ jsonrpc: "2.0", id, method, ...(params === undefined ? {} : { params }) })}\n`,
    );
  }
  async response(id: number | null, timeoutMs = 90_000): Promise<Record<string, unknown>> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const i = this.msgs.findIndex((m) => m.id === id && ("result" in m || "error" in m));
      if (i >= 0) return this.msgs.splice(i, 1)[0] as Record<string, unknown>;
      if (Date.now() > end) throw new Error(`no response for id ${id}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 200);
      });
    }
  }
  /** Notifications received so far with this method for request `id`. */
  notifications(method: string, id: number): Array<Record<string, unknown>> {
    return this.msgs.filter(
      (m) => m.method === method && (m.params as { id?: unknown } | undefined)?.id === id,
    );
  }
  async closed(): Promise<number | null> {
    return new Promise((r) => this.child.on("close", (code) => r(code)));
  }
}

/** Polls `cond` until it holds (or 60 s pass). */
async function waitFor(cond: () => boolean): Promise<void> {
  const end = Date.now() + 60_000;
  while (!cond()) {
    if (Date.now() > end) throw new Error("timed out waiting");
    await new Promise((r) => setTimeout(r, 100));
  }
}

const errCode = (m: Record<string, unknown>) => (m.error as { code: number } | undefined)?.code;

describe("rpc protocol robustness (raw wire)", () => {
  test("malformed JSON, unknown method, wrong types, oversized and huge lines: each its error, and the server keeps serving", async () => {
    const w = new Wire({ MATCHLOCK_RPC_MAX_LINE: String(16 * 1024 * 1024) });
    w.write("{not json\n");
    assert.equal(errCode(await w.response(null)), RPC_CODES.PARSE_ERROR);
    w.request(1, "no_such_method");
    assert.equal(errCode(await w.response(1)), RPC_CODES.METHOD_NOT_FOUND);
    w.request(2, "exec", { command: 42 });
    const bad = await w.response(2);
    assert.equal(errCode(bad), RPC_CODES.INVALID_PARAMS);
    assert.match((bad.error as { message: string }).message, /command/);
    w.request(3, "create", { resources: { memory_mb: "lots" } });
    assert.match(((await w.response(3)).error as { message: string }).message, /resources\.memory_mb/);
    w.write(`${JSON.stringify([1, 2])}\n`);
    assert.equal(errCode(await w.response(null)), RPC_CODES.INVALID_REQUEST);
    // A 20 MiB line over the 16 MiB limit: refused without being buffered.
    w.write(Buffer.alloc(20 * 1024 * 1024, 0x61));
    w.write("\n");
    const long = await w.response(null);
    assert.equal(errCode(long), RPC_CODES.INVALID_REQUEST);
    assert.match((long.error as { message: string }).message, /exceeds/);
    w.request(4, "exec", { command: "true" });
    assert.equal(errCode(await w.response(4)), RPC_CODES.VM_FAILED, "no VM yet");
    // Still serving: a real create and exec work after all that.
    w.request(5, "create", { resources: { memory_mb: 256 } });
    const created = await w.response(5);
    assert.match(String((created.result as { id: string }).id), /^vm-/);
    w.request(6, "exec", { command: "echo alive" });
    const r6 = (await w.response(6)).result as { exit_code: number; stdout: string };
    assert.equal(Buffer.from(r6.stdout, "base64").toString(), "alive\n");
    // A second create replaces the VM, as in Matchlock: a new id, and the first VM is closed.
    w.request(7, "create", {});
    const second = (await w.response(7)).result as { id: string };
    const first = (created.result as { id: string }).id;
    assert.match(second.id, /^vm-/);
    assert.notEqual(second.id, first);
    assert.equal(existsSync(join(h.home, "vms", first, "upper.ext4")), false, "the first VM was closed");
    w.request(14, "exec", { command: "hostname" });
    const r14 = (await w.response(14)).result as { stdout: string };
    assert.equal(Buffer.from(r14.stdout, "base64").toString(), `${second.id}\n`);
    w.request(8, "allow_list_add", { hosts: ["example.com"] });
    const noList = await w.response(8);
    assert.equal(errCode(noList), RPC_CODES.VM_FAILED, "as Matchlock answers for a VM without its proxy");
    assert.match((noList.error as { message: string }).message, /no allowlist/);
    // A terminal command that cannot start says why in the terminal's one stream.
    w.request(15, "exec_tty", { command: "true", user: "no-such-user" });
    const tty = (await w.response(15)).result as { exit_code: number };
    assert.notEqual(tty.exit_code, 0);
    const shown = w
      .notifications("exec_tty.stdout", 15)
      .map((m) => Buffer.from((m.params as { data: string }).data, "base64").toString())
      .join("");
    assert.match(shown, /no-such-user/);
    // Matchlock's wire: list_files modes are Go os.FileMode bits, logs are base64.
    w.request(11, "list_files", { path: "/" });
    const entries = (
      (await w.response(11)).result as { files: Array<{ name: string; mode: number; is_dir: boolean }> }
    ).files;
    const etc = entries.find((f) => f.name === "etc");
    assert.equal(etc?.is_dir, true);
    assert.equal(etc?.mode, 2 ** 31 + 0o755, "a directory is 1<<31 | perm");
    w.request(12, "exec", { command: "echo wire-log-marker > /dev/console" });
    await w.response(12);
    w.request(13, "log", {});
    const content = ((await w.response(13)).result as { content: string }).content;
    assert.match(content, /^[A-Za-z0-9+/]*={0,2}$/, "base64");
    assert.match(Buffer.from(content, "base64").toString(), /wire-log-marker/);
    w.request(9, "close", { timeout_seconds: 5 });
    assert.deepEqual((await w.response(9)).result, {});
    w.request(10, "exec", { command: "true" });
    const afterClose = await w.response(10);
    assert.equal(errCode(afterClose), RPC_CODES.VM_FAILED);
    assert.match((afterClose.error as { message: string }).message, /gone/);
    w.child.stdin.end();
    assert.equal(await w.closed(), 0);
    // Both VMs (the replaced one and the closed one) stay listed as stopped until removed.
    const listed = listRows((await runCli(["list"], { env: h.env })).stdout.toString());
    assert.equal(listed.get(first), "stopped");
    assert.equal(listed.get(second.id), "stopped");
    assert.equal((await runCli(["prune"], { env: h.env })).code, 0);
    assert.deepEqual(h.vmDirs(), []);
  });

  test("a config asking for a feature this version lacks is refused, naming it", async () => {
    const w = new Wire();
    w.request(1, "create", { privileged: true });
    const r = await w.response(1);
    assert.equal(errCode(r), RPC_CODES.INVALID_PARAMS);
    assert.match(
      (r.error as { message: string }).message,
      /not supported by this version of matchlock: privileged/,
    );
    w.child.stdin.end();
    await w.closed();
  });

  test("launch_entrypoint (Matchlock's launch()): the entrypoint runs detached with its output in log; one failing at once fails create", async () => {
    const w = new Wire();
    const before = h.vmDirs().length;
    try {
      // The default image's Cmd is /bin/sh: with no stdin it ends at once, successfully.
      w.request(1, "create", { launch_entrypoint: true });
      assert.ok((await w.response(1)).result, "an entrypoint that exits 0 is fine");
      w.request(2, "create", {
        launch_entrypoint: true,
        image_config: { entrypoint: ["sh", "-c"], cmd: ["echo launched-$((40 + 2)); exec sleep 600"] },
      });
      assert.ok((await w.response(2)).result);
      let log = "";
      for (let i = 3; i < 60 && !log.includes("launched-42"); i++) {
        w.request(i, "log");
        const r = (await w.response(i)).result as { content: string };
        log = Buffer.from(r.content, "base64").toString();
        if (!log.includes("launched-42")) await new Promise((r) => setTimeout(r, 250));
      }
      assert.match(log, /launched-42/);
      w.request(100, "exec", { command: "ps -o args | grep -c '^sleep 600'" });
      assert.equal(
        Buffer.from(((await w.response(100)).result as { stdout: string }).stdout, "base64").toString(),
        "1\n",
      );
      // Failing within 500 ms: create fails with the exit and the output, and its VM is gone.
      w.request(101, "create", {
        launch_entrypoint: true,
        image_config: { entrypoint: ["sh", "-c", "echo broken-config >&2; exit 3"], cmd: [] },
      });
      const failed = await w.response(101);
      assert.equal(errCode(failed), RPC_CODES.VM_FAILED);
      assert.match(
        (failed.error as { message: string }).message,
        /entrypoint \["sh","-c","echo broken-config >&2; exit 3"\] exited with code 3 within 500 ms: broken-config/,
      );
    } finally {
      w.child.stdin.end();
    }
    assert.equal(await w.closed(), 0);
    // The two replaced VMs stay listed as stopped (Matchlock); the failed one left nothing.
    assert.equal(h.vmDirs().length, before + 2);
    assert.equal((await runCli(["prune"], { env: h.env })).code, 0);
  });

  test("client notifications (exec_pipe.stdin, exec_tty.resize…) are never answered, even sent with an id, as in Matchlock", async () => {
    const w = new Wire();
    w.request(5, "exec_pipe.stdin", { id: 1, data: "eA==" });
    w.request(6, "exec_tty.resize", { id: 1, rows: 10, cols: 20 });
    w.request(7, "exec_pipe.stdin_eof", { id: 1 });
    w.request(8, "no_such_method");
    const after = await w.response(8);
    assert.equal(errCode(after), RPC_CODES.METHOD_NOT_FOUND);
    for (const id of [5, 6, 7]) {
      await assert.rejects(w.response(id, 300), /no response/, `notification ${id} was answered`);
    }
    w.child.stdin.end();
    await w.closed();
  });

  test("every method's result and every notification, on the raw wire, match their one declaration", async () => {
    const w = new Wire();
    const results = new Map<string, unknown>();
    const call = async (id: number, method: RpcMethod, params: unknown) => {
      w.request(id, method, params);
      const r = await w.response(id);
      assert.ok("result" in r, `${method}: ${JSON.stringify(r.error)}`);
      results.set(method, r.result);
      return r.result as Record<string, unknown>;
    };
    try {
      await call(1, "create", { network: { intercept: true } });
      await call(2, "exec", { command: "echo out; echo err >&2" });
      await call(3, "exec_stream", { command: "echo streamed" });
      w.request(4, "exec_pipe", { command: "cat" });
      await waitFor(() => w.notifications("exec_pipe.ready", 4).length > 0);
      w.write(
        `${JSON.stringify({ jsonrpc: "2.0", method: "exec_pipe.stdin", params: { id: 4, data: "cGlwZWQ=" } })}\n`,
      );
      w.write(`${JSON.stringify({ jsonrpc: "2.0", method: "exec_pipe.stdin_eof", params: { id: 4 } })}\n`);
      results.set("exec_pipe", (await w.response(4)).result);
      await call(5, "exec_tty", { command: "echo tty", rows: 10, cols: 40 });
      await call(6, "write_file", { path: "/tmp/f", content: "aGk=" });
      await call(7, "read_file", { path: "/tmp/f" });
      await call(8, "list_files", { path: "/tmp" });
      await call(9, "log", {});
      w.request(10, "log_stream", {});
      await waitFor(() => w.notifications("log_stream.data", 10).length > 0);
      await call(11, "cancel", { id: 10 });
      await w.response(10); // answers -32003 once cancelled
      await call(12, "port_forward", { forwards: [{ local_port: 0, remote_port: 80 }] });
      await call(13, "allow_list_add", { hosts: ["example.test"] });
      await call(14, "allow_list_delete", { hosts: ["example.test"] });
      assert.deepEqual(await call(16, "pause", {}), { paused: true, changed: true });
      assert.deepEqual(await call(17, "resume", {}), { paused: false, changed: true });
      await call(15, "close", {});
      for (const method of Object.keys(RpcResults) as RpcMethod[]) {
        if (method === "log_stream") continue; // cancelled: its answer is the -32003 error
        const parsed = v.safeParse(RpcResults[method], results.get(method));
        assert.ok(parsed.success, `${method} result ${JSON.stringify(results.get(method))}`);
      }
      for (const [id, names] of [
        [3, ["exec_stream.stdout"]],
        [4, ["exec_pipe.ready", "exec_pipe.stdout"]],
        [5, ["exec_tty.ready", "exec_tty.stdout"]],
        [10, ["log_stream.data"]],
      ] as const) {
        for (const name of names) {
          const ns = w.notifications(name, id);
          assert.ok(ns.length > 0, `no ${name}`);
          for (const n of ns) assert.ok(v.safeParse(RpcServerNotifications[name], n.params).success, name);
        }
      }
      assert.equal(
        Buffer.from(String((results.get("exec") as { stdout: string }).stdout), "base64").toString(),
        "out\n",
      );
      assert.equal(
        Buffer.from(String((results.get("read_file") as { content: string }).content), "base64").toString(),
        "hi",
      );
    } finally {
      w.child.stdin.end();
    }
    assert.equal(await w.closed(), 0);
    assert.equal((await runCli(["prune"], { env: h.env })).code, 0);
  });

  test("EOF on stdin cancels a running command and closes the VM", async () => {
    const w = new Wire();
    w.request(1, "create", {});
    const id = ((await w.response(1)).result as { id: string }).id;
    w.request(2, "exec", { command: "sleep 600" });
    await new Promise((r) => setTimeout(r, 500));
    w.child.stdin.end();
    assert.equal(await w.closed(), 0);
    assert.deepEqual(qemuProcessesMentioning(id), []);
    assert.deepEqual(h.vmDirs(), []);
  });
});

describe("the SDK against real VMs", () => {
  let client: Client;
  before(async () => {
    client = new Client({ env: h.env });
    await client.launch(new Sandbox().withMemory(384).withEnv("A", "1").withHostname("sdkbox"));
  });
  after(async () => {
    await client?.close();
  });

  test("exec returns exit code, stdout, stderr and duration", async () => {
    const r = await client.exec("echo hi $A $(hostname); echo oops >&2; exit 3");
    assert.equal(r.exitCode, 3);
    assert.equal(r.stdout, "hi 1 sdkbox\n");
    assert.equal(r.stderr, "oops\n");
    assert.ok(r.durationMs >= 0);
    const u = await client.exec("id -u; pwd", { user: "user", workingDir: "/tmp" });
    assert.equal(u.stdout, "1000\n/tmp\n");
  });

  test("execStream delivers output as it happens, in order", async () => {
    const chunks: string[] = [];
    const r = await client.execStream("for i in 1 2 3; do echo $i; sleep 0.2; done", {
      stdout: (c) => chunks.push(c.toString()),
    });
    assert.equal(r.exitCode, 0);
    assert.equal(chunks.join(""), "1\n2\n3\n");
    assert.ok(chunks.length >= 2, "streamed in pieces, not at the end");
  });

  test("execPipe: 10 MiB of binary stdin in order", async () => {
    const data = randomBytes(10 * 1024 * 1024);
    const out: Buffer[] = [];
    const r = await client.execPipe("cat", { stdin: data, stdout: (c) => out.push(c) });
    assert.equal(r.exitCode, 0);
    assert.equal(sha(Buffer.concat(out)), sha(data));
  });

  test("execInteractive: a PTY with the asked size, input, and resize", async () => {
    let out = "";
    async function* sizes() {
      await new Promise((r) => setTimeout(r, 800));
      yield [50, 132] as [number, number];
    }
    const r = await client.execInteractive("stty size; sleep 1.5; stty size; read x; echo got-$x", {
      rows: 40,
      cols: 120,
      stdin: (async function* () {
        await new Promise((res) => setTimeout(res, 2500));
        yield "typed\n";
      })(),
      stdout: (c) => (out += c.toString()),
      resize: sizes(),
    });
    assert.equal(r.exitCode, 0);
    assert.match(out, /^40 120\r\n50 132\r\n/);
    assert.match(out, /got-typed/);
  });

  test("files: write, read, list", async () => {
    const data = randomBytes(1024 * 1024);
    await client.writeFile("/workspace/data.bin", data, { mode: 0o600 });
    await client.writeFile("/workspace/a.py", "print(1)");
    assert.ok((await client.readFile("/workspace/data.bin")).equals(data));
    const files = await client.listFiles("/workspace");
    assert.deepEqual(
      files.map((f) => [f.name, f.size, f.mode & 0o777, f.isDir]),
      [
        ["a.py", 8, 0o644, false],
        ["data.bin", data.length, 0o600, false],
      ],
    );
    assert.match(files[0]?.modTime ?? "", /^\d{4}-\d\d-\d\dT/);
    await assert.rejects(
      client.readFile("/nope"),
      (e: Error) => e instanceof RPCError && e.code === RPC_CODES.FILE_FAILED,
    );
  });

  test("20 concurrent execs", async () => {
    const rs = await Promise.all(
      Array.from({ length: 20 }, (_, i) => client.exec(`echo ${i}; exit ${i % 7}`)),
    );
    rs.forEach((r, i) => {
      assert.equal(r.stdout, `${i}\n`);
      assert.equal(r.exitCode, i % 7);
    });
  });

  test("cancel mid-stream: the guest process is gone within the grace period", async () => {
    const ac = new AbortController();
    let seen = "";
    const p = client.execStream("echo started; sleep 777", { stdout: (c) => (seen += c), signal: ac.signal });
    while (!seen.includes("started")) await new Promise((r) => setTimeout(r, 50));
    ac.abort();
    await assert.rejects(p);
    let left = "1";
    const end = Date.now() + 5000;
    while (left !== "0" && Date.now() < end) {
      left = (await client.exec("ps -o args | grep -c '^sleep 777' || true")).stdout.trim();
    }
    assert.equal(left, "0");
  });

  test("timeoutMs stops a call and its command", async () => {
    const t = Date.now();
    await assert.rejects(
      client.exec("sleep 600", { timeoutMs: 700 }),
      (e: Error) => e instanceof MatchlockError && /timed out/.test(e.message),
    );
    assert.ok(Date.now() - t < 5000);
  });

  test("log returns the VM console", async () => {
    assert.equal(typeof (await client.log()), "string");
  });
});

describe("lifetimes", () => {
  test("resources.lifetime_seconds (ours) closes the VM when it runs out", async () => {
    const c = new Client({ env: h.env });
    await c.launch(new Sandbox().withLifetime(3));
    await new Promise((r) => setTimeout(r, 4500));
    await assert.rejects(c.exec("true"), (e: Error) => e instanceof RPCError && /timeout/.test(e.message));
    await c.close();
  });

  test("close leaves the VM listed as stopped; remove then deletes it (Matchlock's clean-up)", async () => {
    const c = new Client({ env: h.env });
    await c.launch(new Sandbox());
    const id = c.vmId;
    await c.close();
    const listed = (await runCli(["list"], { env: h.env })).stdout.toString();
    assert.match(listed, new RegExp(`${id}\\s+stopped`));
    await c.remove();
    assert.doesNotMatch((await runCli(["list"], { env: h.env })).stdout.toString(), new RegExp(id));
    assert.ok(!h.vmDirs().includes(id));
  });

  test("resources.timeout_seconds is stored, never enforced, as in Matchlock (its SDK always sends 300)", async () => {
    const c = new Client({ env: h.env });
    await c.launch(new Sandbox().withTimeout(2));
    await new Promise((r) => setTimeout(r, 3500));
    assert.equal((await c.exec("echo alive")).stdout, "alive\n");
    const get = await runCli(["get", c.vmId as string], { env: h.env });
    assert.match(get.stdout.toString(), /"timeout_seconds": ?2/);
    await c.close();
  });

  test("killing the program that uses the SDK leaves nothing that gc cannot reclaim", async () => {
    const script = `
      import { Client, Sandbox } from ${JSON.stringify(new URL("../../src/sdk/index.ts", import.meta.url).href)};
      const c = new Client();
      await c.launch(new Sandbox());
      process.stdout.write(c.vmId + "\\n");
      setInterval(() => {}, 1000);`;
    const prog = spawn(process.execPath, ["--input-type=module", "-e", script], { env: h.env });
    let id = "";
    prog.stdout.on("data", (d: Buffer) => (id += d.toString()));
    while (!id.includes("\n")) await new Promise((r) => setTimeout(r, 100));
    id = id.trim();
    prog.kill("SIGKILL");
    // The rpc child sees EOF and closes the VM; whatever is left, gc reclaims.
    const end = Date.now() + 20_000;
    while (qemuProcessesMentioning(id).length > 0 && Date.now() < end)
      await new Promise((r) => setTimeout(r, 200));
    const gc = await runCli(["gc"], { env: h.env });
    assert.equal(gc.code, 0, gc.stdout.toString());
    assert.deepEqual(qemuProcessesMentioning(id), []);
    await runCli(["prune"], { env: h.env });
    assert.deepEqual(h.vmDirs(), []);
  });
});

test("a program on the system Node (older than the CLI's 24) drives a sandbox through the SDK", async () => {
  const systemNode = "/usr/bin/node";
  assert.ok(existsSync(systemNode), "the machine's Node (npm runs on it) is at /usr/bin/node");
  const program = `
    import { Client, Sandbox } from ${JSON.stringify(join(REPO, "dist", "sdk", "index.js"))};
    const c = new Client();
    await c.launch(new Sandbox().withNoNetwork());
    const r = await c.exec("echo sandbox-from-node-" + process.versions.node.split(".")[0]);
    process.stdout.write(r.stdout);
    await c.close();
    await c.remove();
  `;
  const r = await spawnCollect(systemNode, ["--input-type=module", "-e", program], {
    env: h.env,
    timeoutMs: 180_000,
  });
  assert.equal(r.code, 0, r.stderr);
  const major = (await spawnCollect(systemNode, ["-p", "process.versions.node"])).stdout
    .toString()
    .split(".")[0];
  assert.equal(r.stdout.toString(), `sandbox-from-node-${major}\n`);
});
