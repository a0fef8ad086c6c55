import { createHash } from "node:crypto";
import { createSocket } from "node:dgram";
import { readFileSync } from "node:fs";
import {
  createServer as createHttpServer,
  type IncomingMessage,
  type OutgoingHttpHeaders,
  type ServerResponse,
} from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { createServer as createTcpServer, type Server } from "node:net";
import { type Duplex, Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { setTimeout as sleep } from "node:timers/promises";
import type { TLSSocket } from "node:tls";
import {
  type Answer,
  AUTHORITATIVE_ANSWER,
  CHECKING_DISABLED,
  type DecodedPacket,
  decode,
  encode,
  RECURSION_AVAILABLE,
  RECURSION_DESIRED,
} from "dns-packet";
import { FAKE, FAKE_API_KEY, FAKE_PORTS, fakeBytes, type Hit } from "./netns.ts";

/**
 * The fake internet's servers, one process per namespace (started by test/helpers/netns.ts):
 *
 *   ip netns exec <netNs>  node test/helpers/fake-internet.ts net <cert> <key>   HTTP, HTTPS, echo, UDP echo, DNS
 *   ip netns exec <hostNs> node test/helpers/fake-internet.ts host               the "host service" on :2223
 *
 * (the servers, routes and zone: the header of netns.ts). <cert> and <key> are the PEM files the HTTPS
 * servers present (netns.ts makePki).
 *
 * Prints one JSON Hit per line on stdout, and `ready` once every server listens. Exits when stdin closes,
 * so it never outlives the test process that started it.
 */

const MAX_BYTES = 256 * 1024 * 1024;
const CHUNK = 64 * 1024;
const MAX_SSE_EVENTS = 1000;
const MAX_SSE_GAP_MS = 10_000;

function hit(h: Hit): void {
  process.stdout.write(`${JSON.stringify(h)}\n`);
}

/** A peer address without the v4-mapped prefix. */
function addr(a: string | undefined): string {
  return (a ?? "").replace(/^::ffff:/, "");
}

// ---- DNS -----------------------------------------------------------------------------------------------

/**
 * example.test, www.example.test, api.example.test → web; other.test → other; rebind.test → private;
 * alias.test CNAME example.test; attacker.test and every name under it (e.g. <secret>.attacker.test) → other.
 */
const ZONE_A: Record<string, string> = {
  "example.test": FAKE.web,
  "www.example.test": FAKE.web,
  "api.example.test": FAKE.web,
  "other.test": FAKE.other,
  "rebind.test": FAKE.private,
};
const WILDCARD_A: Array<[suffix: string, address: string]> = [["attacker.test", FAKE.other]];

function zoneA(name: string): string | undefined {
  if (Object.hasOwn(ZONE_A, name)) return ZONE_A[name];
  return WILDCARD_A.find(([suffix]) => name === suffix || name.endsWith(`.${suffix}`))?.[1];
}
const ZONE_CNAME: Record<string, string> = { "alias.test": "example.test" };
const SOA: Answer = {
  type: "SOA",
  name: "test",
  ttl: 60,
  data: {
    mname: "ns.test",
    rname: "hostmaster.test",
    serial: 1,
    refresh: 60,
    retry: 60,
    expire: 60,
    minimum: 60,
  },
};
const RCODE = { FORMERR: 1, NXDOMAIN: 3 } as const;

/** The answer to one DNS message, or null when it is not a query worth answering. */
function answerDns(msg: Buffer, server: string): Buffer | null {
  let q: DecodedPacket;
  try {
    q = decode(msg);
  } catch {
    return null;
  }
  if (q.flag_qr) return null;
  const flags = (q.flags ?? 0) & (0x7800 | RECURSION_DESIRED | CHECKING_DISABLED); // opcode, RD, CD
  const base = { type: "response" as const, id: q.id ?? 0, questions: q.questions ?? [] };
  const question = q.questions?.[0];
  if (!question) return encode({ ...base, flags: flags | RCODE.FORMERR });
  const name = question.name.toLowerCase().replace(/\.$/, "");
  hit({ kind: "dns", server, name, type: question.type });

  const answers: Answer[] = [];
  const cname = Object.hasOwn(ZONE_CNAME, name) ? ZONE_CNAME[name] : undefined;
  if (cname !== undefined) answers.push({ type: "CNAME", name: question.name, ttl: 60, data: cname });
  const target = cname ?? name;
  const a = zoneA(target);
  if (question.type === "A" && a !== undefined) answers.push({ type: "A", name: target, ttl: 60, data: a });
  const exists = cname !== undefined || a !== undefined;
  return encode({
    ...base,
    flags: flags | AUTHORITATIVE_ANSWER | RECURSION_AVAILABLE | (exists ? 0 : RCODE.NXDOMAIN),
    answers,
    authorities: answers.length === 0 ? [SOA] : [],
  });
}

function dnsUdp(server: string): Promise<void> {
  const sock = createSocket("udp4");
  sock.on("message", (msg, rinfo) => {
    const reply = answerDns(msg, server);
    if (reply) sock.send(reply, rinfo.port, rinfo.address);
  });
  return bindUdp(sock, server, FAKE_PORTS.dns);
}

function dnsTcp(server: string): Promise<void> {
  const srv = createTcpServer((s) => {
    let buf = Buffer.alloc(0);
    s.on("error", () => s.destroy());
    s.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 2) {
        const n = buf.readUInt16BE(0);
        if (buf.length < 2 + n) break;
        const reply = answerDns(buf.subarray(2, 2 + n), server);
        buf = buf.subarray(2 + n);
        if (!reply) {
          s.destroy();
          return;
        }
        const len = Buffer.alloc(2);
        len.writeUInt16BE(reply.length);
        s.write(Buffer.concat([len, reply]));
      }
    });
  });
  return listenTcp(srv, server, FAKE_PORTS.dns);
}

