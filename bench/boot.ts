/**
 * bench/boot: what a sandbox's start costs, in one run, every series alternating (machines here are
 * noisy):
 *   - cold: `matchlock run --cold -- true` against booting the same kernel + initramfs with raw QEMU
 *     to an init that powers off at once (the agent's probe mode), and `--version`;
 *   - exec: the exec round trip in a running VM and the host memory of an idle VM;
 *   - restore (bench/boot-restore.ts): restored vs. cold `run -- true`, create → ready in a long-lived
 *     program (in-process and SDK, with and without its spare), the first exec after a restore, and
 *     the host memory of N idle restored VMs vs. N cold ones.
 * Usage: npm run bench:boot [-- --runs N] [--idle N] [--sections cold,exec,restore]
 *        [--baseline DIR --baseline-cache DIR]
 *
 * --baseline DIR: another checkout (built, `npm ci` done) whose `bin/matchlock` is measured in the
 * same rounds, alternating, as "before": `run -- true` and `--version` of both, with per-round
 * ratios. --baseline-cache: that checkout's own MATCHLOCK_CACHE (set up with its own `matchlock
 * setup`: its initramfs may differ). This checkout uses MATCHLOCK_CACHE as usual.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseSandboxConfig } from "../src/api/config.ts";
import { paths } from "../src/api/paths.ts";
import { loadInitramfs } from "../src/guest/initramfs.ts";
import { loadKernel } from "../src/guest/kernel.ts";
import { Sandbox } from "../src/sandbox/sandbox.ts";
import type { VmSpec } from "../src/vm/backend.ts";
import { chooseAccel, PROBE_MARKER } from "../src/vm/qemu/accel.ts";
import { QEMU_BINARY, qemuArgv } from "../src/vm/qemu/argv.ts";
import { hostTscKhz } from "../src/vm/qemu/tsc.ts";
import { benchRestore, pct, timed } from "./boot-restore.ts";

const runsArg = process.argv.indexOf("--runs");
const RUNS = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 10;
/** What users run: the launcher, so its own start-up is measured too. */
const CLI = fileURLToPath(new URL("../bin/matchlock", import.meta.url));
const arg = (name: string): string | undefined => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const BASELINE = arg("--baseline");
const IDLE = Number(arg("--idle") ?? 8);
const SECTIONS = new Set((arg("--sections") ?? "cold,exec,restore").split(","));
const BASELINE_CACHE = arg("--baseline-cache");

