/**
 * bench/snapshot: fast starts. In one run, alternating (machines here are noisy):
 *   1. `matchlock run -- true` end to end, restored from the image's snapshot vs. a cold boot (--cold);
 *   2. create → ready in a long-lived program: in-process Sandbox.create, and the SDK's
 *      `new Client().create()` (which also starts its `matchlock rpc` child), restored vs. cold;
 *   3. the first exec after a restore vs. after a cold boot;
 *   4. host memory (PSS of each QEMU, from /proc/PID/smaps_rollup) of N idle restored VMs vs. N cold.
 * Usage: npm run bench:snapshot [-- --runs N --idle N]
 */
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseSandboxConfig } from "../src/api/config.ts";
import { paths } from "../src/api/paths.ts";
import { Sandbox } from "../src/sandbox/sandbox.ts";
import { Client } from "../src/sdk/index.ts";

const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const RUNS = arg("--runs", 10);
const IDLE = arg("--idle", 8);
const CLI = fileURLToPath(new URL("../dist/cli/main.js", import.meta.url));

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? Number.NaN;
}
const fmt = (ms: number) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`);
const row = (label: string, xs: number[]) =>
  `${label.padEnd(38)} p50 ${fmt(pct(xs, 50)).padStart(8)}  p99 ${fmt(pct(xs, 99)).padStart(8)}  (n=${xs.length})`;

function timed(args: string[], env: NodeJS.ProcessEnv): Promise<number> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "ignore", "pipe"], env });
    let err = "";
    c.stderr.on("data", (d: Buffer) => (err += d.toString()));
    c.on("error", reject);
    c.on("close", (code) => (code === 0 ? resolve(performance.now() - t0) : reject(new Error(err))));
  });
}

function pssKb(pid: number): number {
  return Number(/^Pss:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"))?.[1] ?? 0);
}

async function main(): Promise<void> {
  const scratch = mkdtempSync(join(tmpdir(), "matchlock-bench-snap-"));
  const env = { ...process.env, MATCHLOCK_HOME: join(scratch, "home") };
  const p = paths(env);
  const config = parseSandboxConfig({});
  console.log(`bench/snapshot on ${cpus().length} × ${cpus()[0]?.model ?? "?"}, ${RUNS} runs each`);
  try {
    // Build the snapshot and warm the page cache; not counted.
    await timed(["run", "--", "true"], env);
    await timed(["run", "--cold", "--", "true"], env);

    const cliRestore: number[] = [];
    const cliCold: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      cliRestore.push(await timed(["run", "--", "true"], env));
      cliCold.push(await timed(["run", "--cold", "--", "true"], env));
    }
    console.log(row("run -- true, restored", cliRestore));
    console.log(row("run -- true, cold (--cold)", cliCold));
    console.log(
      `  ratio restored / cold (medians)      ${(pct(cliRestore, 50) / pct(cliCold, 50)).toFixed(2)}`,
    );

    const inRestore: number[] = [];
    const inCold: number[] = [];
    const firstRestore: number[] = [];
    const firstCold: number[] = [];
    const sdkRestore: number[] = [];
    const sdkCold: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      for (const cold of [false, true]) {
        let t = performance.now();
        const sb = await Sandbox.create({ config, paths: p, cold });
        (cold ? inCold : inRestore).push(performance.now() - t);
        t = performance.now();
        await sb.exec({ argv: ["true"] }).done;
        (cold ? firstCold : firstRestore).push(performance.now() - t);
        await sb.close();

        const client = new Client({ env: { ...env, ...(cold ? { MATCHLOCK_COLD: "1" } : {}) } });
        t = performance.now();
        await client.create({});
        (cold ? sdkCold : sdkRestore).push(performance.now() - t);
        await client.close();
        await client.remove();
      }
    }
    console.log(row("Sandbox.create → ready, restored", inRestore));
    console.log(row("Sandbox.create → ready, cold", inCold));
    console.log(row("SDK new Client().create(), restored", sdkRestore));
    console.log(row("SDK new Client().create(), cold", sdkCold));
    console.log(row("first exec after a restore", firstRestore));
    console.log(row("first exec after a cold boot", firstCold));

    for (const cold of [false, true]) {
      const vms: Sandbox[] = [];
      try {
        for (let i = 0; i < IDLE; i++) vms.push(await Sandbox.create({ config, paths: p, cold }));
        await new Promise((r) => setTimeout(r, 3000)); // let them settle
        const pss = vms.map((v) => pssKb(v.vmPid) / 1024);
        const sum = pss.reduce((a, b) => a + b, 0);
        console.log(
          `${IDLE} idle VMs, ${cold ? "cold    " : "restored"}               QEMU PSS ${sum.toFixed(0)} MiB in all, ` +
            `${(sum / IDLE).toFixed(0)} MiB each`,
        );
      } finally {
        for (const v of vms) await v.close();
      }
    }
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

await main();
