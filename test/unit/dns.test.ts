import assert from "node:assert/strict";
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { connect, createServer, type Server, type Socket } from "node:net";
import { afterEach, describe, mock, test } from "node:test";
import {
  type Answer,
  type DecodedPacket,
  decode,
  encode,
  type Packet,
  RECURSION_DESIRED,
  type RecordType,
  streamEncode,
  TRUNCATED_RESPONSE,
} from "dns-packet";
import fc from "fast-check";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import {
  DnsLookupError,
  DnsServer,
  type DnsServerOptions,
  upstreamsFromResolvConf,
} from "../../src/net/dns.ts";
import { runs } from "../helpers/property.ts";

/**
 * The gateway DNS server against a fake upstream resolver, both on 127.0.0.1: nothing here leaves
 * loopback. The fake logs every query it receives, so "never forwarded" is checked on its log.
 */

const RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 };
const rcodeOf = (p: DecodedPacket) => (p.flags ?? 0) & 0xf;

interface UpstreamReply {
  rcode?: number;
  answers?: Answer[];
  /** Set TC and send no answers (over UDP only: TCP always gets the whole reply). */
  truncateUdp?: boolean;
}

/** Answers by name; a name it does not know gets NXDOMAIN; `silent` drops everything. */
type Zone = (name: string, type: string, transport: "udp" | "tcp") => UpstreamReply | "silent";

class FakeUpstream {
  readonly log: { name: string; type: string; transport: "udp" | "tcp"; id: number }[] = [];
  private readonly udp: UdpSocket;
  private readonly tcp: Server;
  private readonly conns = new Set<Socket>();

  private constructor(udp: UdpSocket, tcp: Server, zone: Zone) {
    this.udp = udp;
    this.tcp = tcp;
    udp.on("message", (msg, from) => {
      const reply = this.handle(msg, "udp", zone);
      if (reply) udp.send(encode(reply), from.port, from.address);
    });
    tcp.on("connection", (sock) => {
      this.conns.add(sock);
      sock.on("close", () => this.conns.delete(sock));
      sock.on("error", () => {});
      let buf = Buffer.alloc(0);
      sock.on("data", (chunk: Buffer) => {
        buf = Buffer.concat([buf, chunk]);
        while (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
          const msg = buf.subarray(2, 2 + buf.readUInt16BE(0));
          buf = buf.subarray(2 + msg.length);
          const reply = this.handle(msg, "tcp", zone);
          if (reply) sock.write(streamEncode(reply));
        }
      });
    });
  }

  /** UDP and TCP on the same loopback port, as a real resolver. */
  static async start(zone: Zone): Promise<FakeUpstream> {
    for (;;) {
      const udp = createSocket("udp4");
      await new Promise<void>((r) => udp.bind(0, "127.0.0.1", r));
      const tcp = createServer();
      const ok = await new Promise<boolean>((r) => {
        tcp.once("error", () => r(false));
        tcp.listen(udp.address().port, "127.0.0.1", () => r(true));
      });
      if (ok) return new FakeUpstream(udp, tcp, zone);
      udp.close(); // that TCP port was taken: try another pair
    }
  }

  get address(): string {
    return `127.0.0.1:${this.udp.address().port}`;
  }

  private handle(msg: Buffer, transport: "udp" | "tcp", zone: Zone): Packet | undefined {
    const q = decode(msg);
    const question = q.questions?.[0];
    if (!question) return undefined;
    this.log.push({ name: question.name, type: question.type, transport, id: q.id ?? 0 });
    const r = zone(question.name, question.type, transport);
    if (r === "silent") return undefined;
    const tc = r.truncateUdp === true && transport === "udp";
    return {
      type: "response",
      id: q.id ?? 0,
      flags: (tc ? TRUNCATED_RESPONSE : 0) | (r.rcode ?? RCODE.NOERROR),
      questions: [question],
      answers: tc ? [] : (r.answers ?? []),
    };
  }

