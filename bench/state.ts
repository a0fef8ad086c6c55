/**
 * bench/state: what the crash-safe lifecycle costs. (1) `gc` of 50 VMs whose owner died at `running`
 * (disk, sockets and subnet left behind): in process (reconcileVm for each, then the orphan sweeps, as
 * `matchlock gc` does) against the time the same 50 VMs took to be recorded, and through the CLI
 * against an empty `gc` (0 VMs: process start-up). (2) state.db throughput with 8 processes running
 * the lifecycle at once against 1 process alone, and the latency of one transition. Baselines are
 * measured in this run (machines here are noisy). Needs a current dist/ (`npx tsc -p .`).
 * Usage: node bench/state.ts [--rounds N] [--seconds S]
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseSandboxConfig } from "../src/api/config.ts";
import { type Paths, paths, vmDir } from "../src/api/paths.ts";
import { reconcileVm, releaseOrphanSubnets, sweepOrphanProcesses } from "../src/sandbox/reconcile.ts";
import type { Resources } from "../src/state/lifecycle.ts";
import { openState, type StateStore } from "../src/state/store.ts";

const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const ROUNDS = arg("--rounds", 7);
const SECONDS = arg("--seconds", 3);
const VMS = 50;
const PROCS = 8;
const CLI = fileURLToPath(new URL("../dist/cli/main.js", import.meta.url));
const src = (f: string) => JSON.stringify(new URL(`../src/${f}`, import.meta.url).href);

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? Number.NaN;
}

function fmt(ms: number): string {
  if (ms >= 100) return `${(ms / 1000).toFixed(2)} s`;
  return ms >= 1 ? `${ms.toFixed(2)} ms` : `${(ms * 1000).toFixed(0)} µs`;
}

const scratch = mkdtempSync(join(tmpdir(), "matchlock-bench-state-"));
let homes = 0;
const freshPaths = (): Paths =>
  paths({ MATCHLOCK_HOME: join(scratch, `home${homes++}`), MATCHLOCK_CACHE: join(scratch, "cache") });
const envFor = (p: Paths) => ({ ...process.env, MATCHLOCK_HOME: p.home, MATCHLOCK_CACHE: p.cache });

/** A pid that is certainly dead (`true` has exited and been reaped); start_time 1 can never match. */
const deadPid = spawnSync("true").pid;

/** What n owners that crashed at `running` leave behind. Returns the ids and the DB writes' time. */
function recordCrashed(s: StateStore, p: Paths, n: number): { ids: string[]; ms: number } {
  const vms = Array.from({ length: n }, () => {
    const id = `vm-${randomBytes(4).toString("hex")}`;
    const dir = vmDir(id, p);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const disk = join(dir, "upper.ext4");
    writeFileSync(disk, "");
    truncateSync(disk, 64 << 20); // sparse
    const sockets = ["agent.sock", "qmp.sock", "relay.sock"].map((f) => join(dir, f));
    for (const f of sockets) writeFileSync(f, "");
    const resources: Resources = {
      vm_dir: dir,
      disks: [disk],
      sockets,
      qemu: { cmdline_marker: `${dir}/` },
      owner: { pid: deadPid, start_time: 1 },
    };
    return { id, resources };
  });
  const cfg = parseSandboxConfig({});
  const t0 = performance.now();
  for (const { id, resources } of vms) {
    s.vms.insert(id, deadPid, "img", cfg);
    for (const phase of ["creating", "created", "starting", "running"] as const)
      s.lifecycle.transition(id, phase, { backend: "qemu", resources });
    s.subnets.allocate(id);
  }
  return { ids: vms.map((v) => v.id), ms: performance.now() - t0 };
}

