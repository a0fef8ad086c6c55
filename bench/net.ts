/**
 * bench/net: what open-mode networking costs, all inside namespaces this run creates (test/helpers/netns.ts's
 * fake internet; nothing reaches the machine's uplink):
 *
 *   g ── veth ── hostNs ── veth ── netNs (fake internet: HTTP 203.0.113.10:80, DNS 198.51.100.2)
 *   10.99.250.2   fc-bench<hex> 10.99.250.1 + the real TcpRelay, DnsServer and nft table (bench/net-host.ts)
 *
 * The veth's guest namespace stands in for a VM (no TCG slowness), so 1–3 measure the relay and DNS server
 * themselves; the same client (bench/net-client.ts) runs in g (through the relay) and in hostNs (direct):
 *   1. a 64 MiB HTTP download, relay vs direct, alternating: median MB/s and the ratio (goal ≥ 0.8), and
 *      the relay process's CPU (user + system) per download. Twice: from the fake internet's HTTP server
 *      (which computes its bytes, so it is often the limit) and from a source that writes one reused
 *      buffer (bench/net-client.ts serve, in netNs on 203.0.113.10:8080): the relay's own ceiling;
 *   2. new-connection `GET /` requests, connect to last byte: p50/p99 relay vs direct;
 *   3. DNS A queries from g to the gateway: cache hits, and distinct names (the forward path), with the
 *      upstream asked directly from hostNs as reference;
 *   4. real VMs, the built CLI in hostNs: `run -- true` vs `run --no-network -- true`, alternating;
 *   5. a real VM's `wget` of the same 64 MiB (TCG: informational).
 * Usage: npm run bench:net [-- --runs N] [--requests N] [--no-vm]
 *   --runs: downloads and VM runs per side (default 5); --requests: requests/queries per side (default 200)
 */
import { type ChildProcessWithoutNullStreams, execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createTopology, destroyNamespace, execInNs, FAKE, type Topology } from "../test/helpers/netns.ts";

const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const RUNS = arg("--runs", 5);
const REQUESTS = arg("--requests", 200);
const NO_VM = process.argv.includes("--no-vm");
const BYTES = 64 * 1024 * 1024;
const CLI = fileURLToPath(new URL("../dist/cli/main.js", import.meta.url));
const CLIENT = fileURLToPath(new URL("./net-client.ts", import.meta.url));
const HOST = fileURLToPath(new URL("./net-host.ts", import.meta.url));
const GATEWAY = "10.99.250.1";
const GUEST = "10.99.250.2";
const SOURCE_PORT = 8080;

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? Number.NaN;
}

