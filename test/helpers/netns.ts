import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { spawnCollect } from "./cli.ts";

/**
 * The fake internet that VM network tests use (NETWORK.md §8, research/network.md §3.1 and §5.9).
 *
 *   hostNs  lo; up0 198.51.100.1/24, default via 198.51.100.2; a "host service" on 0.0.0.0:2223
 *     │ veth (its only link: no namespace here links to the root namespace, so nothing reaches the uplink)
 *   netNs   up0 198.51.100.2/24 + 198.51.100.53/24; lo + 203.0.113.10, 203.0.113.66, 10.1.2.3;
 *           an "unreachable" default route, so a dial to any other address fails at once
 *
 * The owning matchlock process runs in hostNs (`hostPrefix`); it creates its TAPs and nft tables there.
 * The servers (test/helpers/fake-internet.ts) log every hit; tests read them with hits()/waitHit().
 */

export const FAKE = {
  web: "203.0.113.10",
  other: "203.0.113.66",
  private: "10.1.2.3",
  resolver: "198.51.100.2",
  resolver2: "198.51.100.53",
  hostUplink: "198.51.100.1",
} as const;

/** Ports of the fake internet's servers. */
export const FAKE_PORTS = { http: 80, echo: 2222, udpEcho: 9999, dns: 53, hostService: 2223 } as const;

/**
 * One thing the fake internet saw. `server` is the local address that was hit; `peer` the client's address
 * (no port). A DNS `name` is lowercased without the trailing dot. An http hit is logged when the exchange
 * ends; `bytes` is the request body read (POST) or the response body written (other methods).
 */
export type Hit =
  | { kind: "dns"; server: string; name: string; type: string }
  | { kind: "http"; server: string; method: string; path: string; bytes: number }
  | { kind: "tcp-echo"; server: string; peer: string }
  | { kind: "udp"; server: string; peer: string }
  | { kind: "host-service"; peer: string };

export interface ExecResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
}

export interface ExecOptions {
  env?: NodeJS.ProcessEnv;
  input?: string | Buffer;
  timeoutMs?: number;
}

export interface Topology {
  /** Namespace where the owning matchlock process runs (it will create TAPs and nft tables there). */
  hostNs: string;
  netNs: string;
  /** Run a command inside hostNs (like `ip netns exec`); resolves with code/stdout/stderr. */
  execInHost(cmd: string, args: string[], opts?: ExecOptions): Promise<ExecResult>;
  /** argv prefix to spawn anything in hostNs yourself: ["ip","netns","exec",hostNs]. */
  hostPrefix: string[];
  /** Every hit the fake internet saw so far, in order (a copy). */
  hits(): Hit[];
  /** Resolves with the first hit, past or future, matching pred; rejects after timeoutMs (default 10 s). */
  waitHit(pred: (h: Hit) => boolean, timeoutMs?: number): Promise<Hit>;
  /** Kills the servers and anything else left in the namespaces, deletes them and /etc/netns/<hostNs>. Idempotent. */
  close(): Promise<void>;
}

const SERVER_SCRIPT = fileURLToPath(new URL("./fake-internet.ts", import.meta.url));
const PREFIX = "mlt-";
const NAME_RE = /^mlt-([0-9a-z]+)-\d+-[hn]$/;
let counter = 0;

/** `GET /bytes/<n>` serves fakeBytes(n): 32-bit words (LE) h(i) = i·0x9e3779b1 mod 2³², each unique below 16 GiB. */
export function fakeBytes(n: number, offset = 0): Buffer {
  const start = Math.floor(offset / 4);
  const words = new Uint32Array(Math.ceil((offset + n) / 4) - start);
  for (let i = 0; i < words.length; i++) words[i] = Math.imul(start + i, 0x9e3779b1) >>> 0;
  const skip = offset - start * 4;
  return Buffer.from(words.buffer, skip, n);
}

