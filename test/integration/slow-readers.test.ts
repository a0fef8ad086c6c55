import assert from "node:assert/strict";
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { after, describe, test } from "node:test";
import { CLI, runCli, tempHome } from "../helpers/cli.ts";

/**
 * Hostile output and slow or vanished readers (SECURITY.md: bounded memory whatever the guest
 * sends). A guest writes as fast as it can; the reader on the host stops reading, or goes away. The
 * host processes must stall the guest's writer instead of buffering, and a closed pipe must end the
 * command the way a local pipeline does, with nothing left behind.
 */

const h = tempHome();
after(() => h.cleanup());

const MiB = 1024 * 1024;
/** What a stalled reader may cost the host: windows and stream buffers, far below what was sent. */
const STALL_GROWTH_LIMIT = 48 * MiB;
const STALL_MS = 8000;

function rssBytes(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) * 1024 : 0;
}

/** Samples the RSS of `pids` every 100 ms for `ms`; returns the peak of each. */
async function peakRss(pids: number[], ms: number): Promise<number[]> {
  const peak = pids.map(rssBytes);
  const end = Date.now() + ms;
  while (Date.now() < end) {
    await new Promise((r) => setTimeout(r, 100));
    pids.forEach((p, i) => {
      peak[i] = Math.max(peak[i] as number, rssBytes(p));
    });
  }
  return peak;
}

function cli(args: string[]): ChildProcessWithoutNullStreams {
  const child = spawn(process.execPath, [CLI, ...args], { env: h.env });
  child.stderr.setEncoding("utf8");
  return child;
}

/**
 * Reads a little of `child`'s stdout, stops reading for STALL_MS while measuring the RSS of `pids`,
 * then reads the rest. Returns the bytes read and each process's growth during the stall.
 */
async function stallThenDrain(
  child: ChildProcessWithoutNullStreams,
  pids: number[],
): Promise<{ bytes: number; growth: number[]; code: number | null; stderr: string }> {
  let bytes = 0;
  let stderr = "";
  child.stderr.on("data", (d: string) => {
    stderr += d;
  });
  const closed = new Promise<number | null>((r) => child.on("close", (code) => r(code)));
  await new Promise<void>((resolve) => {
    child.stdout.once("data", (d: Buffer) => {
      bytes += d.length;
      child.stdout.pause();
      resolve();
    });
  });
  const base = pids.map(rssBytes);
  const peak = await peakRss(pids, STALL_MS);
  child.stdout.on("data", (d: Buffer) => {
    bytes += d.length;
  });
  child.stdout.resume();
  const code = await closed;
  return { bytes, growth: peak.map((p, i) => p - (base[i] as number)), code, stderr };
}

/** `CMD | head -1` in bash: what head printed and the exit status of CMD. */
async function pipeToHead(args: string[]): Promise<{ out: string; status: number; stderr: string }> {
  const quoted = [process.execPath, CLI, ...args].map((a) => `'${a.replaceAll("'", "'\\''")}'`).join(" ");
  const child = spawn("bash", ["-c", `${quoted} | head -1; echo "status=\${PIPESTATUS[0]}"`], {
    env: h.env,
  });
  let out = "";
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => {
    out += d.toString();
  });
  child.stderr.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  await new Promise((r) => child.on("close", r));
  const m = /status=(\d+)\n$/.exec(out);
  assert.ok(m, `no status in ${JSON.stringify(out)}`);
  return { out: out.slice(0, m.index), status: Number(m[1]), stderr };
}

