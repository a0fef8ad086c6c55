import { randomInt } from "node:crypto";
import { createSocket, type RemoteInfo, type Socket as UdpSocket } from "node:dgram";
import { createServer, isIP, type Server, type Socket } from "node:net";
import {
  type Answer,
  type DecodedPacket,
  decode,
  encode,
  encodingLength,
  type OptAnswer,
  type Packet,
  type Question,
  RECURSION_AVAILABLE,
  RECURSION_DESIRED,
  type RecordType,
  streamEncode,
  TRUNCATED_RESPONSE,
} from "dns-packet";
import { InvalidArgumentError, MatchlockError, messageOf } from "../api/errors.ts";
import { AnswerCache, PinTable, RCODE, type Resolution } from "./dns-cache.ts";
import {
  exchangeTcp,
  exchangeUdp,
  FrameReader,
  parseUpstream,
  type ReplyMatcher,
  type Upstream,
} from "./dns-upstream.ts";

export { upstreamsFromResolvConf } from "./dns-upstream.ts";

/**
 * The DNS server a VM's queries reach: nftables DNATs every guest UDP/TCP port-53 packet, to any
 * address, to these two listeners on the gateway address (NETWORK.md §4). Names an allow-list
 * refuses get NXDOMAIN and never leave the host; --add-host names are answered here; AAAA is
 * answered empty (the guest has no IPv6); the rest goes to the upstream resolvers, and an answer
 * inside the private floor turns the whole reply into NXDOMAIN, so a public name cannot be made to
 * point at the host or the LAN (DNS rebinding). Every address answered is pinned to the name asked,
 * for the proxy.
 *
 * Every buffer, table and count here is bounded, whatever the guest or an upstream sends.
 */

export interface DnsServerOptions {
  /** Address to bind, e.g. the VM's gateway "10.99.3.1" (tests: "127.0.0.1"). */
  address: string;
  /** Names answered locally (--add-host): lower-case name without trailing dot → IPv4 addresses. */
  localHosts: ReadonlyMap<string, readonly string[]>;
  /** Upstream resolvers, "ip" or "ip:port" (IPv4 or IPv6 literal), tried in order, failing over on timeout. */
  upstreams: readonly string[];
  /** Why an answered address must not reach the guest (the private floor), or undefined if it may. */
  refuses: (ip: string) => string | undefined;
  /** Intercept mode (later issue): a name this returns false for gets NXDOMAIN and is never forwarded. Default: all allowed. */
  allowName?: (name: string) => boolean;
  /** Called for every refused/blocked answer, for logs and events: {name, reason}. */
  onBlocked?: (e: { name: string; reason: string }) => void;
  /** Per-upstream timeout, default 2000 ms. */
  timeoutMs?: number;
}

/** No upstream resolver answered (resolve4 only: the guest gets SERVFAIL). */
export class DnsLookupError extends MatchlockError {
  constructor(name: string) {
    super("DNS_FAILED", `cannot resolve ${name}: no DNS server answered`);
    this.name = "DnsLookupError";
  }
}

const DEFAULT_TIMEOUT_MS = 2000;
/** A query is a header and one question: anything bigger is not one (and is dropped unread). */
const MAX_QUERY_BYTES = 4096;
/** Classic DNS over UDP; a larger reply needs the guest's EDNS size, else it is truncated. */
const MIN_UDP_REPLY = 512;
const MAX_UDP_REPLY = 4096;
/** The EDNS size we offer upstreams and guests (DNS flag day 2020: no IP fragmentation). */
const EDNS_SIZE = 1232;
const LOCAL_HOST_TTL_S = 60;
const CACHE_ENTRIES = 4096;
const PINS = 8192;
/** Distinct names being asked upstream at once; more gets SERVFAIL. */
const MAX_UPSTREAM_QUERIES = 256;
/** Guest UDP queries awaiting an answer; more are dropped (the guest retries). */
const MAX_PENDING_UDP = 1024;
const MAX_TCP_CONNECTIONS = 64;
/** Queries of one TCP connection being answered at once; reading pauses beyond it. */
const MAX_PENDING_PER_TCP = 16;
/** Reply bytes a TCP guest has not read yet; reading pauses beyond it. */
const MAX_TCP_UNREAD_REPLIES = 64 * 1024;
const TCP_IDLE_MS = 10_000;