  async close(): Promise<void> {
    for (const s of this.conns) s.destroy();
    await Promise.all([
      new Promise<void>((r) => this.udp.close(() => r())),
      new Promise<void>((r) => this.tcp.close(() => r())),
    ]);
  }
}

const a = (name: string, ip: string, ttl = 300): Answer => ({ name, type: "A", class: "IN", ttl, data: ip });
const cname = (name: string, target: string, ttl = 300): Answer => ({
  name,
  type: "CNAME",
  class: "IN",
  ttl,
  data: target,
});

/** The fake internet: public names on TEST-NET, one name that points into 10/8. */
const zone: Zone = (name) => {
  switch (name) {
    case "example.test":
      return { answers: [a("example.test", "203.0.113.10", 120)] };
    case "rebind.test":
      return { answers: [a("rebind.test", "203.0.113.11"), a("rebind.test", "10.0.0.5")] };
    case "www.cdn.test":
      return {
        answers: [
          cname("www.cdn.test", "edge.cdn.test"),
          cname("edge.cdn.test", "node.cdn.test"),
          a("node.cdn.test", "203.0.113.7", 90),
          a("unrelated.test", "203.0.113.9"), // not on the chain from the name asked: never pinned
        ],
      };
    case "big.test":
      return { answers: Array.from({ length: 60 }, (_, i) => a("big.test", `198.51.100.${i + 1}`)) };
    case "tc.test":
      return { truncateUdp: true, answers: [a("tc.test", "198.51.100.200")] };
    default:
      return { rcode: RCODE.NXDOMAIN };
  }
};

const silent: Zone = () => "silent";

const floor = (ip: string) => (ip.startsWith("10.") || ip.startsWith("127.") ? "private" : undefined);

// --- guest side -----------------------------------------------------------------------------

function query(name: string, type: RecordType = "A", id = 0x1234, edns?: number): Packet {
  return {
    type: "query",
    id,
    flags: RECURSION_DESIRED,
    questions: [{ name, type, class: "IN" }],
    additionals:
      edns === undefined
        ? []
        : [
            {
              name: ".",
              type: "OPT",
              udpPayloadSize: edns,
              extendedRcode: 0,
              ednsVersion: 0,
              flags: 0,
              flag_do: false,
              options: [],
            },
          ],
  };
}

/**
 * Sends raw bytes over UDP and collects the datagrams that come back within `waitMs`, or until
 * `expect` have come, or until the reply to `then` (sent right after `bytes`) has come.
 */
async function udpExchange(
  port: number,
  bytes: Buffer,
  waitMs: number,
  expect = 1,
  then?: Buffer,
): Promise<Buffer[]> {
  const sock = createSocket("udp4");
  const got: Buffer[] = [];
  await new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, waitMs);
    sock.on("message", (m) => {
      got.push(m);
      const last = then !== undefined && m.readUInt16BE(0) === then.readUInt16BE(0);
      if (last || (then === undefined && got.length >= expect)) {
        clearTimeout(timer);
        resolve();
      }
    });
    sock.send(bytes, port, "127.0.0.1");
    if (then) sock.send(then, port, "127.0.0.1");
  });
  sock.close();
  return got;
}

async function askUdp(server: DnsServer, p: Packet, waitMs = 3000): Promise<DecodedPacket> {
  const [reply] = await udpExchange(server.udpPort, encode(p), waitMs);
  assert.ok(reply, "no reply over UDP");
  return decode(reply);
}

/** One TCP connection, the packets written back to back, `expect` replies read (or close). */
async function askTcp(
  port: number,
  frames: Buffer[],
  expect: number,
): Promise<{ replies: DecodedPacket[]; closed: boolean }> {
  const sock = connect(port, "127.0.0.1");
  const replies: DecodedPacket[] = [];
  let buf = Buffer.alloc(0);
  const closed = await new Promise<boolean>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`only ${replies.length} TCP replies`)), 3000);
    sock.on("error", () => {});
    sock.on("close", () => {
      clearTimeout(timer);
      resolve(true);
    });
    sock.on("data", (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
        replies.push(decode(buf.subarray(2, 2 + buf.readUInt16BE(0))));
        buf = buf.subarray(2 + buf.readUInt16BE(0));
      }
      if (replies.length >= expect) {
        clearTimeout(timer);
        resolve(false);
      }
    });
    sock.write(Buffer.concat(frames));
  });
  sock.destroy();
  return { replies, closed };
}