describe("slow and vanished readers", () => {
  test("slow reader: `run` stalls the guest's writer, host memory stays bounded, every byte arrives", async () => {
    const child = cli(["run", "--", "sh", "-c", "head -c 67108864 /dev/zero; echo done >&2"]);
    const r = await stallThenDrain(child, [child.pid as number]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.bytes, 64 * MiB);
    assert.match(r.stderr, /done/);
    assert.ok(
      (r.growth[0] as number) < STALL_GROWTH_LIMIT,
      `matchlock run grew ${Math.round((r.growth[0] as number) / MiB)} MiB while its reader stalled`,
    );
  });

  test("closed pipe: `run -- seq … | head -1` ends the command with SIGPIPE, no stack trace, no VM left", async () => {
    const r = await pipeToHead(["run", "--", "seq", "1", "100000000"]);
    assert.equal(r.out, "1\n");
    assert.equal(r.status, 141, r.stderr); // 128 + SIGPIPE: the guest's seq died of it, as it would locally
    assert.doesNotMatch(r.stderr, /EPIPE|Error|at /);
    assert.deepEqual(h.vmDirs(), []);
  });

  test("slow reader and closed pipe through the exec relay: owner and exec client stay bounded", async () => {
    const started = await runCli(["run", "-d", "--", "sleep", "600"], { env: h.env });
    assert.equal(started.code, 0, started.stderr);
    const id = started.stdout.toString().trim();
    try {
      const info = await runCli(["get", id], { env: h.env });
      const owner = (JSON.parse(info.stdout.toString()) as { pid: number }).pid;
      assert.ok(owner > 0);
      const child = cli(["exec", id, "--", "head", "-c", "67108864", "/dev/zero"]);
      const r = await stallThenDrain(child, [child.pid as number, owner]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.bytes, 64 * MiB);
      const [client, server] = r.growth as [number, number];
      assert.ok(client < STALL_GROWTH_LIMIT, `matchlock exec grew ${Math.round(client / MiB)} MiB`);
      assert.ok(server < STALL_GROWTH_LIMIT, `the owner grew ${Math.round(server / MiB)} MiB`);

      const p = await pipeToHead(["exec", id, "--", "seq", "1", "100000000"]);
      assert.equal(p.out, "1\n");
      assert.equal(p.status, 141, p.stderr);
      assert.doesNotMatch(p.stderr, /EPIPE|Error|at /);
      // The VM is still there and answers.
      const again = await runCli(["exec", id, "--", "echo", "alive"], { env: h.env });
      assert.equal(again.stdout.toString(), "alive\n");
    } finally {
      await runCli(["kill", id], { env: h.env });
      await runCli(["rm", id], { env: h.env });
    }
  });
});

describe("a stopped owner", () => {
  test("exec into a VM whose owner is stopped (SIGSTOP) fails within seconds, naming the cause", async () => {
    const started = await runCli(["run", "-d", "--", "sleep", "600"], { env: h.env });
    assert.equal(started.code, 0, started.stderr);
    const id = started.stdout.toString().trim();
    const owner = (
      JSON.parse((await runCli(["get", id], { env: h.env })).stdout.toString()) as { pid: number }
    ).pid;
    process.kill(owner, "SIGSTOP");
    try {
      const r = await runCli(["exec", id, "--", "true"], { env: h.env, timeoutMs: 60_000 });
      assert.equal(r.code, 1, r.stderr);
      assert.equal(r.signal, null, "exec hung until the test killed it");
      assert.match(r.stderr, /did not answer within 10 s/);
      assert.match(r.stderr, /stopped or hung/);
      assert.doesNotMatch(r.stderr, /at /);
    } finally {
      process.kill(owner, "SIGCONT");
      await runCli(["kill", id], { env: h.env });
      await runCli(["rm", id], { env: h.env });
    }
  });
});

/** A raw `matchlock rpc` session that counts streamed bytes instead of keeping them. */
class Wire {
  readonly child: ChildProcessWithoutNullStreams;
  private buf = "";
  private readonly responses = new Map<number, Record<string, unknown>>();
  private waiters: Array<() => void> = [];
  streamed = 0;

  constructor() {
    this.child = spawn(process.execPath, [CLI, "rpc"], { env: h.env });
    this.child.stdout.setEncoding("utf8");
    this.child.stdout.on("data", (d: string) => {
      this.buf += d;
      let nl = this.buf.indexOf("\n");
      while (nl >= 0) {
        const msg = JSON.parse(this.buf.slice(0, nl)) as Record<string, unknown>;
        this.buf = this.buf.slice(nl + 1);
        nl = this.buf.indexOf("\n");
        if (typeof msg.id === "number") this.responses.set(msg.id, msg);
        else if (msg.method === "exec_stream.stdout") {
          this.streamed += Buffer.from(String((msg.params as { data: string }).data), "base64").length;
        }
      }
      for (const w of this.waiters.splice(0)) w();
    });
    this.child.stderr.resume();
  }

  request(id: number, method: string, params?: unknown): void {
    this.child.stdin.write(`${JSON.stringify({ jsonrpc: "2.0", id, method, params })}\n`);
  }