function fmt(ms: number): string {
  return ms >= 100 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(2)} ms`;
}

const row = (label: string, text: string) => console.log(`${label.padEnd(52)}${text}`);

/** Runs the client in `ns`; its JSON line. */
async function client<T>(ns: string, args: string[]): Promise<T> {
  const r = await execInNs(ns, process.execPath, [CLIENT, ...args], { timeoutMs: 300_000 });
  if (r.code !== 0) throw new Error(`client ${args.join(" ")} in ${ns}: ${r.code ?? r.signal} ${r.stderr}`);
  return JSON.parse(r.stdout.toString()) as T;
}

/** The "guest" namespace and its veth; deleted on exit whatever happens. */
function makeGuestNs(hostNs: string): { ns: string; tap: string; destroy(): void } {
  const ns = `mlb-${process.pid.toString(36)}-g`;
  const tap = `fc-bench${randomBytes(2).toString("hex")}`;
  const destroy = () => destroyNamespace(ns);
  process.on("exit", destroy);
  const ip = (...a: string[]) => execFileSync("ip", a, { stdio: ["ignore", "ignore", "pipe"] });
  ip("netns", "add", ns);
  // Both ends are made inside bench namespaces: nothing ever exists in the root namespace.
  ip("-n", hostNs, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", ns);
  ip("-n", hostNs, "addr", "add", `${GATEWAY}/24`, "dev", tap);
  ip("-n", hostNs, "link", "set", tap, "up");
  ip("-n", ns, "link", "set", "lo", "up");
  ip("-n", ns, "addr", "add", `${GUEST}/24`, "dev", "eth0");
  ip("-n", ns, "link", "set", "eth0", "up");
  ip("-n", ns, "route", "add", "default", "via", GATEWAY);
  return { ns, tap, destroy };
}

/** bench/net-host.ts in hostNs: resolves once its table is applied. */
function startOwner(t: Topology, tap: string): Promise<ChildProcessWithoutNullStreams> {
  const child = spawn(
    "ip",
    ["netns", "exec", t.hostNs, process.execPath, HOST, tap, GATEWAY, GUEST, FAKE.resolver],
    { stdio: ["pipe", "pipe", "pipe"] },
  );
  return untilReady(child, "net-host");
}

/** Resolves with the child once it prints `ready`. */
function untilReady(
  child: ChildProcessWithoutNullStreams,
  name: string,
): Promise<ChildProcessWithoutNullStreams> {
  let out = "";
  let err = "";
  child.stderr.on("data", (d: Buffer) => {
    err += d.toString();
  });
  return new Promise((resolve, reject) => {
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes("ready")) resolve(child);
    });
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(`${name} exited ${code}: ${err}`)));
  });
}

/** CPU time a process has used so far, in ms: [user, system]. */
function cpuMs(pid: number): [number, number] {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return [(Number(f[11]) * 1000) / TICKS, (Number(f[12]) * 1000) / TICKS];
}
const TICKS = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;

async function throughput(
  hostNs: string,
  g: string,
  ownerPid: number,
  label: string,
  target: string,
): Promise<void> {
  const path = `/bytes/${BYTES}`;
  const once = async (ns: string) => {
    const r = await client<{ ms: number; bytes: number }>(ns, ["download", target, path]);
    if (r.bytes < BYTES) throw new Error(`short download in ${ns}: ${r.bytes} bytes`);
    return BYTES / 1e6 / (r.ms / 1000);
  };
  await once(g); // warm-up, not counted
  await once(hostNs);
  const relay: number[] = [];
  const direct: number[] = [];
  const relayCpu: number[] = [];
  const relaySys: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const [u0, s0] = cpuMs(ownerPid);
    relay.push(await once(g));
    const [u1, s1] = cpuMs(ownerPid);
    relayCpu.push(u1 - u0 + s1 - s0);
    relaySys.push(s1 - s0);
    direct.push(await once(hostNs));
  }
  const mbs = (x: number) => `${x.toFixed(0)} MB/s`;
  const spread = (xs: number[]) => `(min ${mbs(Math.min(...xs))}, max ${mbs(Math.max(...xs))})`;
  row(`64 MiB ${label}, direct`, `median ${mbs(pct(direct, 50))}  ${spread(direct)}`);
  row(`64 MiB ${label}, through the relay`, `median ${mbs(pct(relay, 50))}  ${spread(relay)}`);
  row("  ratio (relay / direct, medians)", `${(pct(relay, 50) / pct(direct, 50)).toFixed(2)}  (goal ≥ 0.80)`);
  const cpu = pct(relayCpu, 50);
  row(
    "  relay process CPU per 64 MiB (median)",
    `${fmt(cpu)} (${fmt(pct(relaySys, 50))} in the kernel) = ` +
      `${((cpu / 1000 / (BYTES / 1e6 / pct(relay, 50))) * 100).toFixed(0)} % of a core at that rate`,
  );
}

/** bench/net-client.ts serve: a source that costs next to no CPU, on FAKE.web:SOURCE_PORT in the fake internet. */
function startSource(netNs: string): Promise<ChildProcessWithoutNullStreams> {
  const child = spawn(
    "ip",
    ["netns", "exec", netNs, process.execPath, CLIENT, "serve", FAKE.web, String(SOURCE_PORT), String(BYTES)],
    { stdio: ["pipe", "pipe", "pipe"] },
  );
  return untilReady(child, "source");
}

/** `REQUESTS` per side, in RUNS alternating batches. */
async function alternate(
  a: () => Promise<number[]>,
  b: () => Promise<number[]>,
): Promise<[number[], number[]]> {
  const xs: number[] = [];
  const ys: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    xs.push(...(await a()));
    ys.push(...(await b()));
  }
  return [xs, ys];
}

async function connectLatency(hostNs: string, g: string): Promise<void> {
  const n = String(Math.ceil(REQUESTS / RUNS));
  const batch = async (ns: string) => (await client<{ ms: number[] }>(ns, ["connect", FAKE.web, n])).ms;
  const [relay, direct] = await alternate(
    () => batch(g),
    () => batch(hostNs),
  );
  const p = (xs: number[]) => `p50 ${fmt(pct(xs, 50))}  p99 ${fmt(pct(xs, 99))}`;
  row(`new connection + GET /, direct (${direct.length})`, p(direct));
  row(`new connection + GET /, relay (${relay.length})`, p(relay));
  row(
    "  added by the relay",
    `p50 +${fmt(pct(relay, 50) - pct(direct, 50))}  p99 +${fmt(pct(relay, 99) - pct(direct, 99))}`,
  );
}

async function dnsLatency(hostNs: string, g: string): Promise<void> {
  const n = String(Math.ceil(REQUESTS / RUNS));
  const batch = async (ns: string, server: string, names: string) => {
    const r = await client<{ ms: number[]; rcodes: Record<string, number> }>(ns, ["dns", server, n, names]);
    const want = names === "uncached" ? "NXDOMAIN" : "NOERROR";
    if (r.rcodes[want] !== Number(n))
      throw new Error(`DNS ${names} via ${server}: ${JSON.stringify(r.rcodes)}`);
    return r.ms;
  };
  const [cached, upstream] = await alternate(
    () => batch(g, GATEWAY, "example.test"),
    () => batch(hostNs, FAKE.resolver, "uncached"),
  );
  const uncached: number[] = [];
  for (let i = 0; i < RUNS; i++) uncached.push(...(await batch(g, GATEWAY, "uncached")));
  const p = (xs: number[]) => `p50 ${fmt(pct(xs, 50))}  p99 ${fmt(pct(xs, 99))}`;
  row(`DNS A, upstream asked directly (${upstream.length})`, p(upstream));
  row(`DNS A via gateway, cache hit (${cached.length})`, p(cached));
  row(`DNS A via gateway, forwarded/NXDOMAIN (${uncached.length})`, p(uncached));
  row("  forward path adds (p50)", `+${fmt(pct(uncached, 50) - pct(upstream, 50))} over asking upstream`);
}

async function vms(t: Topology): Promise<void> {
  const home = mkdtempSync(join(tmpdir(), "matchlock-bench-net-"));
  const env = { ...process.env, MATCHLOCK_HOME: home };
  const ml = async (args: string[]) => {
    const t0 = performance.now();
    const r = await t.execInHost(process.execPath, [CLI, ...args], { env, timeoutMs: 600_000 });
    if (r.code !== 0) throw new Error(`matchlock ${args.join(" ")}: ${r.code ?? r.signal} ${r.stderr}`);
    return { ms: performance.now() - t0, out: r.stdout.toString() };
  };
  try {
    await ml(["run", "--", "true"]); // warm-up, not counted
    await ml(["run", "--no-network", "--", "true"]);
    const net: number[] = [];
    const none: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      net.push((await ml(["run", "--", "true"])).ms);
      none.push((await ml(["run", "--no-network", "--", "true"])).ms);
    }
    const m = (xs: number[]) => `median ${fmt(pct(xs, 50))}  (min ${fmt(Math.min(...xs))})`;
    row("matchlock run --no-network -- true", m(none));
    row("matchlock run -- true", m(net));
    const d = pct(net, 50) - pct(none, 50);
    row(
      "  networking adds (medians)",
      `${d >= 0 ? "+" : ""}${fmt(d)}  ratio ${(pct(net, 50) / pct(none, 50)).toFixed(2)}`,
    );

    // 5: the guest's own wget through the relay (TCG: the guest CPU is the limit; informational).
    // busybox date has no %N: the guest's /proc/uptime (10 ms steps) times it.
    const up = "cut -d' ' -f1 /proc/uptime";
    const script =
      `s=$(${up}); wget -qO /dev/null http://${FAKE.web}/bytes/${BYTES} || exit 1; e=$(${up}); ` +
      `awk -v s=$s -v e=$e 'BEGIN { print (e - s) * 1000 }'`;
    const guest: number[] = [];
    const wall: number[] = [];
    for (let i = 0; i < Math.min(RUNS, 3); i++) {
      const r = await ml(["run", "--", "sh", "-c", script]);
      guest.push(Number(r.out.trim()));
      wall.push(r.ms);
    }
    const mbs = BYTES / 1e6 / (pct(guest, 50) / 1000);
    row(
      `VM wget 64 MiB, guest clock (${guest.length})`,
      `median ${fmt(pct(guest, 50))} = ${mbs.toFixed(0)} MB/s  ` +
        `(host: that run − run -- true = ${fmt(pct(wall, 50) - pct(net, 50))})`,
    );
  } finally {
    await ml(["kill", "--all"]).catch(() => {});
    await ml(["gc"]).catch(() => {});
    rmSync(home, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  for (const sig of ["SIGINT", "SIGTERM"] as const) process.on(sig, () => process.exit(130)); // exit hooks tear down
  console.log(
    `bench/net on ${cpus().length} × ${cpus()[0]?.model ?? "?"}, ${RUNS} runs, ${REQUESTS} requests per side`,
  );
  const t = await createTopology();
  let guest: ReturnType<typeof makeGuestNs> | undefined;
  let owner: ChildProcessWithoutNullStreams | undefined;
  let source: ChildProcessWithoutNullStreams | undefined;
  try {
    guest = makeGuestNs(t.hostNs);
    owner = await startOwner(t, guest.tap);
    source = await startSource(t.netNs);
    const pid = owner.pid as number;
    await throughput(t.hostNs, guest.ns, pid, "from the fake internet", FAKE.web);
    await throughput(t.hostNs, guest.ns, pid, "from a cheap source", `${FAKE.web}:${SOURCE_PORT}`);
    await connectLatency(t.hostNs, guest.ns);
    await dnsLatency(t.hostNs, guest.ns);
    owner.stdin.end();
    if (!NO_VM) await vms(t);
  } finally {
    source?.kill("SIGKILL");
    owner?.kill("SIGKILL");
    guest?.destroy();
    await t.close();
  }
}

await main();