const addresses = (p: DecodedPacket) => (p.answers ?? []).flatMap((r) => (r.type === "A" ? [r.data] : []));

// --- fixtures -------------------------------------------------------------------------------

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  mock.timers.reset();
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function setup(
  zones: Zone[] = [zone],
  opts: Partial<DnsServerOptions> = {},
): Promise<{ server: DnsServer; ups: FakeUpstream[]; blocked: { name: string; reason: string }[] }> {
  const ups: FakeUpstream[] = [];
  for (const z of zones) {
    const up = await FakeUpstream.start(z);
    cleanups.push(() => up.close());
    ups.push(up);
  }
  const blocked: { name: string; reason: string }[] = [];
  const server = await DnsServer.listen({
    address: "127.0.0.1",
    localHosts: new Map([["db.internal", ["10.1.2.3", "10.1.2.4"]]]),
    upstreams: ups.map((u) => u.address),
    refuses: floor,
    onBlocked: (e) => blocked.push(e),
    timeoutMs: 200,
    ...opts,
  });
  cleanups.push(() => server.close());
  return { server, ups, blocked };
}

// --- tests ----------------------------------------------------------------------------------

describe("dns: forwarding", () => {
  test("an A query is forwarded under a fresh id and answered with the guest's id and question as asked", async () => {
    const { server, ups } = await setup();
    const reply = await askUdp(server, query("Example.TEST", "A", 0xbeef));
    assert.equal(reply.id, 0xbeef);
    assert.equal(reply.flag_qr, true);
    assert.equal(rcodeOf(reply), RCODE.NOERROR);
    assert.deepEqual(reply.questions, [{ name: "Example.TEST", type: "A", class: "IN" }]);
    assert.deepEqual(addresses(reply), ["203.0.113.10"]);
    assert.equal(reply.flag_rd, true);
    assert.equal(reply.flag_ra, true);
    // The upstream saw the normalised name.
    assert.deepEqual(
      ups[0]?.log.map((l) => [l.name, l.type, l.transport]),
      [["example.test", "A", "udp"]],
    );
  });

  test("a second query is answered from the cache: the upstream is asked once", async () => {
    const { server, ups } = await setup();
    const first = await askUdp(server, query("example.test"));
    const second = await askUdp(server, query("EXAMPLE.test.", "A", 7));
    assert.deepEqual(addresses(second), addresses(first));
    assert.equal(second.id, 7);
    assert.equal(ups[0]?.log.length, 1);
  });

  test("concurrent guests asking one name share one upstream query", async () => {
    const { server, ups } = await setup();
    const replies = await Promise.all(
      [1, 2, 3, 4, 5].map((id) => askUdp(server, query("example.test", "A", id))),
    );
    assert.deepEqual(
      replies.map((r) => r.id),
      [1, 2, 3, 4, 5],
    );
    assert.equal(ups[0]?.log.length, 1);
  });

  test("NXDOMAIN from the upstream is passed on and cached", async () => {
    const { server, ups } = await setup();
    assert.equal(rcodeOf(await askUdp(server, query("nope.test"))), RCODE.NXDOMAIN);
    assert.equal(rcodeOf(await askUdp(server, query("nope.test"))), RCODE.NXDOMAIN);
    assert.equal(ups[0]?.log.length, 1);
  });

  test("a cached answer expires with its TTL, then the upstream is asked again", async () => {
    const { server, ups } = await setup();
    await askUdp(server, query("example.test"));
    mock.timers.enable({ apis: ["Date"], now: Date.now() });
    mock.timers.tick(60_000);
    const aged = await askUdp(server, query("example.test"));
    const ttl = aged.answers?.[0]?.type === "A" ? aged.answers[0].ttl : undefined;
    assert.equal(ttl, 60, "the TTL counts down while cached");
    assert.equal(ups[0]?.log.length, 1);
    mock.timers.tick(61_000);
    await askUdp(server, query("example.test"));
    assert.equal(ups[0]?.log.length, 2);
  });

  test("a type dns-packet has no name for (HTTPS, 65) is forwarded and answered as asked", async () => {
    const { server, ups } = await setup();
    const reply = await askUdp(server, query("svc.test", "UNKNOWN_65" as RecordType, 65));
    assert.equal(reply.id, 65);
    assert.equal(rcodeOf(reply), RCODE.NXDOMAIN);
    assert.deepEqual(reply.questions, [{ name: "svc.test", type: "UNKNOWN_65", class: "IN" }]);
    assert.deepEqual(
      ups[0]?.log.map((l) => l.type),
      ["UNKNOWN_65"],
    );
  });

  test("a silent first upstream is skipped after its timeout; the second answers", async () => {
    const { server, ups } = await setup([silent, zone]);
    const reply = await askUdp(server, query("example.test"));
    assert.deepEqual(addresses(reply), ["203.0.113.10"]);
    assert.equal(ups[0]?.log.length, 1);
    assert.equal(ups[1]?.log.length, 1);
  });

  test("all upstreams silent: SERVFAIL, and it is not cached", async () => {
    const { server, ups } = await setup([silent, silent]);
    const reply = await askUdp(server, query("example.test", "A", 99));
    assert.equal(reply.id, 99);
    assert.equal(rcodeOf(reply), RCODE.SERVFAIL);
    await askUdp(server, query("example.test"));
    assert.equal(ups[0]?.log.length, 2);
    assert.equal(ups[1]?.log.length, 2);
  });

  test("an upstream reply with TC set is asked again over TCP", async () => {
    const { server, ups } = await setup();
    const reply = await askUdp(server, query("tc.test"));
    assert.equal(reply.flag_tc, false);
    assert.deepEqual(addresses(reply), ["198.51.100.200"]);
    assert.deepEqual(
      ups[0]?.log.map((l) => l.transport),
      ["udp", "tcp"],
    );
  });

  test("an answer larger than the guest's UDP size comes back TC with the question only", async () => {
    const { server } = await setup();
    const plain = await askUdp(server, query("big.test"));
    assert.equal(plain.flag_tc, true);
    assert.equal(plain.answers?.length, 0);
    assert.deepEqual(plain.questions, [{ name: "big.test", type: "A", class: "IN" }]);
    // With EDNS 4096 the same answer fits, and EDNS is answered with EDNS.
    const edns = await askUdp(server, query("big.test", "A", 5, 4096));
    assert.equal(edns.flag_tc, false);
    assert.equal(addresses(edns).length, 60);
    assert.ok(edns.additionals?.some((r) => r.type === "OPT"));
    // Over TCP it always fits.
    const { replies } = await askTcp(server.tcpPort, [streamEncode(query("big.test"))], 1);
    assert.equal(addresses(replies[0] as DecodedPacket).length, 60);
  });
});

