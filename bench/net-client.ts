/**
 * bench/net's client: the same code runs in the "guest" namespace (through the relay) and in the host
 * namespace (direct), started by bench/net.ts under `ip netns exec`. Prints one JSON line on stdout.
 *
 *   node bench/net-client.ts download <ip>[:port] <path>  one HTTP GET (port 80), body discarded: {ms, bytes}
 *   node bench/net-client.ts connect <ip> <n>          n sequential new-connection `GET /`: {ms: [...]}
 *   node bench/net-client.ts dns <server> <n> <names>  n sequential A queries over UDP: {ms: [...], rcodes}
 *       <names> is a name asked every time (cache hits after the first), or `uncached`: a distinct
 *       name each query (NXDOMAIN upstream), so every query takes the forward path.
 *   node bench/net-client.ts serve <ip> <port> <n>     a cheap byte source (run in the fake internet)
 *
 * HTTPS (Node's https client; <ip>[:port], port 443 by default, is dialled with SNI and Host <name>, and
 * <ca.pem> is the only CA trusted: the topology's CA direct or through the relay, the VM's CA through the
 * intercepting proxy, as in a real guest):
 *   https-keepalive <ip> <name> <ca.pem> <n> [w]    n sequential `GET /` on one kept-alive connection (https.Agent,
 *                                                   keepAlive, maxSockets 1), after w (default 500) warm-up ones on
 *                                                   the same connection: {ms: [...], sockets} (sockets must be 1).
 *                                                   Node's JIT needs them: after 20, p50 through the proxy was still
 *                                                   twice its steady value.
 *   https-connect <ip> <name> <ca.pem> <n>          n sequential `GET /`, each on a new connection with a full TLS
 *                                                   handshake (no session reuse), connect to last byte: {ms: [...]}
 *   https-download <ip> <name> <ca.pem> <path>      one GET on a new connection, read into one reused buffer
 *                                                   (tls.connect, not the https client): {ms, bytes (head + body),
 *                                                   cpu: this process's user + system ms during it}
 *   https-concurrent <ip> <name> <ca.pem> <c> <k> <path>
 *                                                   c kept-alive connections at once, each doing k sequential GETs
 *                                                   of <path>: {ms (wall), bytes, errors, sockets, firstError?}
 *   serve-https <ip> <port> <cert> <key>            a cheap HTTPS source (run in the fake internet), keep-alive:
 *                                                   `GET /` "hello\n", `GET /bytes/<n>` n bytes written from one
 *                                                   reused 1 MiB buffer
 */
import { randomBytes } from "node:crypto";
import { createSocket } from "node:dgram";
import { readFileSync } from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import { Agent, createServer as createHttpsServer, request as httpsRequest } from "node:https";
import { connect, createServer, type OnReadOpts } from "node:net";
import { type ConnectionOptions, connect as tlsConnect } from "node:tls";
import { decode, encode, RECURSION_DESIRED } from "dns-packet";

/**
 * Reads land in this one buffer and are discarded. Node's default read path allocates a fresh 64 KiB
 * buffer per read, and here every one of them page-faults (~14k faults per 64 MiB, ~0.2 s on this
 * machine): the client, not the relay, would set the pace. Requests run one at a time, so one buffer.
 */
const SINK = Buffer.allocUnsafe(1024 * 1024);

/** One HTTP/1.1 exchange on a new connection, Connection: close; resolves with the bytes read (head + body). */
function httpGet(ip: string, path: string, port = 80): Promise<number> {
  return new Promise((resolve, reject) => {
    let bytes = 0;
    let head = "";
    const s = connect({
      host: ip,
      port,
      noDelay: true,
      onread: {
        buffer: SINK,
        callback: (n, buf) => {
          if (bytes === 0) head = Buffer.from(buf.buffer, buf.byteOffset, Math.min(n, 16)).toString("latin1");
          bytes += n;
          return true;
        },
      },
    });
    s.on("connect", () => s.write(`GET ${path} HTTP/1.1\r\nHost: ${ip}\r\nConnection: close\r\n\r\n`));
    s.on("error", reject);
    s.on("end", () => {
      if (!head.startsWith("HTTP/1.1 200")) reject(new Error(`${ip}${path}: ${JSON.stringify(head)}`));
      else resolve(bytes);
    });
  });
}

async function download(target: string, path: string): Promise<void> {
  const [ip = "", port = "80"] = target.split(":");
  const t0 = performance.now();
  const bytes = await httpGet(ip, path, Number(port));
  const ms = performance.now() - t0;
  process.stdout.write(`${JSON.stringify({ ms, bytes })}\n`);
}

async function connects(ip: string, n: number): Promise<void> {
  for (let i = 0; i < 20; i++) await httpGet(ip, "/"); // warm-up, not counted
  const ms: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await httpGet(ip, "/");
    ms.push(performance.now() - t0);
  }
  process.stdout.write(`${JSON.stringify({ ms })}\n`);
}