/** Lower case, no trailing dot; the root stays ".". */
function normalizeName(name: string): string {
  const n = name.toLowerCase().replace(/\.$/, "");
  return n === "" ? "." : n;
}

/**
 * Names are printable ASCII on the wire (IDNs travel as punycode). Refusing the rest keeps the name
 * checked by the allow-list byte for byte the name sent upstream, which is re-encoded from it.
 */
const PRINTABLE_NAME = /^[\x21-\x7e]+$/;

const NXDOMAIN: Resolution = { rcode: RCODE.NXDOMAIN, answers: [], authorities: [] };
const NODATA: Resolution = { rcode: RCODE.NOERROR, answers: [], authorities: [] };
const SERVFAIL: Resolution = { rcode: RCODE.SERVFAIL, answers: [], authorities: [] };

function rcodeOf(p: DecodedPacket): number {
  return (p.flags ?? 0) & 0xf;
}

function opcodeOf(p: DecodedPacket): number {
  return ((p.flags ?? 0) >> 11) & 0xf;
}

function optRecord(): OptAnswer {
  return {
    name: ".",
    type: "OPT",
    udpPayloadSize: EDNS_SIZE,
    extendedRcode: 0,
    ednsVersion: 0,
    flags: 0,
    flag_do: false,
    options: [],
  };
}

/**
 * dns-packet decodes a type it has no name for as "UNKNOWN_<n>" and encodes that string back to n,
 * so any decoded type round-trips, though the typings list only the named ones.
 */
function asRecordType(type: string): RecordType {
  return type as RecordType;
}

/** The names an answer section leads to from `owner` through CNAMEs, `owner` included. */
function cnameChain(owner: string, answers: readonly Answer[]): Set<string> {
  const targets = new Map<string, string[]>();
  for (const a of answers) {
    if (a.type !== "CNAME") continue;
    const from = normalizeName(a.name);
    targets.set(from, [...(targets.get(from) ?? []), normalizeName(a.data)]);
  }
  const chain = new Set([owner]);
  const todo = [owner];
  for (let n = todo.pop(); n !== undefined; n = todo.pop()) {
    for (const t of targets.get(n) ?? []) {
      if (chain.has(t)) continue;
      chain.add(t);
      todo.push(t);
    }
  }
  return chain;
}

/** The addresses of `answers` (A, or A and AAAA) whose owner is in `chain`, with their TTLs. */
function addressesIn(
  answers: readonly Answer[],
  chain: Set<string>,
  types: readonly string[],
): { ip: string; ttl: number }[] {
  const out: { ip: string; ttl: number }[] = [];
  for (const a of answers) {
    if ((a.type === "A" || a.type === "AAAA") && types.includes(a.type) && chain.has(normalizeName(a.name))) {
      out.push({ ip: a.data, ttl: a.ttl ?? 0 });
    }
  }
  return out;
}

type Transport = "udp" | "tcp";

/** What to do with one guest message: send these bytes, or drop it (on TCP: close the connection). */
type Outcome = Buffer | undefined;

export class DnsServer {
  readonly udpPort: number;
  readonly tcpPort: number;
  private readonly opts: DnsServerOptions;
  private readonly upstreams: readonly Upstream[];
  private readonly timeoutMs: number;
  private readonly udp: UdpSocket;
  private readonly tcp: Server;
  private readonly connections = new Set<Socket>();
  private readonly cache = new AnswerCache(CACHE_ENTRIES);
  private readonly pins = new PinTable(PINS);
  /** Upstream lookups under way, by cache key: concurrent guests asking the same share one. */
  private readonly inflight = new Map<string, Promise<Resolution>>();
  private pendingUdp = 0;
  private readonly closing = new AbortController();