// ---- HTTP ----------------------------------------------------------------------------------------------

function* byteChunks(n: number, sent: { bytes: number }): Generator<Buffer> {
  for (let off = 0; off < n; off += CHUNK) {
    const chunk = fakeBytes(Math.min(CHUNK, n - off), off);
    sent.bytes += chunk.length;
    yield chunk;
  }
}

/** The request headers as received: names lower-cased, a repeated header's values joined with ", ". */
function receivedHeaders(req: IncomingMessage): Record<string, string> {
  const out: Record<string, string> = Object.create(null);
  const raw = req.rawHeaders;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = (raw[i] ?? "").toLowerCase();
    const value = raw[i + 1] ?? "";
    const seen = out[name];
    out[name] = seen === undefined ? value : `${seen}, ${value}`;
  }
  return out;
}

/** A query parameter as a whole number ≤ max; `dflt` when absent or not a number. */
function intParam(url: URL | null, name: string, dflt: number, max: number): number {
  const v = url?.searchParams.get(name) ?? null;
  return v !== null && /^\d{1,9}$/.test(v) ? Math.min(Number(v), max) : dflt;
}

/**
 * The routes of FAKE.web and FAKE.other, over HTTP and HTTPS (listed in the header of netns.ts). Memory
 * stays bounded whatever the client sends: bodies are streamed, hashed or counted, never kept.
 */