function verifyCleaned(p: Paths, ids: string[], what: string): void {
  const s = openState(p);
  try {
    for (const id of ids) {
      const lc = s.lifecycle.current(id);
      if (lc?.phase !== "cleaned") throw new Error(`${what}: ${id} ended in ${lc?.phase}, not cleaned`);
      for (const f of [...(lc.resources.disks ?? []), ...(lc.resources.sockets ?? [])])
        if (existsSync(f)) throw new Error(`${what}: ${id}: ${f} is still there`);
    }
    const left = s.subnets.list();
    if (left.length > 0) throw new Error(`${what}: ${left.length} subnet rows remain (${left[0]?.vm_id} …)`);
  } finally {
    s.close();
  }
}

function exited(c: ChildProcess, what: string): Promise<string> {
  let out = "";
  c.stdout?.on("data", (d: Buffer) => (out += d.toString()));
  c.stderr?.on("data", (d: Buffer) => (out += d.toString()));
  return new Promise((resolve, reject) => {
    c.on("error", reject);
    c.on("close", (code) =>
      code === 0 ? resolve(out) : reject(new Error(`${what} exited ${code}: ${out}`)),
    );
  });
}

async function cliGc(p: Paths): Promise<number> {
  const t0 = performance.now();
  await exited(spawn(process.execPath, [CLI, "gc"], { env: envFor(p) }), "matchlock gc");
  return performance.now() - t0;
}

type GcRound = Record<"record" | "gc" | "cli" | "cliEmpty", number>;

async function gcRound(): Promise<GcRound> {
  const p = freshPaths();
  const s = openState(p);
  const { ids, ms: record } = recordCrashed(s, p, VMS);
  const t0 = performance.now();
  for (const id of ids) {
    const r = await reconcileVm(s, id, {});
    if (r.outcome !== "cleaned") throw new Error(`reconcile ${id}: ${r.outcome} ${r.detail}`);
  }
  await sweepOrphanProcesses(s, p);
  releaseOrphanSubnets(s);
  const gc = performance.now() - t0;
  s.close();
  verifyCleaned(p, ids, "in-process gc");

  const empty = freshPaths();
  openState(empty).close(); // an initialised state.db: migrations are not what we time
  const cliEmpty = await cliGc(empty);
  const q = freshPaths();
  const s2 = openState(q);
  const { ids: ids2 } = recordCrashed(s2, q, VMS);
  s2.close();
  const cli = await cliGc(q);
  verifyCleaned(q, ids2, "matchlock gc");
  return { record, gc, cli, cliEmpty };
}

/** One process's lifecycle mix for SECONDS after "go" on stdin; prints {ops, ms, busy, lat} last. */
const CHILD = `
  const { randomBytes } = await import("node:crypto");
  const { openState } = await import(${src("state/store.ts")});
  const { paths } = await import(${src("api/paths.ts")});
  const { parseSandboxConfig } = await import(${src("api/config.ts")});
  const s = openState(paths());
  const cfg = parseSandboxConfig({});
  const CHAIN = ["creating", "created", "starting", "running", "stopping", "stopped", "cleaning", "cleaned"];
  const lat = [];
  let ops = 0, busy = 0;
  const op = (fn) => {
    try { fn(); ops++; return true; }
    catch (e) { if (String(e?.code ?? "").startsWith("SQLITE_BUSY")) { busy++; return false; } throw e; }
  };
  process.stdout.write("ready\\n");
  await new Promise((r) => process.stdin.once("data", r));
  const t0 = performance.now(), end = t0 + ${SECONDS * 1000};
  while (performance.now() < end) {
    const id = "vm-" + randomBytes(4).toString("hex");
    const resources = { vm_dir: "/nonexistent/vms/" + id, owner: { pid: process.pid, start_time: 1 } };
    op(() => s.vms.insert(id, process.pid, "img", cfg));
    for (const phase of CHAIN) {
      const t = performance.now();
      if (!op(() => s.lifecycle.transition(id, phase, { backend: "qemu", resources }))) break;
      lat.push(Math.round((performance.now() - t) * 1000) / 1000);
      if (phase === "running") for (const read of [() => s.vms.list(), () => s.lifecycle.current(id)]) op(read);
    }
    op(() => s.vms.remove(id));
    op(() => s.lifecycle.remove(id));
  }
  const ms = performance.now() - t0;
  s.close();
  process.stdout.write(JSON.stringify({ ops, ms, busy, lat }) + "\\n");`;