/** Runs `cmd args` inside namespace `ns` (`ip netns exec`), collecting its output. */
export function execInNs(
  ns: string,
  cmd: string,
  args: string[],
  opts: ExecOptions = {},
): Promise<ExecResult> {
  return spawnCollect("ip", ["netns", "exec", ns, cmd, ...args], { timeoutMs: 30_000, ...opts });
}

/** `ip …` that must succeed. */
function ip(...args: string[]): void {
  execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
}

function listNamespaces(): string[] {
  const out = execFileSync("ip", ["netns", "list"], { encoding: "utf8" });
  return out
    .split("\n")
    .map((l) => l.split(" ")[0] ?? "")
    .filter((n) => n !== "");
}

/** Best effort, synchronous (usable from an 'exit' handler): SIGKILL every process in ns, delete it. */
export function destroyNamespace(ns: string): void {
  try {
    const pids = execFileSync("ip", ["netns", "pids", ns], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    });
    for (const pid of pids.split("\n").filter((p) => /^\d+$/.test(p))) {
      try {
        process.kill(Number(pid), "SIGKILL");
      } catch {}
    }
  } catch {}
  try {
    execFileSync("ip", ["netns", "del", ns], { stdio: "ignore" });
  } catch {}
  if (ns.endsWith("-h")) rmSync(`/etc/netns/${ns}`, { recursive: true, force: true });
}

/** Whether the test process that made a namespace (pid in base 36 in its name) is still a live node. */
function ownerAlive(name: string): boolean {
  const m = NAME_RE.exec(name);
  if (!m?.[1]) return true; // not ours: leave it
  const pid = Number.parseInt(m[1], 36);
  if (pid === process.pid) return true;
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("node");
  } catch {
    return false;
  }
}

/** Deletes `mlt-*` namespaces and /etc/netns/mlt-* left by test processes that are gone. Returns their names. */
export function sweepStaleTopologies(): string[] {
  let etc: string[] = [];
  try {
    etc = readdirSync("/etc/netns").filter((n) => n.startsWith(PREFIX));
  } catch {}
  const stale = [...new Set([...listNamespaces().filter((n) => n.startsWith(PREFIX)), ...etc])].filter(
    (n) => NAME_RE.test(n) && !ownerAlive(n),
  );
  for (const ns of stale) destroyNamespace(ns);
  return stale;
}

/** Topologies not closed yet: torn down on process exit, best effort. */
const live = new Set<{ names: string[]; pids: number[] }>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const t of live) {
      for (const pid of t.pids) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {}
      }
      for (const ns of t.names) destroyNamespace(ns);
    }
  });
}