async function dns(server: string, n: number, names: string): Promise<void> {
  const sock = createSocket("udp4");
  await new Promise<void>((resolve, reject) => {
    sock.once("error", reject);
    sock.connect(53, server, () => resolve());
  });
  let waiting: ((msg: Buffer) => void) | undefined;
  sock.on("message", (msg) => waiting?.(msg));
  const tag = randomBytes(4).toString("hex");
  const rcodes: Record<string, number> = {};
  const query = async (name: string): Promise<number> => {
    const id = Math.floor(Math.random() * 65536);
    const t0 = performance.now();
    const reply = new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no DNS answer for ${name} within 5 s`)), 5000);
      waiting = (msg) => {
        if (msg.length >= 2 && msg.readUInt16BE(0) === id) {
          clearTimeout(timer);
          resolve(msg);
        }
      };
    });
    sock.send(encode({ type: "query", id, flags: RECURSION_DESIRED, questions: [{ type: "A", name }] }));
    const r = decode(await reply);
    const ms = performance.now() - t0;
    const code = (r.flags ?? 0) & 0xf;
    const rcode = code === 0 ? "NOERROR" : code === 3 ? "NXDOMAIN" : `rcode ${code}`;
    rcodes[rcode] = (rcodes[rcode] ?? 0) + 1;
    return ms;
  };
  const nameOf = (i: number) => (names === "uncached" ? `q${i}-${tag}.nx.test` : names);
  for (let i = 0; i < 20; i++) await query(names === "uncached" ? `w${i}-${tag}.nx.test` : names); // warm-up
  for (const k of Object.keys(rcodes)) delete rcodes[k];
  const ms: number[] = [];
  for (let i = 0; i < n; i++) ms.push(await query(nameOf(i)));
  sock.close();
  process.stdout.write(`${JSON.stringify({ ms, rcodes })}\n`);
}

/**
 * A source that costs next to no CPU (the fake internet computes its bytes): answers any request on
 * ip:port with `n` bytes written from one reused 1 MiB buffer, then closes. Prints `ready`.
 */
function serve(ip: string, port: number, n: number): void {
  const chunk = Buffer.alloc(1024 * 1024, 0x5a);
  const srv = createServer({ noDelay: true }, (s) => {
    s.on("error", () => s.destroy());
    let req = "";
    s.on("data", (d: Buffer) => {
      if (req.includes("\r\n\r\n")) return;
      req += d.toString("latin1");
      if (!req.includes("\r\n\r\n")) return;
      s.write(`HTTP/1.1 200 OK\r\ncontent-length: ${n}\r\nconnection: close\r\n\r\n`);
      let left = n;
      const more = () => {
        while (left > 0) {
          const piece = left >= chunk.length ? chunk : chunk.subarray(0, left);
          left -= piece.length;
          if (!s.write(piece)) return void s.once("drain", more);
        }
        s.end();
      };
      more();
    });
  });
  srv.listen({ host: ip, port }, () => process.stdout.write("ready\n"));
  process.stdin.on("end", () => process.exit(0));
  process.stdin.resume();
}

interface HttpsTarget {
  host: string;
  port: number;
  name: string;
  ca: Buffer;
}

function httpsTarget(addr: string, name: string, caFile: string): HttpsTarget {
  const [host = "", port = "443"] = addr.split(":");
  return { host, port: Number(port), name, ca: readFileSync(caFile) };
}

/** One `GET path` over HTTPS; resolves with the body's length once its last byte is in. */
function httpsGet(
  t: HttpsTarget,
  path: string,
  agent: Agent | false,
  onSocket?: (s: unknown) => void,
): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(
      {
        host: t.host,
        port: t.port,
        servername: t.name,
        ca: t.ca,
        path,
        headers: { host: t.name, ...(agent === false ? { connection: "close" } : {}) },
        agent,
      },
      (res: IncomingMessage) => {
        let bytes = 0;
        res.on("data", (d: Buffer) => {
          bytes += d.length;
        });
        res.on("error", reject);
        res.on("end", () => {
          if (res.statusCode !== 200) reject(new Error(`${t.name}${path}: HTTP ${res.statusCode}`));
          else resolve(bytes);
        });
      },
    );
    if (onSocket) req.on("socket", onSocket);
    req.on("error", reject);
    req.end();
  });
}

async function httpsKeepAlive(t: HttpsTarget, n: number, warmUp: number): Promise<void> {
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  const sockets = new Set<unknown>();
  const onSocket = (s: unknown) => sockets.add(s);
  for (let i = 0; i < warmUp; i++) await httpsGet(t, "/", agent, onSocket); // warm-up, not counted
  const ms: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await httpsGet(t, "/", agent, onSocket);
    ms.push(performance.now() - t0);
  }
  agent.destroy();
  process.stdout.write(`${JSON.stringify({ ms, sockets: sockets.size })}\n`);
}

async function httpsConnects(t: HttpsTarget, n: number): Promise<void> {
  // agent false: a new agent per request, so a new connection and no TLS session to resume.
  for (let i = 0; i < 20; i++) await httpsGet(t, "/", false); // warm-up, not counted
  const ms: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await httpsGet(t, "/", false);
    ms.push(performance.now() - t0);
  }
  process.stdout.write(`${JSON.stringify({ ms })}\n`);
}

/**
 * One `GET path` on a new TLS connection, Connection: close, read into SINK like httpGet (tls.connect takes
 * onread too): Node's https client allocates a buffer per read, which made the client, not the path under
 * test, the limit (~130 MB/s). Resolves with the bytes read (head + body).
 */
function tlsGet(t: HttpsTarget, path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    let bytes = 0;
    let head = "";
    const onread: OnReadOpts = {
      buffer: SINK,
      callback: (n, buf) => {
        if (bytes === 0) head = Buffer.from(buf.buffer, buf.byteOffset, Math.min(n, 16)).toString("latin1");
        bytes += n;
        return true;
      },
    };
    // @types/node lacks tls.connect's onread (Node ≥ 15).
    const opts: ConnectionOptions & { onread: OnReadOpts } = {
      host: t.host,
      port: t.port,
      servername: t.name,
      ca: t.ca,
      onread,
    };
    const s = tlsConnect(opts);
    s.setNoDelay(true);
    s.on("secureConnect", () =>
      s.write(`GET ${path} HTTP/1.1\r\nHost: ${t.name}\r\nConnection: close\r\n\r\n`),
    );
    s.on("error", reject);
    s.on("end", () => {
      if (!head.startsWith("HTTP/1.1 200")) reject(new Error(`${t.name}${path}: ${JSON.stringify(head)}`));
      else resolve(bytes);
    });
  });
}

async function httpsDownload(t: HttpsTarget, path: string): Promise<void> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const bytes = await tlsGet(t, path);
  const ms = performance.now() - t0;
  const c = process.cpuUsage(c0);
  process.stdout.write(`${JSON.stringify({ ms, bytes, cpu: (c.user + c.system) / 1000 })}\n`);
}

async function httpsConcurrent(t: HttpsTarget, c: number, k: number, path: string): Promise<void> {
  let bytes = 0;
  let errors = 0;
  let firstError: string | undefined;
  const sockets = new Set<unknown>();
  const onSocket = (s: unknown) => sockets.add(s);
  const worker = async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    for (let i = 0; i < k; i++) {
      try {
        const got = await httpsGet(t, path, agent, onSocket);
        bytes += got;
      } catch (e) {
        errors++;
        firstError ??= e instanceof Error ? e.message : String(e);
      }
    }
    agent.destroy();
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: c }, worker));
  const ms = performance.now() - t0;
  process.stdout.write(`${JSON.stringify({ ms, bytes, errors, sockets: sockets.size, firstError })}\n`);
}

/**
 * The HTTPS twin of serve: keep-alive, `GET /` and `GET /bytes/<n>` (from one reused buffer). Prints `ready`.
 */
function serveHttps(ip: string, port: number, certFile: string, keyFile: string): void {
  const chunk = Buffer.alloc(1024 * 1024, 0x5a);
  const srv = createHttpsServer(
    { cert: readFileSync(certFile), key: readFileSync(keyFile), noDelay: true, keepAliveTimeout: 60_000 },
    (req: IncomingMessage, res: ServerResponse) => {
      req.resume();
      const m = /^\/bytes\/(\d+)$/.exec(req.url ?? "");
      if (req.url === "/") {
        res.writeHead(200, { "content-type": "text/plain", "content-length": 6 }).end("hello\n");
        return;
      }
      if (!m) {
        res.writeHead(404, { "content-length": 0 }).end();
        return;
      }
      let left = Number(m[1]);
      res.writeHead(200, { "content-type": "application/octet-stream", "content-length": left });
      const more = () => {
        while (left > 0) {
          const piece = left >= chunk.length ? chunk : chunk.subarray(0, left);
          left -= piece.length;
          if (!res.write(piece)) return void res.once("drain", more);
        }
        res.end();
      };
      res.on("error", () => {});
      more();
    },
  );
  srv.on("tlsClientError", (_e, s) => s.destroy());
  srv.listen({ host: ip, port }, () => process.stdout.write("ready\n"));
  process.stdin.on("end", () => process.exit(0));
  process.stdin.resume();
}

const [mode, a, b, c, d, e, f] = process.argv.slice(2);
if (mode === "download" && a && b) await download(a, b);
else if (mode === "connect" && a && b) await connects(a, Number(b));
else if (mode === "dns" && a && b && c) await dns(a, Number(b), c);
else if (mode === "serve" && a && b && c) serve(a, Number(b), Number(c));
else if (mode === "https-keepalive" && a && b && c && d)
  await httpsKeepAlive(httpsTarget(a, b, c), Number(d), Number(e ?? 500));
else if (mode === "https-connect" && a && b && c && d) await httpsConnects(httpsTarget(a, b, c), Number(d));
else if (mode === "https-download" && a && b && c && d) await httpsDownload(httpsTarget(a, b, c), d);
else if (mode === "https-concurrent" && a && b && c && d && e && f)
  await httpsConcurrent(httpsTarget(a, b, c), Number(d), Number(e), f);
else if (mode === "serve-https" && a && b && c && d) serveHttps(a, Number(b), c, d);
else
  throw new Error("usage: net-client.ts download|connect|dns|serve|https-…|serve-https … (see the header)");
