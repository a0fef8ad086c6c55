/**
 * bench/rpc: what the JSON-RPC layer costs. In one process run, on one VM each:
 *   - `exec("true")` through the SDK → `matchlock rpc` → agent, p50/p99;
 *   - the agent's own round trip for the same command (Sandbox.exec in-process), p50/p99;
 *   - their ratio (the RPC overhead);
 *   - write_file / read_file of 1 MiB and 64 MiB through the SDK, MB/s (median of runs).
 * Usage: npm run build && node bench/rpc.ts [--runs N]
 */
import { mkdtempSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { parseSandboxConfig } from "../src/api/config.ts";
import { paths } from "../src/api/paths.ts";
import { Sandbox as VmSandbox } from "../src/sandbox/sandbox.ts";
import { Client, Sandbox } from "../src/sdk/index.ts";

const runsArg = process.argv.indexOf("--runs");
const RUNS = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 200;

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? Number.NaN;
}

const ms = (x: number) => `${x.toFixed(2)} ms`;

async function main(): Promise<void> {
  const home = mkdtempSync(join(tmpdir(), "matchlock-bench-rpc-"));
  const env = { ...process.env, MATCHLOCK_HOME: home };
  console.log(`bench/rpc on ${cpus().length} × ${cpus()[0]?.model ?? "?"}, ${RUNS} round trips each`);

  const direct = await VmSandbox.create({
    config: parseSandboxConfig({ network: { no_network: true } }),
    paths: paths(env),
  });
  const client = new Client({ env });
  await client.launch(new Sandbox().withNoNetwork());
  try {
    const agentMs: number[] = [];
    const rpcMs: number[] = [];
    for (let i = 0; i < 20; i++) {
      await direct.exec({ argv: ["/bin/sh", "-c", "true"] }).done;
      await client.exec("true");
    }
    // Alternate the two so machine noise hits both alike.
    for (let i = 0; i < RUNS; i++) {
      let t = performance.now();
      await direct.exec({ argv: ["/bin/sh", "-c", "true"] }).done;
      agentMs.push(performance.now() - t);
      t = performance.now();
      await client.exec("true");
      rpcMs.push(performance.now() - t);
    }
    console.log(
      `agent exec "sh -c true" (in-process)  p50 ${ms(pct(agentMs, 50))}  p99 ${ms(pct(agentMs, 99))}`,
    );
    console.log(
      `rpc exec("true") via the SDK           p50 ${ms(pct(rpcMs, 50))}  p99 ${ms(pct(rpcMs, 99))}`,
    );
    console.log(`RPC overhead ratio (p50 rpc / agent)   ${(pct(rpcMs, 50) / pct(agentMs, 50)).toFixed(2)}`);

    for (const size of [1024 * 1024, 64 * 1024 * 1024]) {
      const data = Buffer.alloc(size, 0x5a);
      const wr: number[] = [];
      const rd: number[] = [];
      const reps = size > 8 * 1024 * 1024 ? 3 : 10;
      for (let i = 0; i < reps; i++) {
        let t = performance.now();
        await client.writeFile("/tmp/bench.bin", data);
        wr.push(performance.now() - t);
        t = performance.now();
        const back = await client.readFile("/tmp/bench.bin");
        rd.push(performance.now() - t);
        if (back.length !== size) throw new Error(`read back ${back.length} bytes, wrote ${size}`);
      }
      const mbps = (list: number[]) => (size / 1e6 / (pct(list, 50) / 1000)).toFixed(1);
      const label = `${size / 1024 / 1024} MiB`.padEnd(7);
      console.log(`write_file ${label} median ${ms(pct(wr, 50))}  ${mbps(wr)} MB/s`);
      console.log(`read_file  ${label} median ${ms(pct(rd, 50))}  ${mbps(rd)} MB/s`);
    }
  } finally {
    await client.close();
    await direct.close();
    rmSync(home, { recursive: true, force: true });
  }
}

await main();