async function web(server: string, req: IncomingMessage, res: ServerResponse, log: { bytes: number }) {
  const target = req.url ?? "/";
  const url = URL.parse(target, "http://fake.invalid"); // origin-form, or absolute-form from a proxy
  const path = url?.pathname ?? "";
  const method = req.method ?? "";
  const countUp = method === "POST";
  const bytes = /^\/bytes\/(\d+)$/.exec(path);
  const reply = (status: number, type: string, body: string, headers: OutgoingHttpHeaders = {}) => {
    if (!countUp) log.bytes += Buffer.byteLength(body);
    res.writeHead(status, { "content-type": type, ...headers }).end(body);
  };

  if (method === "POST" && path === "/sha256") {
    const hash = createHash("sha256");
    for await (const chunk of req) {
      hash.update(chunk as Buffer);
      log.bytes += (chunk as Buffer).length;
    }
    res.writeHead(200, { "content-type": "text/plain" }).end(`${hash.digest("hex")} ${log.bytes}\n`);
    return;
  }
  // Every other route ignores the body: count it (POST) and drop it.
  for await (const chunk of req) if (countUp) log.bytes += (chunk as Buffer).length;

  if (method === "GET" && path === "/") {
    reply(200, "text/plain", `hello from ${server}\n`);
  } else if (method === "GET" && bytes?.[1] !== undefined && Number(bytes[1]) <= MAX_BYTES) {
    const n = Number(bytes[1]);
    res.writeHead(200, { "content-type": "application/octet-stream", "content-length": n });
    await pipeline(Readable.from(byteChunks(n, log)), res);
  } else if (method === "GET" && path === "/headers") {
    const headers = receivedHeaders(req);
    const auth = headers.authorization;
    reply(
      200,
      "application/json",
      `${JSON.stringify(headers)}\n`,
      auth === undefined ? {} : { "x-echo-authorization": auth },
    );
  } else if ((method === "GET" || method === "POST") && path === "/model") {
    if (receivedHeaders(req).authorization === `Bearer ${FAKE_API_KEY}`)
      reply(200, "application/json", `${JSON.stringify({ ok: true, model: "fake" })}\n`);
    else reply(401, "application/json", `${JSON.stringify({ error: "bad key" })}\n`);
  } else if (method === "GET" && path === "/sse") {
    const n = intParam(url, "n", 5, MAX_SSE_EVENTS);
    const gapMs = intParam(url, "gapMs", 200, MAX_SSE_GAP_MS);
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store" });
    res.flushHeaders();
    for (let i = 0; i < n; i++) {
      await sleep(gapMs);
      if (res.destroyed) return;
      const event = `data: event ${i}\n\n`;
      log.bytes += event.length;
      res.write(event); // one chunk, sent at once (no Nagle: the server sets noDelay)
    }
    res.end();
  } else if (method === "GET" && path === "/query") {
    const q = target.indexOf("?");
    reply(200, "application/json", `${JSON.stringify({ query: q < 0 ? "" : target.slice(q + 1) })}\n`);
  } else {
    reply(404, "text/plain", "not found\n");
  }
}

type Handler = typeof web;

/** Serves one request with `handle`, and logs it as an http hit when the exchange ends. */
function logged(server: string, scheme: "http" | "https", handle: Handler) {
  return (req: IncomingMessage, res: ServerResponse) => {
    const log = { bytes: 0 };
    const headers = receivedHeaders(req);
    const sni = scheme === "https" ? serverName(req.socket as TLSSocket) : undefined;
    res.on("close", () =>
      hit({
        kind: "http",
        server,
        method: req.method ?? "",
        path: req.url ?? "",
        bytes: log.bytes,
        scheme,
        host: headers.host ?? "",
        ...(sni === undefined ? {} : { sni }),
        headers,
      }),
    );
    handle(server, req, res, log).catch(() => res.destroy());
  };
}

/** The SNI a TLS client sent, if any. */
function serverName(s: TLSSocket): string | undefined {
  const name: unknown = s.servername;
  return typeof name === "string" && name !== "" ? name : undefined;
}

/**
 * `Upgrade: echo` on any path (both schemes): 101, then every byte is echoed back (a stand-in for a
 * WebSocket); logged as an http hit with method UPGRADE. Other upgrades are refused.
 */
function echoUpgrade(server: string, scheme: "http" | "https") {
  return (req: IncomingMessage, sock: Duplex, head: Buffer) => {
    hit({
      kind: "http",
      server,
      scheme,
      method: "UPGRADE",
      path: req.url ?? "",
      bytes: 0,
      host: req.headers.host ?? "",
      headers: Object.fromEntries(Object.entries(req.headers).map(([k, v]) => [k, String(v)])),
    });
    sock.on("error", () => sock.destroy());
    if ((req.headers.upgrade ?? "").toLowerCase() !== "echo") {
      sock.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
      return;
    }
    sock.write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n");
    if (head.length > 0) sock.write(head);
    sock.pipe(sock);
  };
}

function httpServer(server: string, handle: Handler): Promise<void> {
  const srv = createHttpServer(logged(server, "http", handle));
  if (handle === web) srv.on("upgrade", echoUpgrade(server, "http"));
  return listenTcp(srv, server, FAKE_PORTS.http);
}

