import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
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
 *
 * Each topology has its own test CA (`caFile`, for NODE_EXTRA_CA_CERTS or `curl --cacert`) and one server
 * certificate signed by it, valid for SERVER_NAMES, which the HTTPS servers on FAKE.web and FAKE.other use.
 *
 * Servers in netNs:
 *   FAKE.web, FAKE.other   HTTP :80 and HTTPS :443, the same routes (fake-internet.ts `web`):
 *                            GET /                 "hello from <server>\n"
 *                            GET /bytes/<n>        fakeBytes(n), n ≤ 256 MiB
 *                            POST /sha256          "<hex sha256 of the body> <bytes>\n"
 *                            GET /headers          200 JSON of the request headers as received (names lower-
 *                                                  cased, repeats joined with ", "); the authorization header,
 *                                                  when sent, comes back as response header x-echo-authorization
 *                            GET|POST /model       a fake model API: 200 {"ok":true,"model":"fake"} only with
 *                                                  `Authorization: Bearer ${FAKE_API_KEY}`, else 401 {"error":"bad key"}
 *                            GET /sse?n=N&gapMs=M  text/event-stream: headers at once, then N events
 *                                                  "data: event <i>\n\n" (i = 0…N-1), each written gapMs after the
 *                                                  previous one (defaults 5 and 200; N ≤ 1000, M ≤ 10000)
 *                            GET /query            200 {"query":"<raw query string, without the ?>"}
 *                            anything else         404
 *   FAKE.private           HTTP :80, "private\n" for anything
 *   FAKE.web               TCP echo :2222, UDP echo :9999
 *   resolver, resolver2    DNS :53 (UDP, TCP): example.test, www.example.test, api.example.test → web;
 *                          other.test and attacker.test and every name under it → other; rebind.test → private;
 *                          alias.test CNAME example.test; anything else NXDOMAIN
 * Server in hostNs: the "host service", 0.0.0.0:2223 (and [::]:2223 when there is IPv6).
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
export const FAKE_PORTS = {
  http: 80,
  https: 443,
  echo: 2222,
  udpEcho: 9999,
  dns: 53,
  hostService: 2223,
} as const;

/** The one key the fake model API (`/model`) accepts, as `Authorization: Bearer ${FAKE_API_KEY}`. */
export const FAKE_API_KEY = "sk-test-REAL-0123456789";

/** The names (and addresses) the fake internet's server certificate is valid for. */
export const SERVER_NAMES = [
  "example.test",
  "*.example.test",
  "api.example.test",
  "other.test",
  "*.other.test",
  "attacker.test",
  "*.attacker.test",
  "rebind.test",
  "alias.test",
] as const;
export const SERVER_IPS = [FAKE.web, FAKE.other] as const;

/**
 * One thing the fake internet saw. `server` is the local address that was hit; `peer` the client's address
 * (no port). A DNS `name` is lowercased without the trailing dot.
 *
 * An http hit is one request, over HTTP (:80) or HTTPS (:443), logged when the exchange ends: `path` is the
 * request target as sent (query included); `bytes` is the request body read (POST) or the response body
 * written (other methods); `host` the Host header ("" when none); `sni` the TLS server name the client
 * sent (https only; absent when none, e.g. a client dialling an IP); `headers` the request headers as
 * received, names lower-cased, a repeated header's values joined with ", ".
 *
 * A tls hit is one TCP connection to an HTTPS server (:443), logged once its handshake ends, before any
 * request on it and whether or not one follows: `sni` as above; `error` (e.g. "ECONNRESET",
 * "ERR_SSL_TLSV1_ALERT_UNKNOWN_CA") set when the handshake failed: the client closed before it was done,
 * or rejected the certificate. A client that connects and then neither speaks nor closes is logged when
 * it closes (or after Node's 120 s handshake timeout). So, once the client is gone, "no tls hit on
 * FAKE.other" proves nothing connected to its HTTPS server.
 */
export type Hit =
  | { kind: "dns"; server: string; name: string; type: string }
  | {
      kind: "http";
      server: string;
      method: string;
      path: string;
      bytes: number;
      scheme: "http" | "https";
      host: string;
      sni?: string;
      headers: Record<string, string>;
    }
  | { kind: "tls"; server: string; sni?: string; error?: string }
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
  /**
   * PEM file of this topology's test CA, which signed the HTTPS servers' certificate: give it to the owner
   * as NODE_EXTRA_CA_CERTS, or to curl as --cacert. Deleted by close().
   */
  caFile: string;
  /** Every hit the fake internet saw so far, in order (a copy). */
  hits(): Hit[];
  /** Resolves with the first hit, past or future, matching pred; rejects after timeoutMs (default 10 s). */
  waitHit(pred: (h: Hit) => boolean, timeoutMs?: number): Promise<Hit>;
  /**
   * Kills the servers and anything else left in the namespaces, deletes them, /etc/netns/<hostNs> and the
   * CA's directory. Idempotent.
   */
  close(): Promise<void>;
}