  private constructor(opts: DnsServerOptions, upstreams: readonly Upstream[], udp: UdpSocket, tcp: Server) {
    this.opts = opts;
    this.upstreams = upstreams;
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.udp = udp;
    this.tcp = tcp;
    this.udpPort = udp.address().port;
    this.tcpPort = (tcp.address() as { port: number }).port;
    udp.on("message", (msg, from) => this.onDatagram(msg, from));
    tcp.on("connection", (sock) => this.onConnection(sock));
  }

  /** Binds UDP and TCP on an ephemeral port each (the DNAT rules name them). */
  static async listen(opts: DnsServerOptions): Promise<DnsServer> {
    const family = isIP(opts.address);
    if (family === 0) throw new InvalidArgumentError(`DNS listen address ${opts.address} is not an IP`);
    const upstreams = opts.upstreams.map(parseUpstream);
    const udp = createSocket(family === 6 ? "udp6" : "udp4");
    const tcp = createServer();
    tcp.maxConnections = MAX_TCP_CONNECTIONS;
    // Errors after listening (a send to a vanished guest…) are per packet: never fatal.
    udp.on("error", () => {});
    tcp.on("error", () => {});
    try {
      await new Promise<void>((resolve, reject) => {
        udp.once("error", reject);
        udp.bind(0, opts.address, () => {
          udp.off("error", reject);
          resolve();
        });
      });
      await new Promise<void>((resolve, reject) => {
        tcp.once("error", reject);
        tcp.listen(0, opts.address, () => {
          tcp.off("error", reject);
          resolve();
        });
      });
    } catch (e) {
      try {
        udp.close();
      } catch {
        // never bound
      }
      tcp.close();
      throw new MatchlockError("VM_FAILED", `cannot listen for DNS on ${opts.address}: ${messageOf(e)}`, {
        cause: e,
      });
    }
    return new DnsServer(opts, upstreams, udp, tcp);
  }

  /** Names this VM's DNS answered with `ip` (pins, for the proxy); [] if none or expired. */
  namesFor(ip: string): string[] {
    return this.pins.namesFor(ip, Date.now());
  }

  /**
   * A records for `name` through the same path as a guest query (allow-list, local hosts, cache,
   * upstreams, floor, pins). [] when the name is refused, does not exist or has no A record;
   * rejects with DnsLookupError when no upstream answered.
   */
  async resolve4(name: string): Promise<string[]> {
    const owner = normalizeName(name);
    if (!PRINTABLE_NAME.test(owner)) return [];
    const r = await this.lookup(owner, "A");
    if (r.rcode === RCODE.SERVFAIL) throw new DnsLookupError(owner);
    return addressesIn(r.answers, cnameChain(owner, r.answers), ["A"]).map((a) => a.ip);
  }

  async close(): Promise<void> {
    this.closing.abort();
    for (const s of this.connections) s.destroy();
    await Promise.all([
      new Promise<void>((resolve) => {
        try {
          this.udp.close(() => resolve());
        } catch {
          resolve(); // already closed
        }
      }),
      new Promise<void>((resolve) => this.tcp.close(() => resolve())),
    ]);
  }

  // --- guest transports ---------------------------------------------------------------------

  private onDatagram(msg: Buffer, from: RemoteInfo): void {
    if (msg.length > MAX_QUERY_BYTES || this.pendingUdp >= MAX_PENDING_UDP) return;
    this.pendingUdp++;
    this.answer(msg, "udp")
      .then((reply) => {
        if (reply && !this.closing.signal.aborted) this.udp.send(reply, from.port, from.address, () => {});
      })
      .catch(() => {}) // answer() does not reject; a bug there must not crash the process
      .finally(() => this.pendingUdp--);
  }