describe("dns: answered here, never forwarded", () => {
  test("an --add-host name is answered locally; its AAAA and MX are NODATA", async () => {
    const { server, ups } = await setup();
    const reply = await askUdp(server, query("DB.internal"));
    assert.equal(rcodeOf(reply), RCODE.NOERROR);
    assert.deepEqual(addresses(reply), ["10.1.2.3", "10.1.2.4"], "the floor does not apply to --add-host");
    for (const type of ["AAAA", "MX"] as const) {
      const r = await askUdp(server, query("db.internal", type));
      assert.equal(rcodeOf(r), RCODE.NOERROR);
      assert.equal(r.answers?.length, 0);
    }
    assert.equal(ups[0]?.log.length, 0);
  });

  test("AAAA for any name is NODATA without asking upstream", async () => {
    const { server, ups } = await setup();
    const reply = await askUdp(server, query("example.test", "AAAA"));
    assert.equal(rcodeOf(reply), RCODE.NOERROR);
    assert.equal(reply.answers?.length, 0);
    assert.equal(ups[0]?.log.length, 0);
  });

  test("a name the allow-list refuses gets NXDOMAIN and the upstream never sees it", async () => {
    const { server, ups, blocked } = await setup([zone], { allowName: (n) => n !== "example.test" });
    const reply = await askUdp(server, query("Example.Test."));
    assert.equal(rcodeOf(reply), RCODE.NXDOMAIN);
    assert.equal(ups[0]?.log.length, 0);
    assert.deepEqual(blocked, [{ name: "example.test", reason: "not in allow-list" }]);
  });

  test("a query of class CH is refused, not forwarded", async () => {
    const { server, ups } = await setup();
    const p = query("version.bind", "TXT");
    p.questions = [{ name: "version.bind", type: "TXT", class: "CH" }];
    assert.equal(rcodeOf(await askUdp(server, p)), RCODE.REFUSED);
    assert.equal(ups[0]?.log.length, 0);
  });
});