  async response(id: number, timeoutMs = 120_000): Promise<Record<string, unknown>> {
    const end = Date.now() + timeoutMs;
    while (!this.responses.has(id)) {
      if (Date.now() > end) throw new Error(`no response for id ${id}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 200);
      });
    }
    return this.responses.get(id) as Record<string, unknown>;
  }

  async call(id: number, method: string, params?: unknown): Promise<Record<string, unknown>> {
    this.request(id, method, params);
    return this.response(id);
  }
}

const errorOf = (m: Record<string, unknown>) => m.error as { code: number; message: string } | undefined;

describe("matchlock rpc under hostile output", () => {
  test("exec, exec_stream, read_file and a NUL path: bounded memory, clear errors, the server survives and cleans up", async () => {
    const w = new Wire();
    const pid = w.child.pid as number;
    const created = await w.call(1, "create", {});
    assert.ok(!errorOf(created), JSON.stringify(created));

    // exec of endless output: refused past its cap, the command stopped, memory bounded.
    const base = rssBytes(pid);
    w.request(2, "exec", { command: "cat /dev/zero" });
    let peak = base;
    const sampling = (async () => {
      while (
        !(await Promise.race([w.response(2).then(() => true), new Promise((r) => setTimeout(r, 100))]))
      ) {
        peak = Math.max(peak, rssBytes(pid));
      }
    })();
    const flood = await w.response(2);
    await sampling;
    assert.equal(errorOf(flood)?.code, -32001, JSON.stringify(flood).slice(0, 300));
    assert.match(errorOf(flood)?.message ?? "", /exceeded 64 MiB.*exec_stream/);
    assert.ok(peak - base < 400 * MiB, `matchlock rpc grew ${Math.round((peak - base) / MiB)} MiB`);

    // exec_stream to a client that stops reading: the guest stalls, the server does not buffer.
    w.request(3, "exec_stream", { command: "head -c 67108864 /dev/zero" });
    while (w.streamed === 0) await new Promise((r) => setTimeout(r, 50));
    w.child.stdout.pause();
    const before = rssBytes(pid);
    const [stalledPeak] = await peakRss([pid], STALL_MS);
    w.child.stdout.resume();
    const streamed = await w.response(3);
    assert.equal((streamed.result as { exit_code: number }).exit_code, 0);
    assert.equal(w.streamed, 64 * MiB);
    const growth = (stalledPeak as number) - before;
    assert.ok(
      growth < STALL_GROWTH_LIMIT,
      `matchlock rpc grew ${Math.round(growth / MiB)} MiB while stalled`,
    );

    // read_file: too big or endless is refused clearly; later calls still work.
    const zero = await w.call(4, "read_file", { path: "/dev/zero" });
    assert.equal(errorOf(zero)?.code, -32002);
    assert.match(errorOf(zero)?.message ?? "", /larger than 64 MiB/);
    await w.call(5, "exec", { command: "head -c 104857600 /dev/zero > /tmp/big" });
    const big = await w.call(6, "read_file", { path: "/tmp/big" });
    assert.equal(errorOf(big)?.code, -32002);
    const small = await w.call(7, "read_file", { path: "/etc/hostname" });
    assert.ok(!errorOf(small), JSON.stringify(small));

    // A NUL byte in a path is bad params, and never kills the server.
    const nul = await w.call(8, "write_file", { path: "/tmp/a\u0000b", content: "eA==" });
    assert.equal(errorOf(nul)?.code, -32602);
    assert.match(errorOf(nul)?.message ?? "", /NUL/);
    const after = await w.call(9, "exec", { command: "echo ok" });
    assert.equal(
      Buffer.from(String((after.result as { stdout: string }).stdout), "base64").toString(),
      "ok\n",
    );

    const closed = await w.call(10, "close", {});
    assert.ok(!errorOf(closed), JSON.stringify(closed));
    w.child.stdin.end();
    const code = await new Promise((r) => w.child.on("close", r));
    assert.equal(code, 0);
    // close leaves the VM listed as stopped (Matchlock's semantics) until rm.
    const [id] = h.vmDirs();
    assert.match((await runCli(["list"], { env: h.env })).stdout.toString(), new RegExp(`${id}\\s+stopped`));
    assert.equal((await runCli(["rm", id as string], { env: h.env })).code, 0);
    assert.deepEqual(h.vmDirs(), []);
  });

  test("a NUL path then stdin EOF: the server closes the VM and exits cleanly", async () => {
    const w = new Wire();
    assert.ok(!errorOf(await w.call(1, "create", {})));
    assert.equal(errorOf(await w.call(2, "write_file", { path: "/x\u0000", content: "" }))?.code, -32602);
    assert.equal(errorOf(await w.call(3, "read_file", { path: "/x\u0000" }))?.code, -32602);
    assert.equal(errorOf(await w.call(4, "list_files", { path: "/x\u0000" }))?.code, -32602);
    w.child.stdin.end();
    const code = await new Promise((r) => w.child.on("close", r));
    assert.equal(code, 0);
    assert.deepEqual(h.vmDirs(), []);
  });
});