/** HTTPS on :443 with the topology's server certificate; a tls hit for every handshake, done or failed. */
function httpsServer(server: string, tls: { cert: Buffer; key: Buffer }): Promise<void> {
  const srv = createHttpsServer(tls, logged(server, "https", web));
  srv.on("upgrade", echoUpgrade(server, "https"));
  srv.on("secureConnection", (s: TLSSocket) => {
    const sni = serverName(s);
    hit({ kind: "tls", server, ...(sni === undefined ? {} : { sni }) });
  });
  srv.on("tlsClientError", (err: NodeJS.ErrnoException, s: TLSSocket) => {
    const sni = serverName(s);
    hit({ kind: "tls", server, ...(sni === undefined ? {} : { sni }), error: err.code ?? err.message });
    s.destroy();
  });
  return listenTcp(srv, server, FAKE_PORTS.https);
}

async function privateWeb(
  _server: string,
  req: IncomingMessage,
  res: ServerResponse,
  log: { bytes: number },
) {
  req.resume();
  log.bytes = "private\n".length;
  res.writeHead(200, { "content-type": "text/plain" }).end("private\n");
}

// ---- echo ----------------------------------------------------------------------------------------------

/** Echoes every byte; after the client's FIN, finishes echoing, then ends (half-close). */
function tcpEcho(server: string): Promise<void> {
  const srv = createTcpServer({ allowHalfOpen: true }, (s) => {
    hit({ kind: "tcp-echo", server, peer: addr(s.remoteAddress) });
    s.on("error", () => s.destroy());
    s.pipe(s);
  });
  return listenTcp(srv, server, FAKE_PORTS.echo);
}

function udpEcho(server: string): Promise<void> {
  const sock = createSocket("udp4");
  sock.on("message", (msg, rinfo) => {
    hit({ kind: "udp", server, peer: rinfo.address });
    sock.send(msg, rinfo.port, rinfo.address);
  });
  return bindUdp(sock, server, FAKE_PORTS.udpEcho);
}

// ---- host service --------------------------------------------------------------------------------------

/** A service on the user's machine that a VM must never reach: every address, v4 (and v6 when present). */
async function hostService(): Promise<void> {
  const serve = () =>
    createTcpServer((s) => {
      hit({ kind: "host-service", peer: addr(s.remoteAddress) });
      s.on("error", () => s.destroy());
      s.end("host-service\n");
    });
  await listenTcp(serve(), "0.0.0.0", FAKE_PORTS.hostService);
  await listenTcp(serve(), "::", FAKE_PORTS.hostService, true).catch(() => {}); // no IPv6 in the namespace
}

// ---- plumbing ------------------------------------------------------------------------------------------

function listenTcp(srv: Server, host: string, port: number, ipv6Only = false): Promise<void> {
  return new Promise((resolve, reject) => {
    srv.once("error", reject);
    srv.listen({ host, port, ipv6Only }, () => resolve());
  });
}

function bindUdp(sock: ReturnType<typeof createSocket>, address: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    sock.once("error", reject);
    sock.bind({ address, port }, () => resolve());
  });
}

async function main([role, certFile, keyFile]: Array<string | undefined>): Promise<void> {
  if (role === "net" && certFile !== undefined && keyFile !== undefined) {
    const tls = { cert: readFileSync(certFile), key: readFileSync(keyFile) };
    await Promise.all([
      httpServer(FAKE.web, web),
      httpServer(FAKE.other, web),
      httpsServer(FAKE.web, tls),
      httpsServer(FAKE.other, tls),
      httpServer(FAKE.private, privateWeb),
      tcpEcho(FAKE.web),
      udpEcho(FAKE.web),
      ...[FAKE.resolver, FAKE.resolver2].flatMap((r) => [dnsUdp(r), dnsTcp(r)]),
    ]);
  } else if (role === "host") {
    await hostService();
  } else {
    throw new Error("usage: fake-internet.ts net <cert.pem> <key.pem> | host");
  }
  process.stdin.on("end", () => process.exit(0));
  process.stdin.on("error", () => process.exit(0));
  process.stdin.resume();
  process.stdout.write("ready\n");
}

main(process.argv.slice(2)).catch((e: unknown) => {
  process.stderr.write(`${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(1);
});