function build(hostNs: string, netNs: string): void {
  ip("netns", "add", hostNs);
  ip("netns", "add", netNs);
  // Both ends are created inside the test namespaces: no interface ever exists in the root namespace.
  ip("-n", hostNs, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", netNs);
  for (const ns of [hostNs, netNs]) ip("-n", ns, "link", "set", "lo", "up");
  ip("-n", hostNs, "addr", "add", `${FAKE.hostUplink}/24`, "dev", "up0");
  ip("-n", hostNs, "link", "set", "up0", "up");
  ip("-n", hostNs, "route", "add", "default", "via", FAKE.resolver);
  ip("-n", netNs, "addr", "add", `${FAKE.resolver}/24`, "dev", "up0");
  ip("-n", netNs, "addr", "add", `${FAKE.resolver2}/24`, "dev", "up0");
  ip("-n", netNs, "link", "set", "up0", "up");
  for (const a of [FAKE.web, FAKE.other, FAKE.private])
    ip("-n", netNs, "addr", "add", `${a}/32`, "dev", "lo");
  // Anything else is answered with ICMP "net unreachable" (forwarding on, so the kernel sends it) instead
  // of a silent drop: a dial to the real internet fails fast. There is no link to forward to.
  ip("-n", netNs, "route", "add", "unreachable", "default");
  execFileSync("ip", ["netns", "exec", netNs, "sysctl", "-qw", "net.ipv4.ip_forward=1"], { stdio: "ignore" });
  mkdirSync(`/etc/netns/${hostNs}`, { recursive: true });
  writeFileSync(`/etc/netns/${hostNs}/resolv.conf`, `nameserver ${FAKE.resolver}\n`);
}

/** Creates the two namespaces and starts the servers; resolves once every server listens. */
export async function createTopology(): Promise<Topology> {
  sweepStaleTopologies();
  installExitHook();
  const id = `${PREFIX}${process.pid.toString(36)}-${counter++}`;
  const hostNs = `${id}-h`;
  const netNs = `${id}-n`;
  const state = { names: [hostNs, netNs], pids: [] as number[] };
  live.add(state);

  const hits: Hit[] = [];
  const waiters = new Set<(h: Hit) => void>();
  let serverErr = "";
  let failure: Error | undefined;
  let closing = false;
  const children: Array<ReturnType<typeof spawn>> = [];

  const startServer = (ns: string, role: "net" | "host") =>
    new Promise<void>((resolve, reject) => {
      const child = spawn("ip", ["netns", "exec", ns, process.execPath, SERVER_SCRIPT, role], {
        stdio: ["pipe", "pipe", "pipe"],
      });
      children.push(child);
      if (child.pid !== undefined) state.pids.push(child.pid);
      let buf = "";
      child.stdout.setEncoding("utf8");
      child.stdout.on("data", (d: string) => {
        buf += d;
        for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line === "ready") resolve();
          else if (line !== "") {
            const hit = JSON.parse(line) as Hit;
            hits.push(hit);
            for (const w of waiters) w(hit);
          }
        }
      });
      child.stderr.on("data", (d: Buffer) => {
        serverErr += d.toString();
      });
      child.stdin.on("error", () => {});
      child.on("error", reject);
      child.on("exit", (code, signal) => {
        const err = new Error(`fake-internet ${role} server exited (${code ?? signal}): ${serverErr}`);
        if (!closing) failure ??= err;
        reject(err);
      });
    });

  const close = once(async () => {
    closing = true;
    for (const c of children) c.kill("SIGKILL");
    await Promise.all(
      children.map((c) =>
        c.exitCode !== null || c.signalCode !== null
          ? undefined
          : new Promise<void>((r) => c.once("exit", () => r())),
      ),
    );
    for (const ns of state.names) destroyNamespace(ns);
    live.delete(state);
  });

  try {
    build(hostNs, netNs);
    await withTimeout(
      Promise.all([startServer(netNs, "net"), startServer(hostNs, "host")]),
      15_000,
      () => `fake internet not ready: ${serverErr}`,
    );
  } catch (e) {
    await close();
    throw e;
  }

  return {
    hostNs,
    netNs,
    hostPrefix: ["ip", "netns", "exec", hostNs],
    execInHost: (cmd, args, opts) => execInNs(hostNs, cmd, args, opts),
    hits: () => [...hits],
    waitHit: (pred, timeoutMs = 10_000) => {
      const seen = hits.find(pred);
      if (seen) return Promise.resolve(seen);
      if (failure) return Promise.reject(failure);
      let waiter: ((h: Hit) => void) | undefined;
      const p = new Promise<Hit>((resolve) => {
        waiter = (h) => {
          if (pred(h)) resolve(h);
        };
        waiters.add(waiter);
      });
      return withTimeout(p, timeoutMs, () => {
        const tail = JSON.stringify(hits.slice(-10));
        return `no matching hit within ${timeoutMs} ms; last hits: ${tail}${failure ? `; ${failure.message}` : ""}`;
      }).finally(() => {
        if (waiter) waiters.delete(waiter);
      });
    },
    close,
  };
}

function once(f: () => Promise<void>): () => Promise<void> {
  let p: Promise<void> | undefined;
  return () => {
    p ??= f();
    return p;
  };
}

function withTimeout<T>(p: Promise<T>, ms: number, message: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(message())), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}
