/**
 * bench/net: what networking costs, open mode (the TCP relay) and intercept mode (the HTTPS proxy), all inside
 * namespaces this run creates (test/helpers/netns.ts's fake internet; nothing reaches the machine's uplink):
 *
 *   g ── veth ── hostNs ── veth ── netNs (fake internet: HTTP 203.0.113.10:80, HTTPS :443, DNS 198.51.100.2;
 *   10.99.250.2  │  fc-bench<hex> 10.99.250.1 + the real       the bench's cheap sources: HTTP 203.0.113.10:8080,
 *                │  TcpRelay, DnsServer and nft table          HTTPS 203.0.113.20:443 as bytes.example.test)
 *                │  (bench/net-host.ts: open mode)
 *   i ── veth ───┘  fc-bench<hex> 10.99.251.1 + the same, plus the real InterceptProxy on guest TCP 80/443
 *   10.99.251.2     (bench/net-host.ts --intercept: allow-list, one secret, a fresh per-run MitmCa)
 *
 * The veths' guest namespaces stand in for VMs (no TCG slowness), so 1–4 measure the relay, DNS server and
 * proxy themselves; the same client (bench/net-client.ts) runs in g / i (through them) and in hostNs (direct):
 *   1. a 64 MiB HTTP download, relay vs direct, alternating: median MB/s and the ratio (goal ≥ 0.8), and
 *      the relay process's CPU (user + system) per download. Twice: from the fake internet's HTTP server
 *      (which computes its bytes, so it is often the limit) and from a source that writes one reused
 *      buffer (bench/net-client.ts serve, in netNs on 203.0.113.10:8080): the relay's own ceiling;
 *   2. new-connection `GET /` requests, connect to last byte: p50/p99 relay vs direct;
 *   3. DNS A queries from g to the gateway: cache hits, and distinct names (the forward path), with the
 *      upstream asked directly from hostNs as reference;
 *   4. HTTPS (issue #11), direct (hostNs, trusting the topology's CA) vs the open relay (g: TLS end to end
 *      through the TcpRelay, trusting the topology's CA) vs the intercepting proxy (i: TLS terminated with
 *      a leaf of the VM's CA, the only CA that client trusts, and a second TLS leg upstream), alternating:
 *      a. `GET https://example.test/` on one kept-alive connection (Node's https client, 500 warm-up requests
 *         per client process and a first uncounted round: the JIT, not the path, sets the pace before):
 *         p50/p99 and what each path adds to direct at p50 (goal for the proxy: ≤ 1 ms);
 *      b. a new connection (full TLS handshake, no resumption) + `GET /`, connect to last byte: p50/p99;
 *      c. a 64 MiB HTTPS download (tls.connect reading into one reused buffer): median MB/s, ratio to direct
 *         (goal for the proxy ≥ 0.8), and the CPU the client, the owner and the server spent on it (how many
 *         cores were busy); from the fake internet's HTTPS server (example.test) and from a cheap HTTPS
 *         source (bench/net-client.ts serve-https on 203.0.113.20:443 as bytes.example.test, with the fake
 *         internet's certificate; the owners' DNS answers that name locally, as --add-host would);
 *      d. 200 connections at once from one guest, each kept alive for 4 × `GET /bytes/262144` from the cheap
 *         source: wall time, errors, and the owner's RSS before and its peak during the phase (VmHWM, reset
 *         through /proc/<pid>/clear_refs before each run);
 *   4e. network hooks (issue #12): `GET https://example.test/` kept alive through the proxy (as 4a) with 0, 10
 *      and 100 static rules (bench/net-host.ts --rules) and with one callback (served here by the SDK's
 *      NetworkHookServer), each its own owner and guest namespace, alternating: p50/p99 and what each adds to
 *      0 rules at p50;
 *   5. real VMs, the built CLI in hostNs: `run -- true` vs `run --no-network -- true`, alternating;
 *   6. a real VM's `wget` of the same 64 MiB (TCG: informational).
 * Usage: npm run bench:net [-- --runs N] [--requests N] [--conns N] [--no-vm] [--only relay|intercept|hooks|vm]
 *   --runs: downloads and VM runs per side (default 5); --requests: requests/queries per side (default 200);
 *   --conns: connections at once in 4d (default 200); --only: just 1–3, 4a–d, 4e or 5–6 (repeatable).
 */