const SERVER_SCRIPT = fileURLToPath(new URL("./fake-internet.ts", import.meta.url));
const PREFIX = "mlt-";
const NAME_RE = /^mlt-([0-9a-z]+)-\d+-[hn]$/;
/** A topology's CA directory in tmpdir(): `mlt-<pid>-<n>-pki`. */
const PKI_RE = /^mlt-([0-9a-z]+)-\d+-pki$/;
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

/** Whether the test process that made a namespace or dir (pid in base 36 in its name) is still a live node. */
function ownerAlive(name: string): boolean {
  const m = NAME_RE.exec(name) ?? PKI_RE.exec(name);
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
  try {
    for (const d of readdirSync(tmpdir()).filter((n) => PKI_RE.test(n) && !ownerAlive(n)))
      rmSync(join(tmpdir(), d), { recursive: true, force: true });
  } catch {}
  return stale;
}

/** Topologies not closed yet: torn down on process exit, best effort. */
const live = new Set<{ names: string[]; pids: number[]; dirs: string[] }>();
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
      for (const d of t.dirs) rmSync(d, { recursive: true, force: true });
    }
  });
}

export interface Pki {
  dir: string;
  caFile: string;
  caKeyFile: string;
  certFile: string;
  keyFile: string;
}

/**
 * Makes a test CA (EC P-256) and a server certificate it signs, for SERVER_NAMES and SERVER_IPS, with the
 * openssl CLI, into `dir` (created): ca.pem and ca.key (the CA, its key: a test may sign more with it),
 * server.crt and server.key. Valid from now for 30 days.
 */
export function makePki(dir: string): Pki {
  mkdirSync(dir, { recursive: true });
  const f = (n: string) => join(dir, n);
  const san = [...SERVER_NAMES.map((n) => `DNS:${n}`), ...SERVER_IPS.map((a) => `IP:${a}`)].join(",");
  writeFileSync(
    f("openssl.cnf"),
    [
      "[req]",
      "distinguished_name = dn",
      "prompt = no",
      "[dn]",
      "O = matchlock tests",
      "CN = fake internet CA",
      "[ca]",
      "basicConstraints = critical,CA:TRUE,pathlen:0",
      "keyUsage = critical,keyCertSign,cRLSign",
      "subjectKeyIdentifier = hash",
      "[server]",
      "basicConstraints = critical,CA:FALSE",
      "keyUsage = critical,digitalSignature",
      "extendedKeyUsage = serverAuth",
      `subjectAltName = ${san}`,
      "subjectKeyIdentifier = hash",
      "authorityKeyIdentifier = keyid",
      "",
    ].join("\n"),
  );
  // Run in dir, with file names relative to it: each argv is one line, split on spaces.
  const openssl = (argv: string) =>
    execFileSync("openssl", argv.split(" "), { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  const ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
  openssl(`req -config openssl.cnf -x509 ${ec} -keyout ca.key -out ca.pem -days 30 -extensions ca`);
  openssl(`req -config openssl.cnf -new ${ec} -keyout server.key -out server.csr -subj /CN=example.test`);
  openssl(
    `x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial 0x${Date.now().toString(16)} -days 30 ` +
      "-extfile openssl.cnf -extensions server -out server.crt",
  );
  for (const n of ["server.csr", "openssl.cnf"]) rmSync(f(n));
  return {
    dir,
    caFile: f("ca.pem"),
    caKeyFile: f("ca.key"),
    certFile: f("server.crt"),
    keyFile: f("server.key"),
  };
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
  const pkiDir = join(tmpdir(), `${id}-pki`);
  const state = { names: [hostNs, netNs], pids: [] as number[], dirs: [pkiDir] };
  live.add(state);

  const hits: Hit[] = [];
  const waiters = new Set<(h: Hit) => void>();
  let serverErr = "";
  let failure: Error | undefined;
  let closing = false;
  const children: Array<ReturnType<typeof spawn>> = [];

  const startServer = (ns: string, role: "net" | "host", args: string[] = []) =>
    new Promise<void>((resolve, reject) => {
      const child = spawn("ip", ["netns", "exec", ns, process.execPath, SERVER_SCRIPT, role, ...args], {
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
    rmSync(pkiDir, { recursive: true, force: true });
    live.delete(state);
  });

  let pki: Pki;
  try {
    pki = makePki(pkiDir);
    build(hostNs, netNs);
    await withTimeout(
      Promise.all([startServer(netNs, "net", [pki.certFile, pki.keyFile]), startServer(hostNs, "host")]),
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
    caFile: pki.caFile,
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