  /**
   * Several queries per connection (RFC 7766), answered concurrently and possibly out of order
   * (the id says which is which). Reading pauses while too many are being answered or too many
   * reply bytes wait for the guest to read them.
   */
  private onConnection(sock: Socket): void {
    this.connections.add(sock);
    const reader = new FrameReader(MAX_QUERY_BYTES);
    let pending = 0;
    const pump = () => {
      while (pending < MAX_PENDING_PER_TCP && !sock.destroyed) {
        let msg: Buffer | undefined;
        try {
          msg = reader.next();
        } catch {
          return sock.destroy(); // a declared length over the cap: not a DNS client
        }
        if (msg === undefined) break;
        pending++;
        this.answer(msg, "tcp")
          .then((reply) => {
            if (!reply) return sock.destroy(); // undecodable: not a DNS client
            if (!sock.destroyed) sock.write(reply);
          })
          .catch(() => sock.destroy())
          .finally(() => {
            pending--;
            pump();
          });
      }
      if (pending >= MAX_PENDING_PER_TCP || sock.writableLength > MAX_TCP_UNREAD_REPLIES) sock.pause();
      else sock.resume();
    };
    sock.on("data", (chunk: Buffer) => {
      reader.push(chunk);
      pump();
    });
    sock.on("drain", pump);
    sock.setTimeout(TCP_IDLE_MS, () => {
      if (pending === 0) sock.destroy();
    });
    sock.on("error", () => {});
    sock.on("close", () => this.connections.delete(sock));
  }

  // --- one query ------------------------------------------------------------------------------

  /** The reply to one guest message, encoded for its transport; undefined to drop it. */
  private async answer(msg: Buffer, transport: Transport): Promise<Outcome> {
    let query: DecodedPacket;
    try {
      query = decode(msg);
    } catch {
      return undefined;
    }
    if (query.flag_qr) return undefined; // a response: answering it could loop between two servers
    const id = query.id ?? 0;
    const questions = query.questions ?? [];
    const question = questions[0];
    if (questions.length !== 1 || question === undefined) return this.bare(id, RCODE.FORMERR, transport);
    if (opcodeOf(query) !== 0) return this.bare(id, RCODE.NOTIMP, transport);
    const name = normalizeName(question.name);
    if (!PRINTABLE_NAME.test(name)) return this.bare(id, RCODE.FORMERR, transport);
    const refused = question.class !== "IN" || question.type === "AXFR" || question.type === "IXFR";
    const r = refused ? { ...NODATA, rcode: RCODE.REFUSED } : await this.lookup(name, question.type);
    return this.reply(query, question, r, transport);
  }

  /**
   * The resolution of (name, type) for any asker: allow-list, AAAA, local hosts, cache or
   * upstreams, then the floor; pins what it answers.
   */
  private async lookup(name: string, type: string): Promise<Resolution> {
    if (this.opts.allowName && !this.opts.allowName(name)) {
      this.blocked(name, "not in allow-list");
      return NXDOMAIN;
    }
    if (type === "AAAA") return NODATA; // the guest has no IPv6: make it fall back to IPv4 at once
    const local = this.opts.localHosts.get(name);
    if (local) {
      if (type !== "A") return NODATA;
      const answers: Answer[] = local.map((ip) => ({
        name,
        type: "A",
        class: "IN",
        ttl: LOCAL_HOST_TTL_S,
        data: ip,
      }));
      return this.pinned(name, { rcode: RCODE.NOERROR, answers, authorities: [] });
    }
    const key = `${type} ${name}`;
    const r = this.cache.get(key, Date.now()) ?? (await this.forward(name, type, key));
    return this.screened(name, r);
  }

  /** Asks the upstreams, sharing the lookup with concurrent askers of the same key; caches the result. */
  private forward(name: string, type: string, key: string): Promise<Resolution> {
    const running = this.inflight.get(key);
    if (running) return running;
    if (this.inflight.size >= MAX_UPSTREAM_QUERIES) return Promise.resolve(SERVFAIL);
    const p = this.askUpstreams(name, type)
      .then((r) => {
        this.cache.set(key, r, Date.now());
        return r;
      })
      .finally(() => this.inflight.delete(key));
    this.inflight.set(key, p);
    return p;
  }