describe("dns: rebinding floor", () => {
  test("an answer with a private address turns the whole reply into NXDOMAIN", async () => {
    const { server, blocked } = await setup();
    const reply = await askUdp(server, query("rebind.test"));
    assert.equal(rcodeOf(reply), RCODE.NXDOMAIN);
    assert.equal(reply.answers?.length, 0);
    assert.deepEqual(blocked, [{ name: "rebind.test", reason: "answer 10.0.0.5 is private" }]);
    assert.deepEqual(server.namesFor("203.0.113.11"), [], "nothing of a refused reply is pinned");
    // From the cache too: the floor is checked on every answer, not once.
    assert.equal(rcodeOf(await askUdp(server, query("rebind.test"))), RCODE.NXDOMAIN);
    assert.equal(blocked.length, 2);
  });

  test("a throwing onBlocked does not break the server", async () => {
    const { server } = await setup([zone], {
      onBlocked: () => {
        throw new Error("listener bug");
      },
    });
    assert.equal(rcodeOf(await askUdp(server, query("rebind.test"))), RCODE.NXDOMAIN);
    assert.equal(rcodeOf(await askUdp(server, query("example.test"))), RCODE.NOERROR);
  });
});

describe("dns: pins and resolve4", () => {
  test("namesFor follows the CNAME chain from the name asked, and nothing else", async () => {
    const { server } = await setup();
    const reply = await askUdp(server, query("www.cdn.test"));
    assert.equal(reply.answers?.length, 4);
    assert.deepEqual(server.namesFor("203.0.113.7"), ["www.cdn.test"]);
    assert.deepEqual(server.namesFor("203.0.113.9"), [], "off-chain address in the answer");
    assert.deepEqual(server.namesFor("198.51.100.1"), []);
  });

  test("a pin expires with the record's TTL", async () => {
    const { server } = await setup();
    mock.timers.enable({ apis: ["Date"], now: Date.now() });
    await askUdp(server, query("www.cdn.test"));
    mock.timers.tick(89_000);
    assert.deepEqual(server.namesFor("203.0.113.7"), ["www.cdn.test"]);
    mock.timers.tick(2_000);
    assert.deepEqual(server.namesFor("203.0.113.7"), []);
  });

  test("add-host answers are pinned too", async () => {
    const { server } = await setup();
    await askUdp(server, query("db.internal"));
    assert.deepEqual(server.namesFor("10.1.2.4"), ["db.internal"]);
  });

  test("resolve4 takes the guest's path: upstream, chain, cache, local hosts, allow-list, floor", async () => {
    const { server, ups } = await setup([zone], { allowName: (n) => n !== "denied.test" });
    assert.deepEqual(await server.resolve4("WWW.cdn.test."), ["203.0.113.7"]);
    assert.deepEqual(server.namesFor("203.0.113.7"), ["www.cdn.test"]);
    assert.deepEqual(await server.resolve4("www.cdn.test"), ["203.0.113.7"]);
    assert.equal(ups[0]?.log.length, 1, "the second came from the cache");
    assert.deepEqual(await server.resolve4("db.internal"), ["10.1.2.3", "10.1.2.4"]);
    assert.deepEqual(await server.resolve4("denied.test"), []);
    assert.deepEqual(await server.resolve4("rebind.test"), []);
    assert.deepEqual(await server.resolve4("nope.test"), []);
    assert.deepEqual(
      ups[0]?.log.map((l) => l.name),
      ["www.cdn.test", "rebind.test", "nope.test"],
    );
  });

  test("resolve4 rejects with DnsLookupError when no upstream answers", async () => {
    const { server } = await setup([silent]);
    await assert.rejects(
      server.resolve4("example.test"),
      (e) => e instanceof DnsLookupError && e.code === "DNS_FAILED",
    );
  });
});