function fmt(ms: number): string {
  return ms >= 100 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(2)} ms`;
}

async function main(): Promise<void> {
  const p = paths();
  const kernel = await loadKernel(p);
  const initramfs = await loadInitramfs(p);
  const { accel } = await chooseAccel(join(p.cache, "accel.json"), { kernel: kernel.vmlinux, initramfs });
  const scratch = mkdtempSync(join(tmpdir(), "matchlock-bench-"));
  console.log(
    `bench/boot on ${cpus().length} × ${cpus()[0]?.model ?? "?"}, accel ${accel}, ${RUNS} runs each, ` +
      `sections ${[...SECTIONS].join(",")}`,
  );
  // Cold boots: what is compared with a raw boot here. Restores: the restore section.
  const env = { ...process.env, MATCHLOCK_HOME: join(scratch, "home"), MATCHLOCK_COLD: "1" };
  try {
    if (SECTIONS.has("cold")) await benchCold(scratch, env, { kernel: kernel.vmlinux, initramfs, accel });
    if (SECTIONS.has("exec")) await benchExec(env);
    if (SECTIONS.has("restore")) {
      console.log("restore (fast starts):");
      await benchRestore({ cli: CLI, scratch, runs: RUNS, idle: IDLE });
    }
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

async function benchCold(
  scratch: string,
  env: NodeJS.ProcessEnv,
  boot: { kernel: string; initramfs: string; accel: VmSpec["accel"] },
): Promise<void> {
  const { kernel, initramfs, accel } = boot;
  const spec: VmSpec = {
    id: "bench",
    dir: scratch,
    kernel,
    initramfs,
    kernelArgs: ["matchlock.probe=1"],
    cpus: 1,
    memoryMb: 512,
    disks: [],
    accel,
  };
  // The baseline has no sockets to serve: drop the agent/QMP chardevs it cannot use.
  const rawArgs = qemuArgv(
    spec,
    { agentSocket: "", qmpSocket: "", vfsSocket: "", consoleLog: join(scratch, "console.log") },
    {
      khz: await hostTscKhz(),
    },
  );
  const cut = rawArgs.indexOf("virtio-serial-device,max_ports=2") - 1;
  const baselineArgs = rawArgs.slice(0, cut);

  const raw: number[] = [];
  const run: number[] = [];
  const version: number[] = [];
  const before = BASELINE ? join(BASELINE, "bin", "matchlock") : undefined;
  const beforeEnv = {
    ...env,
    MATCHLOCK_HOME: join(scratch, "home-baseline"),
    ...(BASELINE_CACHE ? { MATCHLOCK_CACHE: BASELINE_CACHE } : {}),
  };
  const runBefore: number[] = [];
  const versionBefore: number[] = [];
  // Warm the page cache, the CLIs and their compile caches once each; not counted.
  await timed(QEMU_BINARY, baselineArgs);
  await timed(CLI, ["run", "--", "true"], env);
  await timed(CLI, ["--version"], env);
  if (before) {
    await timed(before, ["run", "--", "true"], beforeEnv);
    await timed(before, ["--version"], beforeEnv);
  }
  for (let i = 0; i < RUNS; i++) {
    const b = await timed(QEMU_BINARY, baselineArgs);
    if (!readFileSync(join(scratch, "console.log"), "utf8").includes(PROBE_MARKER)) {
      throw new Error("baseline guest did not reach init");
    }
    raw.push(b.ms);
    // Before and after swap places every round, so neither always runs on the warmer machine.
    const pair = async (xs: number[], ys: number[], f: (b: boolean) => Promise<number>) => {
      if (!before || i % 2 === 0) xs.push(await f(false));
      if (before) ys.push(await f(true));
      if (before && i % 2 === 1) xs.push(await f(false));
    };
    await pair(run, runBefore, async (b) =>
      b
        ? (await timed(before as string, ["run", "--", "true"], beforeEnv)).ms
        : (await timed(CLI, ["run", "--", "true"], env)).ms,
    );
    await pair(version, versionBefore, async (b) =>
      b
        ? (await timed(before as string, ["--version"], beforeEnv)).ms
        : (await timed(CLI, ["--version"], env)).ms,
    );
  }
  const ratio = pct(run, 50) / pct(raw, 50);
  console.log(`raw QEMU boot to init + poweroff  median ${fmt(pct(raw, 50))}  p90 ${fmt(pct(raw, 90))}`);
  console.log(`matchlock run -- true            median ${fmt(pct(run, 50))}  p90 ${fmt(pct(run, 90))}`);
  console.log(`ratio (run / raw, medians)        ${ratio.toFixed(2)}  (goal ≤ 1.30)`);
  console.log(
    `matchlock --version              median ${fmt(pct(version, 50))}  p90 ${fmt(pct(version, 90))}`,
  );
  if (before) {
    const paired = (a: number[], b: number[]) =>
      pct(
        a.map((x, k) => x / (b[k] as number)),
        50,
      ).toFixed(3);
    console.log(`baseline ${BASELINE}:`);
    console.log(
      `  run -- true   before median ${fmt(pct(runBefore, 50))} → after ${fmt(pct(run, 50))}: ` +
        `ratio of medians ${(pct(run, 50) / pct(runBefore, 50)).toFixed(3)}, median paired ratio ${paired(run, runBefore)}`,
    );
    console.log(
      `  --version     before median ${fmt(pct(versionBefore, 50))} → after ${fmt(pct(version, 50))}: ` +
        `ratio of medians ${(pct(version, 50) / pct(versionBefore, 50)).toFixed(3)}, median paired ratio ${paired(version, versionBefore)}`,
    );
    console.log(`  raw / before run: ${(pct(runBefore, 50) / pct(raw, 50)).toFixed(2)}`);
  }
}

async function benchExec(env: NodeJS.ProcessEnv): Promise<void> {
  const sb = await Sandbox.create({
    cold: true,
    config: parseSandboxConfig({ network: { no_network: true } }),
    paths: paths(env),
  });
  try {
    const execMs: number[] = [];
    const pingMs: number[] = [];
    for (let i = 0; i < 20; i++) await sb.exec({ argv: ["true"] }).done; // warm-up
    for (let i = 0; i < 200; i++) {
      let t = performance.now();
      await sb.ping();
      pingMs.push(performance.now() - t);
      t = performance.now();
      await sb.exec({ argv: ["true"] }).done;
      execMs.push(performance.now() - t);
    }
    console.log(`agent ping round trip             p50 ${fmt(pct(pingMs, 50))}  p99 ${fmt(pct(pingMs, 99))}`);
    console.log(`exec "true" round trip            p50 ${fmt(pct(execMs, 50))}  p99 ${fmt(pct(execMs, 99))}`);

    await new Promise((r) => setTimeout(r, 2000)); // let the guest settle
    const status = readFileSync(`/proc/${sb.vmPid}/status`, "utf8");
    const rssKb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
    let meminfo = "";
    await sb.exec(
      { argv: ["cat", "/proc/meminfo"] },
      {
        onStdout: (d) => {
          meminfo += d.toString();
        },
      },
    ).done;
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, "m").exec(meminfo)?.[1] ?? 0);
    const guestUsedKb = kb("MemTotal") - kb("MemFree");
    console.log(
      `idle VM host memory               QEMU RSS ${(rssKb / 1024).toFixed(0)} MiB for a 512 MiB guest; ` +
        `minus guest RAM in use (${(guestUsedKb / 1024).toFixed(0)} MiB) = ${((rssKb - guestUsedKb) / 1024).toFixed(0)} MiB`,
    );
  } finally {
    await sb.close();
  }
}

await main();