import { type ChildProcessWithoutNullStreams, execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { NetworkHookServer } from "../src/sdk/network-hooks.ts";
import { createTopology, destroyNamespace, execInNs, FAKE, type Topology } from "../test/helpers/netns.ts";

const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const RUNS = arg("--runs", 5);
const REQUESTS = arg("--requests", 200);
const CONNS = arg("--conns", 200);
const NO_VM = process.argv.includes("--no-vm");
const ONLY = process.argv.flatMap((a, i) => (process.argv[i - 1] === "--only" ? [a] : []));
for (const o of ONLY)
  if (!["relay", "intercept", "hooks", "vm"].includes(o))
    throw new Error(`--only ${o}: relay, intercept, hooks or vm`);
const runs = (section: "relay" | "intercept" | "hooks" | "vm") => ONLY.length === 0 || ONLY.includes(section);
const BYTES = 64 * 1024 * 1024;
const CLI = fileURLToPath(new URL("../dist/cli/main.js", import.meta.url));
const CLIENT = fileURLToPath(new URL("./net-client.ts", import.meta.url));
const HOST = fileURLToPath(new URL("./net-host.ts", import.meta.url));
const GATEWAY = "10.99.250.1";
const GUEST = "10.99.250.2";
/** The intercept-mode "VM": its own veth, subnet and owner process. */
const I_GATEWAY = "10.99.251.1";
const I_GUEST = "10.99.251.2";
const SOURCE_PORT = 8080;
/** The cheap HTTPS source: its own address (the proxy always dials port 443), a name the certificate covers. */
const CHEAP = { ip: "203.0.113.20", name: "bytes.example.test" } as const;

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

/** A "guest" namespace and its veth; deleted on exit whatever happens. */
function makeGuestNs(
  hostNs: string,
  suffix: string,
  gateway = GATEWAY,
  guest = GUEST,
): { ns: string; tap: string; destroy(): void } {
  const ns = `mlb-${process.pid.toString(36)}-${suffix}`;
  const tap = `fc-bench${randomBytes(3).toString("hex")}`;
  const destroy = () => destroyNamespace(ns);
  process.on("exit", destroy);
  const ip = (...a: string[]) => execFileSync("ip", a, { stdio: ["ignore", "ignore", "pipe"] });
  ip("netns", "add", ns);
  // Both ends are made inside bench namespaces: nothing ever exists in the root namespace.
  ip("-n", hostNs, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", ns);
  ip("-n", hostNs, "addr", "add", `${gateway}/24`, "dev", tap);
  ip("-n", hostNs, "link", "set", tap, "up");
  ip("-n", ns, "link", "set", "lo", "up");
  ip("-n", ns, "addr", "add", `${guest}/24`, "dev", "eth0");
  ip("-n", ns, "link", "set", "eth0", "up");
  ip("-n", ns, "route", "add", "default", "via", gateway);
  return { ns, tap, destroy };
}

/**
 * bench/net-host.ts in hostNs: resolves once its table is applied. It trusts the topology's CA upstream
 * (NODE_EXTRA_CA_CERTS) and answers CHEAP.name itself; `vmCaFile`: intercept mode, the VM's CA goes there.
 */
function startOwner(
  t: Topology,
  tap: string,
  gateway: string,
  guest: string,
  vmCaFile?: string,
  extra: string[] = [],
): Promise<ChildProcessWithoutNullStreams> {
  const args = [HOST, tap, gateway, guest, FAKE.resolver, "--host", `${CHEAP.name}=${CHEAP.ip}`];
  if (vmCaFile !== undefined) args.push("--intercept", vmCaFile, ...extra);
  const child = spawn("ip", ["netns", "exec", t.hostNs, process.execPath, ...args], {
    stdio: ["pipe", "pipe", "pipe"],
    env: { ...process.env, NODE_EXTRA_CA_CERTS: t.caFile },
  });
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

/** bench/net-client.ts serve-https in netNs on CHEAP.ip:443, with the fake internet's certificate. */
function startHttpsSource(t: Topology): Promise<ChildProcessWithoutNullStreams> {
  execFileSync("ip", ["-n", t.netNs, "addr", "add", `${CHEAP.ip}/32`, "dev", "lo"]);
  const pki = dirname(t.caFile); // netns.ts makePki: server.crt and server.key next to ca.pem
  const child = spawn(
    "ip",
    [
      "netns",
      "exec",
      t.netNs,
      process.execPath,
      CLIENT,
      "serve-https",
      CHEAP.ip,
      "443",
      join(pki, "server.crt"),
      join(pki, "server.key"),
    ],
    { stdio: ["pipe", "pipe", "pipe"] },
  );
  return untilReady(child, "https source");
}

/** One way from a client to the fake internet's HTTPS: its namespace, the CA it trusts, the owner on it. */
interface HttpsPath {
  label: string;
  ns: string;
  ca: string;
  /** The owner process (relay or proxy); none for direct. */
  owner?: number;
}

/** Resident memory of a process, in KiB: VmRSS, or VmHWM (its peak since start or the last reset). */
function memKiB(pid: number, field: "VmRSS" | "VmHWM"): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m?.[1] ?? Number.NaN);
}
const mib = (kib: number) => `${(kib / 1024).toFixed(0)} MiB`;

/** Each path `rounds` times, alternating in that order; the results by path. */
async function rotate<T>(
  paths: HttpsPath[],
  rounds: number,
  f: (p: HttpsPath) => Promise<T>,
): Promise<T[][]> {
  const out = paths.map((): T[] => []);
  for (let r = 0; r < rounds; r++) for (const [k, p] of paths.entries()) out[k]?.push(await f(p));
  return out;
}

/** The pid of the process in `ns` whose command line contains `marker`. */
function pidIn(ns: string, marker: string): number {
  const pids = execFileSync("ip", ["netns", "pids", ns], { encoding: "utf8" }).split("\n").filter(Boolean);
  const pid = pids.find((p) => {
    try {
      return readFileSync(`/proc/${p}/cmdline`, "utf8").includes(marker);
    } catch {
      return false;
    }
  });
  if (pid === undefined) throw new Error(`no process with ${marker} in ${ns}`);
  return Number(pid);
}

const busyMs = (pid: number) => cpuMs(pid).reduce((x, y) => x + y, 0);
const median = (xs: number[]) => pct(xs, 50);
const plus = (ms: number) => `${ms >= 0 ? "+" : ""}${fmt(ms)}`;
const p50p99 = (xs: number[]) => `p50 ${fmt(pct(xs, 50))}  p99 ${fmt(pct(xs, 99))}`;

/**
 * `GET https://example.test/` on one kept-alive connection per path (4a, 4e): a first round warms
 * the owners up and is not counted, then RUNS rounds alternate; the latencies by path.
 */
async function keptAlive(paths: HttpsPath[]): Promise<number[][]> {
  const n = String(Math.ceil(REQUESTS / RUNS));
  const once = async (q: HttpsPath) => {
    const r = await client<{ ms: number[]; sockets: number }>(q.ns, [
      "https-keepalive",
      FAKE.web,
      "example.test",
      q.ca,
      n,
    ]);
    if (r.sockets !== 1) throw new Error(`${q.label}: kept-alive requests used ${r.sockets} connections`);
    return r.ms;
  };
  await rotate(paths, 1, once);
  return (await rotate(paths, RUNS, once)).map((xs) => xs.flat());
}

/** Section 4: `servers` are the pids of the fake internet's server process and of the cheap HTTPS source. */
async function https(paths: HttpsPath[], servers: { fake: number; cheap: number }): Promise<void> {
  const target = (cheap: boolean) => (cheap ? [CHEAP.ip, CHEAP.name] : [FAKE.web, "example.test"]);
  const n = String(Math.ceil(REQUESTS / RUNS));
  const goal = (q: HttpsPath, text: string) => (q.label === "intercept proxy" ? `  (goal ${text})` : "");

  // a. kept-alive requests (a first round warms the owners up, not counted)
  const keep = await keptAlive(paths);
  for (const [k, q] of paths.entries()) {
    row(`HTTPS GET / kept alive, ${q.label} (${keep[k]?.length})`, p50p99(keep[k] ?? []));
  }
  for (const [k, q] of paths.entries()) {
    if (k === 0) continue;
    const added = median(keep[k] ?? []) - median(keep[0] ?? []);
    row(`  added by the ${q.label} (p50)`, `${plus(added)}${goal(q, "≤ 1 ms")}`);
  }

  // b. new connections
  const connects = async (q: HttpsPath) =>
    (await client<{ ms: number[] }>(q.ns, ["https-connect", ...target(false), q.ca, n])).ms;
  await rotate(paths, 1, connects);
  const fresh = (await rotate(paths, RUNS, connects)).map((xs) => xs.flat());
  for (const [k, q] of paths.entries()) {
    row(`new TLS connection + GET /, ${q.label} (${fresh[k]?.length})`, p50p99(fresh[k] ?? []));
  }
  for (const [k, q] of paths.entries()) {
    if (k === 0) continue;
    const d = (x: number) => pct(fresh[k] ?? [], x) - pct(fresh[0] ?? [], x);
    row(`  added by the ${q.label}`, `p50 ${plus(d(50))}  p99 ${plus(d(99))}`);
  }

  // c. 64 MiB downloads, with the CPU each process spent on them
  for (const cheap of [false, true]) {
    const what = cheap ? "cheap source" : "fake internet";
    const server = cheap ? servers.cheap : servers.fake;
    const once = async (q: HttpsPath) => {
      const [o0, s0] = [q.owner ? busyMs(q.owner) : 0, busyMs(server)];
      const r = await client<{ ms: number; bytes: number; cpu: number }>(q.ns, [
        "https-download",
        ...target(cheap),
        q.ca,
        `/bytes/${BYTES}`,
      ]);
      const [o1, s1] = [q.owner ? busyMs(q.owner) : 0, busyMs(server)];
      if (r.bytes < BYTES) throw new Error(`short HTTPS download via ${q.label}: ${r.bytes} bytes`);
      return { ms: r.ms, mbs: BYTES / 1e6 / (r.ms / 1000), client: r.cpu, owner: o1 - o0, server: s1 - s0 };
    };
    await rotate(paths, 1, once); // warm-up, not counted
    const all = await rotate(paths, RUNS, once);
    const mbs = (x: number) => `${x.toFixed(0)} MB/s`;
    const med = (k: number, f: (x: Awaited<ReturnType<typeof once>>) => number) =>
      median((all[k] ?? []).map(f));
    for (const [k, q] of paths.entries()) {
      const xs = (all[k] ?? []).map((x) => x.mbs);
      row(
        `64 MiB HTTPS, ${what}, ${q.label}`,
        `median ${mbs(med(k, (x) => x.mbs))}  (min ${mbs(Math.min(...xs))}, max ${mbs(Math.max(...xs))})`,
      );
      const [c, o, sv] = [med(k, (x) => x.client), med(k, (x) => x.owner), med(k, (x) => x.server)];
      row(
        "  CPU per download (medians)",
        `client ${fmt(c)}${q.owner ? ` + owner ${fmt(o)}` : ""} + server ${fmt(sv)} = ` +
          `${((c + o + sv) / med(k, (x) => x.ms)).toFixed(2)} cores busy (of ${cpus().length})`,
      );
    }
    for (const [k, q] of paths.entries()) {
      if (k === 0) continue;
      const ratio = med(k, (x) => x.mbs) / med(0, (x) => x.mbs);
      row(`  ratio (${q.label} / direct, medians)`, `${ratio.toFixed(2)}${goal(q, "≥ 0.80")}`);
    }
  }

  // d. many connections at once, from the cheap source (the fake internet's server would set the pace)
  const each = 256 * 1024;
  const perConn = 4;
  const idle = new Map(paths.map((q) => [q, q.owner ? memKiB(q.owner, "VmRSS") : 0]));
  const conc = await rotate(paths, Math.min(RUNS, 3), async (q) => {
    if (q.owner) writeFileSync(`/proc/${q.owner}/clear_refs`, "5"); // VmHWM := VmRSS
    const before = q.owner ? memKiB(q.owner, "VmRSS") : 0;
    const args = [...target(true), q.ca, String(CONNS), String(perConn), `/bytes/${each}`];
    const r = await client<{
      ms: number;
      bytes: number;
      errors: number;
      sockets: number;
      firstError?: string;
    }>(q.ns, ["https-concurrent", ...args]);
    const peak = q.owner ? memKiB(q.owner, "VmHWM") : 0;
    const after = q.owner ? memKiB(q.owner, "VmRSS") : 0;
    if (r.errors === 0 && r.bytes !== CONNS * perConn * each)
      throw new Error(`${q.label}: ${r.bytes} bytes without an error`);
    return { ...r, before, peak, after };
  });
  for (const [k, q] of paths.entries()) {
    const xs = conc[k] ?? [];
    const errors = xs.reduce((acc, x) => acc + x.errors, 0);
    const first = xs.find((x) => x.firstError)?.firstError;
    const wall = median(xs.map((x) => x.ms));
    row(
      `${CONNS} conns at once × ${perConn} GET 256 KiB, ${q.label} (${xs.length})`,
      `median ${fmt(wall)}  errors ${errors}${first ? ` (${first})` : ""}  ` +
        `connections ${Math.max(...xs.map((x) => x.sockets))}`,
    );
    if (q.owner) {
      const before = Math.min(...xs.map((x) => x.before));
      const peak = Math.max(...xs.map((x) => x.peak));
      const after = Math.max(...xs.map((x) => x.after));
      row(
        "  owner RSS",
        `idle ${mib(idle.get(q) ?? 0)}, before ${mib(before)}, peak ${mib(peak)} ` +
          `(+${((peak - before) / CONNS).toFixed(0)} KiB per connection; by run ${xs.map((x) => mib(x.peak)).join(", ")}), ` +
          `after ${mib(after)}`,
      );
    }
  }
}

/** Section 4e: one owner and guest namespace per hook setup; kept-alive requests, alternating. */
async function hooks(t: Topology, tmp: string, children: ChildProcessWithoutNullStreams[]): Promise<void> {
  const server = await NetworkHookServer.start(
    new Map([["bench", { id: "bench", name: "bench", phase: "before", timeoutMs: 0, hook: () => null }]]),
  );
  const guests: Array<ReturnType<typeof makeGuestNs>> = [];
  try {
    const setups: Array<[string, string[]]> = [
      ["0 rules", []],
      ["10 rules", ["--rules", "10"]],
      ["100 rules", ["--rules", "100"]],
      ["1 callback", ["--callback", server.socketPath]],
    ];
    const paths: HttpsPath[] = [];
    for (const [k, [label, extra]] of setups.entries()) {
      const [gw, ip] = [`10.99.${252 + k}.1`, `10.99.${252 + k}.2`];
      const g = makeGuestNs(t.hostNs, `h${k}`, gw, ip);
      guests.push(g);
      const ca = join(tmp, `hooks-${k}.pem`);
      const owner = await startOwner(t, g.tap, gw, ip, ca, extra);
      children.push(owner);
      paths.push({ label, ns: g.ns, ca, owner: owner.pid as number });
    }
    const keep = await keptAlive(paths);
    for (const [k, q] of paths.entries()) {
      row(`hooks: GET / kept alive, ${q.label} (${keep[k]?.length})`, p50p99(keep[k] ?? []));
    }
    for (const [k, q] of paths.entries()) {
      if (k === 0) continue;
      row(`  added by ${q.label} (p50)`, plus(median(keep[k] ?? []) - median(keep[0] ?? [])));
    }
  } finally {
    for (const g of guests) g.destroy();
    await server.close();
  }
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
  const tmp = mkdtempSync(join(tmpdir(), "matchlock-bench-net-"));
  const vmCa = join(tmp, "vm-ca.pem");
  let guest: ReturnType<typeof makeGuestNs> | undefined;
  let iguest: ReturnType<typeof makeGuestNs> | undefined;
  const children: ChildProcessWithoutNullStreams[] = [];
  try {
    guest = makeGuestNs(t.hostNs, "g");
    const owner = await startOwner(t, guest.tap, GATEWAY, GUEST);
    children.push(owner);
    const pid = owner.pid as number;
    if (runs("relay")) {
      children.push(await startSource(t.netNs));
      await throughput(t.hostNs, guest.ns, pid, "from the fake internet", FAKE.web);
      await throughput(t.hostNs, guest.ns, pid, "from a cheap source", `${FAKE.web}:${SOURCE_PORT}`);
      await connectLatency(t.hostNs, guest.ns);
      await dnsLatency(t.hostNs, guest.ns);
    }
    if (runs("intercept")) {
      iguest = makeGuestNs(t.hostNs, "i", I_GATEWAY, I_GUEST);
      const proxy = await startOwner(t, iguest.tap, I_GATEWAY, I_GUEST, vmCa);
      children.push(proxy);
      const cheap = await startHttpsSource(t);
      children.push(cheap);
      await https(
        [
          { label: "direct", ns: t.hostNs, ca: t.caFile },
          { label: "open relay", ns: guest.ns, ca: t.caFile, owner: pid },
          { label: "intercept proxy", ns: iguest.ns, ca: vmCa, owner: proxy.pid as number },
        ],
        { fake: pidIn(t.netNs, "fake-internet.ts"), cheap: cheap.pid as number },
      );
    }
    if (runs("hooks")) await hooks(t, tmp, children);
    for (const c of children) c.stdin.end();
    if (!NO_VM && runs("vm")) await vms(t);
  } finally {
    for (const c of children) c.kill("SIGKILL");
    iguest?.destroy();
    guest?.destroy();
    rmSync(tmp, { recursive: true, force: true });
    await t.close();
  }
}

await main();