  /** Each upstream in turn, over UDP (then TCP if the reply was truncated); SERVFAIL if none answers. */
  private async askUpstreams(name: string, type: string): Promise<Resolution> {
    const signal = this.closing.signal;
    for (const up of this.upstreams) {
      if (signal.aborted) break;
      // A fresh id per attempt, never the guest's: a reply is matched on it and on the question.
      const id = randomInt(0, 0x10000);
      const packet: Packet = {
        type: "query",
        id,
        flags: RECURSION_DESIRED,
        questions: [{ name, type: asRecordType(type), class: "IN" }],
        additionals: [optRecord()],
      };
      const matches: ReplyMatcher = (p) => {
        const q = p.questions?.[0];
        return (
          p.flag_qr &&
          p.id === id &&
          p.questions?.length === 1 &&
          q !== undefined &&
          normalizeName(q.name) === name &&
          q.type === type
        );
      };
      try {
        let reply = await exchangeUdp(up, encode(packet), matches, this.timeoutMs, signal);
        if (reply.flag_tc)
          reply = await exchangeTcp(up, streamEncode(packet), matches, this.timeoutMs, signal);
        return {
          rcode: rcodeOf(reply),
          answers: (reply.answers ?? []).filter((a) => a.type !== "OPT"),
          authorities: (reply.authorities ?? []).filter((a) => a.type !== "OPT"),
          // Additional records are dropped: stub resolvers do not need them, and they would be
          // addresses for names the guest did not ask, unchecked by the floor.
        };
      } catch {
        // timeout, refusal or a broken TCP reply: the next upstream
      }
    }
    return SERVFAIL;
  }

  /** NXDOMAIN if any address answered is inside the floor (DNS rebinding), else the pinned resolution. */
  private screened(name: string, r: Resolution): Resolution {
    for (const a of r.answers) {
      if (a.type !== "A" && a.type !== "AAAA") continue;
      const ip = a.data;
      const reason = this.opts.refuses(ip);
      if (reason !== undefined) {
        this.blocked(name, `answer ${ip} is ${reason}`);
        return NXDOMAIN;
      }
    }
    return this.pinned(name, r);
  }

  /** Pins each address reached from `name` through CNAMEs to `name`, until the record's TTL runs out. */
  private pinned(name: string, r: Resolution): Resolution {
    if (r.answers.length === 0) return r;
    const chain = cnameChain(name, r.answers);
    const now = Date.now();
    for (const { ip, ttl } of addressesIn(r.answers, chain, ["A", "AAAA"])) this.pins.pin(ip, name, ttl, now);
    return r;
  }

  private blocked(name: string, reason: string): void {
    try {
      this.opts.onBlocked?.({ name, reason });
    } catch {
      // a failing listener must not break DNS
    }
  }

  // --- encoding replies -----------------------------------------------------------------------

  /** The reply to `query`: its id and question as asked, the resolution, and EDNS if it used EDNS. */
  private reply(query: DecodedPacket, question: Question, r: Resolution, transport: Transport): Outcome {
    const guestOpt = query.additionals?.find((a): a is OptAnswer => a.type === "OPT");
    const flags = RECURSION_AVAILABLE | ((query.flags ?? 0) & RECURSION_DESIRED) | (r.rcode & 0xf);
    const base: Packet = {
      type: "response",
      id: query.id ?? 0,
      flags,
      questions: [question],
      additionals: guestOpt ? [optRecord()] : [],
    };
    const full: Packet = { ...base, answers: r.answers, authorities: r.authorities };
    const limit =
      transport === "tcp"
        ? 65535
        : Math.min(MAX_UDP_REPLY, Math.max(MIN_UDP_REPLY, guestOpt?.udpPayloadSize ?? MIN_UDP_REPLY));
    try {
      if (encodingLength(full) <= limit) return this.encodeFor(full, transport);
      if (transport === "udp") return this.encodeFor({ ...base, flags: flags | TRUNCATED_RESPONSE }, "udp");
    } catch {
      // a record dns-packet decoded but cannot encode again: the guest gets SERVFAIL below
    }
    return this.encodeFor({ ...base, flags: (flags & ~0xf) | RCODE.SERVFAIL }, transport);
  }

  /** A reply with no question (FORMERR, NOTIMP): all we can say about a message we will not read. */
  private bare(id: number, rcode: number, transport: Transport): Outcome {
    return this.encodeFor({ type: "response", id, flags: RECURSION_AVAILABLE | rcode }, transport);
  }

  private encodeFor(p: Packet, transport: Transport): Buffer {
    return transport === "tcp" ? streamEncode(p) : encode(p);
  }
}
