/**
 * bench/memory: host memory while a guest floods a slow reader (SECURITY.md: bounded memory).
 * The guest writes `--bytes` (default 2 GiB) of output as fast as it can; the reader takes 1 MB/s
 * for `--slow-seconds` (default 30), then reads the rest at full speed. Measured for
 *   - `matchlock run -- head -c N /dev/zero` (its stdout is the pipe we read), and
 *   - `matchlock rpc` exec_stream of the same command (its stdout carries the notifications).
 * RSS of the matchlock process is sampled every 100 ms: p50/p99/max in each phase, and the ratio of
 * the peak to the same process's RSS when the output started (the baseline, same run).
 * Usage: npm run build && node bench/memory.ts [--bytes N] [--slow-seconds S]
 */
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const CLI = fileURLToPath(new URL("../dist/cli/main.js", import.meta.url));
const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const BYTES = arg("--bytes", 2 * 1024 ** 3);
const SLOW_SECONDS = arg("--slow-seconds", 30);
const SLOW_RATE = 1_000_000; // bytes per second
const MiB = 1024 * 1024;

function rss(pid: number): number {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? Number.NaN;
}

const mib = (b: number) => `${(b / MiB).toFixed(0)} MiB`;

interface Phases {
  baseline: number;
  slow: number[];
  fast: number[];
  fastSeconds: number;
  payload: number;
}

/**
 * Reads `out` at SLOW_RATE for SLOW_SECONDS, then freely until it ends, sampling the RSS of `pid`.
 * `count` turns a chunk of `out` into payload bytes (the rpc wire is JSON + base64).
 */
async function measure(
  pid: number,
  out: NodeJS.ReadableStream,
  count: (chunk: Buffer) => number,
  ended: Promise<unknown>,
): Promise<Phases> {
  let read = 0;
  let payload = 0;
  let phase: "start" | "slow" | "fast" = "start";
  let slowStart = 0;
  const r: Phases = { baseline: 0, slow: [], fast: [], fastSeconds: 0, payload: 0 };
  const sampler = setInterval(() => {
    if (phase === "slow") r.slow.push(rss(pid));
    if (phase === "fast") r.fast.push(rss(pid));
  }, 100);
  out.on("data", (d: Buffer) => {
    payload += count(d);
    if (phase === "start") {
      phase = "slow";
      slowStart = Date.now();
      r.baseline = rss(pid);
    }
    if (phase !== "slow") return;
    read += d.length;
    const elapsed = (Date.now() - slowStart) / 1000;
    if (elapsed >= SLOW_SECONDS) {
      phase = "fast";
      r.fastSeconds = Date.now();
      return;
    }
    const ahead = read / SLOW_RATE - elapsed;
    if (ahead > 0) {
      out.pause();
      setTimeout(() => out.resume(), ahead * 1000);
    }
  });
  await ended;
  clearInterval(sampler);
  r.fastSeconds = (Date.now() - r.fastSeconds) / 1000;
  r.payload = payload;
  return r;
}

function report(name: string, r: Phases): void {
  const all = [...r.slow, ...r.fast];
  const peak = Math.max(...all);
  console.log(`${name}: ${mib(r.payload)} delivered; baseline RSS ${mib(r.baseline)} when output began`);
  console.log(
    `  reader at 1 MB/s (${SLOW_SECONDS} s)   RSS p50 ${mib(pct(r.slow, 50))}  p99 ${mib(pct(r.slow, 99))}  max ${mib(Math.max(...r.slow))}`,
  );
  console.log(
    `  reader at full speed (${r.fastSeconds.toFixed(0)} s)  RSS p50 ${mib(pct(r.fast, 50))}  p99 ${mib(pct(r.fast, 99))}  max ${mib(Math.max(...r.fast))}  (${((r.payload - SLOW_RATE * SLOW_SECONDS) / MiB / r.fastSeconds).toFixed(1)} MiB/s)`,
  );
  console.log(
    `  peak / baseline ${(peak / r.baseline).toFixed(2)}  (peak − baseline ${mib(peak - r.baseline)})`,
  );
}

async function benchRun(env: NodeJS.ProcessEnv): Promise<Phases> {
  const child = spawn(process.execPath, [CLI, "run", "--", "head", "-c", String(BYTES), "/dev/zero"], {
    env,
  });
  child.stderr.pipe(process.stderr);
  const ended = new Promise((r) => child.on("close", r));
  return measure(child.pid as number, child.stdout, (d) => d.length, ended);
}

async function benchRpc(env: NodeJS.ProcessEnv): Promise<Phases> {
  const child: ChildProcessWithoutNullStreams = spawn(process.execPath, [CLI, "rpc"], { env });
  child.stderr.resume();
  const send = (id: number, method: string, params: unknown) =>
    child.stdin.write(`${JSON.stringify({ jsonrpc: "2.0", id, method, params })}\n`);
  let buf = "";
  let done: (() => void) | undefined;
  let created: (() => void) | undefined;
  const isCreated = new Promise<void>((r) => {
    created = r;
  });
  const ended = new Promise<void>((r) => {
    done = r;
  });
  // Counts base64 payload of exec_stream.stdout lines; resolves `ended` at the exec's response.
  const count = (d: Buffer): number => {
    buf += d.toString("latin1");
    let n = 0;
    let nl = buf.indexOf("\n");
    while (nl >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      nl = buf.indexOf("\n");
      const m = /"data":"([^"]*)"/.exec(line);
      if (m) n += Buffer.byteLength(m[1] as string, "base64");
      else if (line.includes('"id":2')) done?.();
    }
    return n;
  };
  child.stdout.once("data", () => created?.());
  send(1, "create", {});
  await isCreated;
  send(2, "exec_stream", { command: `head -c ${BYTES} /dev/zero` });
  const r = await measure(child.pid as number, child.stdout, count, ended);
  child.stdin.end();
  await new Promise((res) => child.on("close", res));
  return r;
}

async function main(): Promise<void> {
  const home = mkdtempSync(join(tmpdir(), "matchlock-bench-memory-"));
  const env = { ...process.env, MATCHLOCK_HOME: home };
  console.log(
    `bench/memory on ${cpus().length} × ${cpus()[0]?.model ?? "?"}: guest writes ${mib(BYTES)}, reader 1 MB/s for ${SLOW_SECONDS} s then full speed`,
  );
  try {
    report("matchlock run", await benchRun(env));
    report("matchlock rpc exec_stream", await benchRpc(env));
  } finally {
    rmSync(home, { recursive: true, force: true });
  }
}

await main();