describe("dns: TCP", () => {
  test("a query over TCP is answered", async () => {
    const { server } = await setup();
    const { replies } = await askTcp(server.tcpPort, [streamEncode(query("example.test", "A", 41))], 1);
    assert.equal(replies[0]?.id, 41);
    assert.deepEqual(addresses(replies[0] as DecodedPacket), ["203.0.113.10"]);
  });

  test("two queries on one connection, in one write, get two replies", async () => {
    const { server } = await setup();
    const frames = [streamEncode(query("example.test", "A", 1)), streamEncode(query("www.cdn.test", "A", 2))];
    const { replies, closed } = await askTcp(server.tcpPort, frames, 2);
    assert.equal(closed, false);
    const byId = new Map(replies.map((r) => [r.id, r]));
    assert.deepEqual(addresses(byId.get(1) as DecodedPacket), ["203.0.113.10"]);
    assert.deepEqual(addresses(byId.get(2) as DecodedPacket), ["203.0.113.7", "203.0.113.9"]);
  });

  test("forty queries pipelined in one write (past the per-connection limit) are all answered", async () => {
    const { server, ups } = await setup();
    const ids = Array.from({ length: 40 }, (_, i) => i + 100);
    const frames = ids.map((id) => streamEncode(query(id % 2 ? "example.test" : `n${id}.test`, "A", id)));
    const { replies } = await askTcp(server.tcpPort, frames, ids.length);
    assert.deepEqual(
      replies.map((r) => r.id).sort((x = 0, y = 0) => x - y),
      ids,
    );
    for (const r of replies) {
      assert.equal(rcodeOf(r), (r.id ?? 0) % 2 ? RCODE.NOERROR : RCODE.NXDOMAIN);
    }
    assert.equal(ups[0]?.log.length, 21, "example.test once, each n<id>.test once");
  });

  test("an undecodable message closes the connection", async () => {
    const { server } = await setup();
    const garbage = Buffer.from([0, 5, 1, 2, 3, 4, 5]);
    const { replies, closed } = await askTcp(server.tcpPort, [garbage], 1);
    assert.equal(closed, true);
    assert.equal(replies.length, 0);
  });

  test("a declared length over the query cap closes the connection before the bytes arrive", async () => {
    const { server } = await setup();
    const { closed } = await askTcp(server.tcpPort, [Buffer.from([0xff, 0xff, 0, 0])], 1);
    assert.equal(closed, true);
  });
});

