/**
 * The restore half of bench/boot (fast starts), alternating (machines here are noisy):
 *   1. `matchlock run -- true` end to end, restored from the image's snapshot vs. a cold boot (--cold);
 *   2. create → ready in a long-lived program: in-process Sandbox.create restored vs. cold, and the
 *      SDK's `new Client().create()` three ways: its warm spare `matchlock rpc` child holding a clone
 *      made ahead of time (the default), the spare without one (MATCHLOCK_PRESTART=0), and no spare
 *      (MATCHLOCK_SDK_SPARE=0: each client starts its own); with the first exec through the SDK;
 *   3. the first exec after a restore vs. after a cold boot;
 *   4. host memory (PSS of each QEMU, from /proc/PID/smaps_rollup) of N idle restored VMs vs. N cold.
 */
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseSandboxConfig } from "../src/api/config.ts";
import { paths } from "../src/api/paths.ts";
import { Sandbox } from "../src/sandbox/sandbox.ts";
import { Client } from "../src/sdk/index.ts";

export interface RestoreBenchOptions {
  /** The launcher users run. */
  cli: string;
  /** A scratch dir of this run (its own MATCHLOCK_HOME goes in it). */
  scratch: string;
  runs: number;
  idle: number;
}

export function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? Number.NaN;
}
const fmt = (ms: number) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`);
const row = (label: string, xs: number[]) =>
  `${label.padEnd(44)} p50 ${fmt(pct(xs, 50)).padStart(8)}  p99 ${fmt(pct(xs, 99)).padStart(8)}  (n=${xs.length})`;

/** Runs a command to its end; its time, and its output (in the error when it fails). */
export function timed(
  cmd: string,
  args: string[],
  env?: NodeJS.ProcessEnv,
): Promise<{ ms: number; out: string }> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: env ?? process.env });
    let out = "";
    c.stdout.on("data", (d: Buffer) => (out += d.toString()));
    c.stderr.on("data", (d: Buffer) => (out += d.toString()));
    c.on("error", reject);
    c.on("close", (code) => {
      if (code !== 0) reject(new Error(`${cmd} exited ${code}: ${out.slice(-500)}`));
      else resolve({ ms: performance.now() - t0, out });
    });
  });
}

function pssKb(pid: number): number {
  return Number(/^Pss:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"))?.[1] ?? 0);
}

export async function benchRestore(o: RestoreBenchOptions): Promise<void> {
  const env: NodeJS.ProcessEnv = { ...process.env, MATCHLOCK_HOME: join(o.scratch, "home-restore") };
  delete env.MATCHLOCK_COLD; // this section chooses per series
  const p = paths(env);
  const config = parseSandboxConfig({});
  // Build the snapshot and warm the page cache; not counted.
  await timed(o.cli, ["run", "--", "true"], env);
  await timed(o.cli, ["run", "--cold", "--", "true"], env);

  const cliRestore: number[] = [];
  const cliCold: number[] = [];
  for (let i = 0; i < o.runs; i++) {
    cliRestore.push((await timed(o.cli, ["run", "--", "true"], env)).ms);
    cliCold.push((await timed(o.cli, ["run", "--cold", "--", "true"], env)).ms);
  }
  console.log(row("run -- true, restored", cliRestore));
  console.log(row("run -- true, cold (--cold)", cliCold));
  console.log(`  ratio restored / cold (medians)  ${(pct(cliRestore, 50) / pct(cliCold, 50)).toFixed(2)}`);

  const t = {
    inRestore: [] as number[],
    inCold: [] as number[],
    firstRestore: [] as number[],
    firstCold: [] as number[],
    sdkClone: [] as number[],
    sdkSpare: [] as number[],
    sdkNoSpare: [] as number[],
    sdkFirstClone: [] as number[],
    sdkFirstSpare: [] as number[],
  };
  const sdkCreate = async (extra: NodeJS.ProcessEnv, into?: { create: number[]; first: number[] }) => {
    const client = new Client({ env: { ...env, ...extra } });
    let t0 = performance.now();
    await client.create({});
    into?.create.push(performance.now() - t0);
    t0 = performance.now();
    await client.exec("true");
    into?.first.push(performance.now() - t0);
    await client.close();
    await client.remove();
    // The SDK starts its next spare once the client is idle (or 1 s after the create): let that
    // happen here, outside every timed window, as it would between a program's tasks.
    await new Promise((r) => setTimeout(r, 1500));
  };
  // Round 0 warms up (and starts the SDK's spares); not counted.
  for (let i = 0; i <= o.runs; i++) {
    const keep = i > 0;
    for (const cold of [false, true]) {
      let t0 = performance.now();
      const sb = await Sandbox.create({ config, paths: p, cold });
      if (keep) (cold ? t.inCold : t.inRestore).push(performance.now() - t0);
      t0 = performance.now();
      await sb.exec({ argv: ["true"] }).done;
      if (keep) (cold ? t.firstCold : t.firstRestore).push(performance.now() - t0);
      await sb.close();
    }
    // Two series with a spare each: the SDK keeps at most two idle.
    await sdkCreate({}, keep ? { create: t.sdkClone, first: t.sdkFirstClone } : undefined);
    await sdkCreate(
      { MATCHLOCK_PRESTART: "0" },
      keep ? { create: t.sdkSpare, first: t.sdkFirstSpare } : undefined,
    );
    await sdkCreate({ MATCHLOCK_SDK_SPARE: "0" }, keep ? { create: t.sdkNoSpare, first: [] } : undefined);
  }
  console.log(row("Sandbox.create → ready, restored", t.inRestore));
  console.log(row("Sandbox.create → ready, cold", t.inCold));
  console.log(row("SDK Client().create(), clone made ahead", t.sdkClone));
  console.log(row("SDK Client().create(), spare, no clone", t.sdkSpare));
  console.log(row("SDK Client().create(), no spare", t.sdkNoSpare));
  console.log(
    `  ratio clone made ahead / spare without (medians)  ${(pct(t.sdkClone, 50) / pct(t.sdkSpare, 50)).toFixed(2)}`,
  );
  console.log(row("SDK first exec, clone made ahead", t.sdkFirstClone));
  console.log(row("SDK first exec, spare, no clone", t.sdkFirstSpare));
  console.log(row("first exec after a restore", t.firstRestore));
  console.log(row("first exec after a cold boot", t.firstCold));

  for (const cold of [false, true]) {
    const vms: Sandbox[] = [];
    try {
      for (let i = 0; i < o.idle; i++) vms.push(await Sandbox.create({ config, paths: p, cold }));
      await new Promise((r) => setTimeout(r, 3000)); // let them settle
      const pss = vms.map((v) => pssKb(v.vmPid) / 1024);
      const sum = pss.reduce((a, b) => a + b, 0);
      console.log(
        `${o.idle} idle VMs, ${cold ? "cold    " : "restored"}  QEMU PSS ${sum.toFixed(0)} MiB in all, ` +
          `${(sum / o.idle).toFixed(0)} MiB each`,
      );
    } finally {
      for (const v of vms) await v.close();
    }
  }
}
