/**
 * bench/boot: how much `matchlock run -- true` costs over booting the same kernel + initramfs with raw
 * QEMU to an init that powers off at once (the agent's probe mode), both measured in this run, in
 * alternation (machines here are noisy). Also the exec round trip in a running VM and the host memory
 * of an idle VM. Usage: npm run bench:boot [-- --runs N]
 */
import { spawn } from "node:child_process";
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

const runsArg = process.argv.indexOf("--runs");
const RUNS = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 10;
const CLI = fileURLToPath(new URL("../dist/cli/main.js", import.meta.url));

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? Number.NaN;
}

function fmt(ms: number): string {
  return ms >= 100 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(2)} ms`;
}

function timed(cmd: string, args: string[], env?: NodeJS.ProcessEnv): Promise<{ ms: number; out: string }> {
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

async function main(): Promise<void> {
  const p = paths();
  const kernel = await loadKernel(p);
  const initramfs = await loadInitramfs(p);
  const { accel } = await chooseAccel(join(p.cache, "accel.json"), { kernel: kernel.vmlinux, initramfs });
  const scratch = mkdtempSync(join(tmpdir(), "matchlock-bench-"));
  const env = { ...process.env, MATCHLOCK_HOME: join(scratch, "home") };
  const spec: VmSpec = {
    id: "bench",
    dir: scratch,
    kernel: kernel.vmlinux,
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

  console.log(
    `bench/boot on ${cpus().length} × ${cpus()[0]?.model ?? "?"}, accel ${accel}, ${RUNS} runs each`,
  );
  const raw: number[] = [];
  const run: number[] = [];
  // Warm the page cache and the CLI once each; not counted.
  await timed(QEMU_BINARY, baselineArgs);
  await timed(process.execPath, [CLI, "run", "--", "true"], env);
  for (let i = 0; i < RUNS; i++) {
    const b = await timed(QEMU_BINARY, baselineArgs);
    if (!readFileSync(join(scratch, "console.log"), "utf8").includes(PROBE_MARKER)) {
      throw new Error("baseline guest did not reach init");
    }
    raw.push(b.ms);
    run.push((await timed(process.execPath, [CLI, "run", "--", "true"], env)).ms);
  }
  const ratio = pct(run, 50) / pct(raw, 50);
  console.log(`raw QEMU boot to init + poweroff  median ${fmt(pct(raw, 50))}  p90 ${fmt(pct(raw, 90))}`);
  console.log(`matchlock run -- true            median ${fmt(pct(run, 50))}  p90 ${fmt(pct(run, 90))}`);
  console.log(`ratio (run / raw, medians)        ${ratio.toFixed(2)}  (goal ≤ 1.30)`);

  const sb = await Sandbox.create({
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
    rmSync(scratch, { recursive: true, force: true });
  }
}

await main();