describe("dns: hostile queries", () => {
  test("two questions get FORMERR with the guest's id", async () => {
    const { server, ups } = await setup();
    const p = query("example.test", "A", 77);
    p.questions = [
      { name: "example.test", type: "A", class: "IN" },
      { name: "www.cdn.test", type: "A", class: "IN" },
    ];
    const reply = await askUdp(server, p);
    assert.equal(reply.id, 77);
    assert.equal(rcodeOf(reply), RCODE.FORMERR);
    assert.equal(ups[0]?.log.length, 0);
  });

  test("no question gets FORMERR; a response is never answered; an oversize datagram is dropped", async () => {
    const { server } = await setup();
    assert.equal(rcodeOf(await askUdp(server, { type: "query", id: 3, questions: [] })), RCODE.FORMERR);
    const response = encode({ ...query("example.test"), type: "response" });
    assert.deepEqual(await udpExchange(server.udpPort, response, 300), []);
    const big = encode(query(`${"a".repeat(60)}.test`));
    const padded = Buffer.concat([big, Buffer.alloc(5000)]); // decodes, but over the 4 KiB cap
    assert.deepEqual(await udpExchange(server.udpPort, padded, 300), []);
  });

  test("random bytes never crash the server; any reply is FORMERR unless they form a real query", async () => {
    const { server } = await setup([silent], { timeoutMs: 5 });
    const sentinel = encode(query("db.internal", "A", 0xfeed));
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 0, maxLength: 600 }), async (bytes) => {
        const buf = Buffer.from(bytes);
        let oneQuestion = false;
        try {
          oneQuestion = decode(buf).questions?.length === 1;
        } catch {
          // undecodable: must get no reply
        }
        // A sentinel query right behind the garbage: once its answer is in, the garbage's reply
        // (if any) is too, except a real-looking query, which waits for the (silent) upstream.
        const replies = (await udpExchange(server.udpPort, buf, 3000, 1, sentinel))
          .map((r) => decode(r))
          .filter((r) => !(r.id === 0xfeed && r.questions?.[0]?.name === "db.internal"));
        if (oneQuestion) return;
        assert.ok(replies.length <= 1);
        const reply = replies[0];
        if (!reply) return;
        assert.ok(buf.length >= 12, "an undecodable datagram was answered");
        assert.equal(reply.flag_qr, true);
        assert.equal(reply.id, buf.readUInt16BE(0));
        assert.equal(rcodeOf(reply), RCODE.FORMERR);
      }),
      runs(300),
    );
    const reply = await askUdp(server, query("db.internal"));
    assert.deepEqual(addresses(reply), ["10.1.2.3", "10.1.2.4"], "still serving");
  });
});

describe("dns: configuration", () => {
  test("upstreamsFromResolvConf: nameserver lines, literals only, in order, at most three", () => {
    const text = [
      "# generated",
      "search example.com",
      "nameserver 192.0.2.53",
      "  nameserver\t2001:db8::53   # trailing comment",
      "nameserver dns.example.com",
      "nameserver fe80::1%eth0",
      ";nameserver 198.51.100.1",
      "options ndots:2",
      "nameserver 203.0.113.53",
      "nameserver 198.51.100.53",
    ].join("\n");
    assert.deepEqual(upstreamsFromResolvConf(text), ["192.0.2.53", "2001:db8::53", "fe80::1%eth0"]);
    assert.deepEqual(upstreamsFromResolvConf(""), []);
  });

  test("listen refuses an upstream that is not an IP literal, with or without a port", async () => {
    for (const bad of [
      "dns.example.com",
      "1.2.3.4:0",
      "1.2.3.4:99999",
      "1.2.3.4:",
      "::1:53x",
      "[1.2.3]:53",
    ]) {
      const p = DnsServer.listen({
        address: "127.0.0.1",
        localHosts: new Map(),
        upstreams: [bad],
        refuses: floor,
      });
      await assert.rejects(p, InvalidArgumentError, bad);
    }
    const ok = await DnsServer.listen({
      address: "127.0.0.1",
      localHosts: new Map(),
      upstreams: ["127.0.0.1", "127.0.0.1:5353", "::1", "[::1]", "[::1]:5353"],
      refuses: floor,
    });
    assert.ok(ok.udpPort > 0 && ok.tcpPort > 0);
    await ok.close();
  });
});