type ChildResult = { ops: number; ms: number; busy: number; lat: number[] };

/** n children on one fresh state.db, released together once all have opened it. */
async function mix(n: number): Promise<ChildResult[]> {
  const p = freshPaths();
  openState(p).close();
  const children = Array.from({ length: n }, () =>
    spawn(process.execPath, ["--input-type=module", "-e", CHILD], { env: envFor(p) }),
  );
  let ready = 0;
  for (const c of children) {
    let seen = "";
    c.stdout.on("data", function onData(d: Buffer) {
      seen += d.toString();
      if (!seen.includes("ready\n")) return;
      c.stdout.off("data", onData);
      if (++ready === n) for (const k of children) k.stdin.end("go\n");
    });
  }
  const outs = await Promise.all(children.map((c) => exited(c, "state.db child")));
  return outs.map((o) => JSON.parse(o.trim().split("\n").at(-1) ?? "") as ChildResult);
}

function report(label: string, rs: ChildResult[]): number {
  const total = rs.reduce((a, r) => a + r.ops / (r.ms / 1000), 0);
  const lat = rs.flatMap((r) => r.lat);
  console.log(
    `${label.padEnd(34)}${total.toFixed(0).padStart(6)} ops/s (${(total / rs.length).toFixed(0)}/process)  ` +
      `transition p50 ${fmt(pct(lat, 50))}  p99 ${fmt(pct(lat, 99))}  max ${fmt(pct(lat, 100))}  ` +
      `SQLITE_BUSY escaped: ${rs.reduce((a, r) => a + r.busy, 0)}`,
  );
  return total;
}

async function main(): Promise<void> {
  console.log(`bench/state on ${cpus().length} × ${cpus()[0]?.model ?? "?"}, ${ROUNDS} gc rounds`);
  await gcRound(); // warm-up (JIT, page cache, the CLI's modules); not counted
  const rounds: GcRound[] = [];
  for (let i = 0; i < ROUNDS; i++) rounds.push(await gcRound());
  const col = (k: keyof GcRound) => rounds.map((r) => r[k]);
  const [record, gc, cli, cliEmpty] = [col("record"), col("gc"), col("cli"), col("cliEmpty")];
  const gcPerVm = gc.map((x) => x / VMS);
  const cliPerVm = rounds.map((r) => (r.cli - r.cliEmpty) / VMS);
  const line = (label: string, xs: number[]) =>
    console.log(`${label.padEnd(34)}median ${fmt(pct(xs, 50)).padStart(9)}  p90 ${fmt(pct(xs, 90))}`);
  line(`record ${VMS} crashed VMs (DB writes)`, record);
  line(`gc ${VMS} crashed VMs, in process`, gc);
  line("  per VM", gcPerVm);
  line("matchlock gc, 0 VMs (CLI)", cliEmpty);
  line(`matchlock gc, ${VMS} VMs (CLI)`, cli);
  line("  per VM over the empty gc", cliPerVm);
  const ratio = (label: string, a: number[], b: number[]) =>
    console.log(`${label.padEnd(34)}${(pct(a, 50) / pct(b, 50)).toFixed(2)}  (medians)`);
  ratio("ratio gc / record (in process)", gc, record);
  ratio("ratio CLI gc 50 / CLI gc 0", cli, cliEmpty);

  console.log(`state.db lifecycle mix, ${SECONDS} s each; 1 op = 1 insert, transition, read or remove`);
  const one = report("1 process alone (baseline)", await mix(1));
  const many = report(`${PROCS} processes at once`, await mix(PROCS));
  console.log(`${`ratio ${PROCS}-process / 1-process ops/s`.padEnd(34)}${(many / one).toFixed(2)}`);
}

try {
  await main();
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
