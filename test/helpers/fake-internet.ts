import { createHash } from "node:crypto";
import { createSocket } from "node:dgram";
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from "node:http";
import { createServer as createTcpServer, type Server } from "node:net";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
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
import { FAKE, FAKE_PORTS, fakeBytes, type Hit } from "./netns.ts";

/**
 * The fake internet's servers, one process per namespace (started by test/helpers/netns.ts):
 *
 *   ip netns exec <netNs>  node test/helpers/fake-internet.ts net    HTTP, echo, UDP echo, DNS
 *   ip netns exec <hostNs> node test/helpers/fake-internet.ts host   the "host service" on 0.0.0.0:2223
 *
 * Prints one JSON Hit per line on stdout, and `ready` once every server listens. Exits when stdin closes,
 * so it never outlives the test process that started it.
 */

const MAX_BYTES = 256 * 1024 * 1024;
const CHUNK = 64 * 1024;

function hit(h: Hit): void {
  process.stdout.write(`${JSON.stringify(h)}\n`);
}

/** A peer address without the v4-mapped prefix. */
function addr(a: string | undefined): string {
  return (a ?? "").replace(/^::ffff:/, "");
}

// ---- DNS -----------------------------------------------------------------------------------------------

/** example.test, www.example.test → web; other.test → other; rebind.test → private; alias.test CNAME example.test. */
const ZONE_A: Record<string, string> = {
  "example.test": FAKE.web,
  "www.example.test": FAKE.web,
  "other.test": FAKE.other,
  "rebind.test": FAKE.private,
};
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
  const cname = ZONE_CNAME[name];
  if (cname !== undefined) answers.push({ type: "CNAME", name: question.name, ttl: 60, data: cname });
  const target = cname ?? name;
  const a = ZONE_A[target];
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

/** `GET /` hello; `GET /bytes/<n>` fakeBytes(n); `POST /sha256` "<hex sha256> <bytes>\n" of the body. */
async function web(server: string, req: IncomingMessage, res: ServerResponse, log: { bytes: number }) {
  const path = req.url ?? "/";
  const bytes = /^\/bytes\/(\d+)$/.exec(path);
  if (req.method === "GET" && path === "/") {
    const body = `hello from ${server}\n`;
    log.bytes = body.length;
    res.writeHead(200, { "content-type": "text/plain" }).end(body);
  } else if (req.method === "GET" && bytes?.[1] !== undefined && Number(bytes[1]) <= MAX_BYTES) {
    const n = Number(bytes[1]);
    res.writeHead(200, { "content-type": "application/octet-stream", "content-length": n });
    await pipeline(Readable.from(byteChunks(n, log)), res);
  } else if (req.method === "POST" && path === "/sha256") {
    const hash = createHash("sha256");
    for await (const chunk of req) {
      hash.update(chunk as Buffer);
      log.bytes += (chunk as Buffer).length;
    }
    res.writeHead(200, { "content-type": "text/plain" }).end(`${hash.digest("hex")} ${log.bytes}\n`);
  } else {
    req.resume();
    res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
  }
}

function httpServer(server: string, handle: typeof web): Promise<void> {
  const srv = createHttpServer((req, res) => {
    const log = { bytes: 0 };
    res.on("close", () =>
      hit({ kind: "http", server, method: req.method ?? "", path: req.url ?? "", bytes: log.bytes }),
    );
    handle(server, req, res, log).catch(() => res.destroy());
  });
  return listenTcp(srv, server, FAKE_PORTS.http);
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

async function main(role: string | undefined): Promise<void> {
  if (role === "net") {
    await Promise.all([
      httpServer(FAKE.web, web),
      httpServer(FAKE.other, web),
      httpServer(FAKE.private, privateWeb),
      tcpEcho(FAKE.web),
      udpEcho(FAKE.web),
      ...[FAKE.resolver, FAKE.resolver2].flatMap((r) => [dnsUdp(r), dnsTcp(r)]),
    ]);
  } else if (role === "host") {
    await hostService();
  } else {
    throw new Error("usage: fake-internet.ts net|host");
  }
  process.stdin.on("end", () => process.exit(0));
  process.stdin.on("error", () => process.exit(0));
  process.stdin.resume();
  process.stdout.write("ready\n");
}

main(process.argv[2]).catch((e: unknown) => {
  process.stderr.write(`${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(1);
});
