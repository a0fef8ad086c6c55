import { createSocket } from "node:dgram";
import { connect, isIP } from "node:net";
import { type DecodedPacket, decode } from "dns-packet";
import { InvalidArgumentError } from "../api/errors.ts";

/**
 * The client side of the gateway DNS server: where the upstream resolvers are, and one exchange
 * with one of them over UDP or TCP. Failover between upstreams is the server's job (dns.ts).
 */

export interface Upstream {
  host: string;
  port: number;
  family: 4 | 6;
}

/** "1.1.1.1", "1.1.1.1:5353", "2606:4700::1111" or "[2606:4700::1111]:5353". */
export function parseUpstream(text: string): Upstream {
  const bad = () =>
    new InvalidArgumentError(
      `invalid DNS server ${JSON.stringify(text)}: expected an IP address, optionally with :port`,
    );
  let host = text;
  let port = 53;
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  if (bracketed) {
    host = bracketed[1] ?? "";
    if (bracketed[2] !== undefined) port = Number(bracketed[2]);
  } else if (isIP(text) === 0) {
    // Not a bare address: only IPv4 may carry a port without brackets.
    const at = text.lastIndexOf(":");
    if (at < 0 || isIP(text.slice(0, at)) !== 4) throw bad();
    host = text.slice(0, at);
    port = /^\d+$/.test(text.slice(at + 1)) ? Number(text.slice(at + 1)) : Number.NaN;
  }
  const family = isIP(host);
  if (family === 0 || !Number.isInteger(port) || port < 1 || port > 65535) throw bad();
  return { host, port, family: family === 6 ? 6 : 4 };
}

/** glibc reads at most this many `nameserver` lines (MAXNS). */
const MAX_RESOLV_CONF_SERVERS = 3;

/**
 * The `nameserver` addresses of a resolv.conf, in order, at most three (as glibc). Anything that is
 * not an IP literal is skipped. An IPv6 zone (`fe80::1%eth0`) is kept: link-local needs it to route.
 */
export function upstreamsFromResolvConf(text: string): string[] {
  const out: string[] = [];
  for (const line of text.split("\n")) {
    const [keyword, value] = line.trim().split(/\s+/);
    if (keyword !== "nameserver" || value === undefined || isIP(value) === 0) continue;
    out.push(value);
    if (out.length === MAX_RESOLV_CONF_SERVERS) break;
  }
  return out;
}

/** Whether a decoded upstream message is the reply to our query (id and question). */
export type ReplyMatcher = (reply: DecodedPacket) => boolean;

export class UpstreamTimeoutError extends Error {
  constructor(up: Upstream) {
    super(`DNS server ${up.host}:${up.port} did not answer in time`);
    this.name = "UpstreamTimeoutError";
  }
}

/** Largest UDP reply we accept from an upstream: a datagram cannot carry more. */
const MAX_UDP_REPLY = 65535;

type Finish = (err: Error | undefined, reply?: DecodedPacket) => void;

/**
 * One exchange with an upstream, settled once: by a matching reply, an error, the timeout or the
 * server closing (`signal`). `start` opens the socket and returns how to release it.
 */
function exchange(
  up: Upstream,
  timeoutMs: number,
  signal: AbortSignal,
  start: (finish: Finish, settled: () => boolean) => () => void,
): Promise<DecodedPacket> {
  return new Promise((resolve, reject) => {
    let settled = false;
    let release = () => {};
    const finish: Finish = (err, reply) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
      release();
      if (reply) resolve(reply);
      else reject(err ?? new UpstreamTimeoutError(up));
    };
    const onAbort = () => finish(new Error("DNS server closed"));
    const timer = setTimeout(() => finish(new UpstreamTimeoutError(up)), timeoutMs);
    if (signal.aborted) return onAbort();
    signal.addEventListener("abort", onAbort);
    release = start(finish, () => settled);
    if (settled) release();
  });
}

/**
 * Sends `query` to `up` over UDP and resolves with the first reply that matches. The socket is
 * connected, so the kernel drops datagrams from anyone else and an ICMP refusal fails fast; the
 * fresh socket per query gives a random source port, which with the random id makes spoofing hard.
 */
export function exchangeUdp(
  up: Upstream,
  query: Buffer,
  matches: ReplyMatcher,
  timeoutMs: number,
  signal: AbortSignal,
): Promise<DecodedPacket> {
  return exchange(up, timeoutMs, signal, (finish, settled) => {
    const sock = createSocket(up.family === 6 ? "udp6" : "udp4");
    sock.on("error", (e) => finish(e));
    sock.on("message", (msg: Buffer) => {
      if (msg.length > MAX_UDP_REPLY) return;
      let reply: DecodedPacket;
      try {
        reply = decode(msg);
      } catch {
        return; // garbage from the upstream's address: keep waiting for the real reply
      }
      if (matches(reply)) finish(undefined, reply);
    });
    sock.connect(up.port, up.host, () => {
      if (settled()) return;
      sock.send(query, (err) => {
        if (err) finish(err);
      });
    });
    return () => {
      try {
        sock.close();
      } catch {
        // already closed
      }
    };
  });
}

/**
 * Splits a TCP byte stream into DNS messages (RFC 1035 §4.2.2: a two-byte length, then the
 * message). Messages are taken one at a time, so a reader that stops taking them (and pauses its
 * socket) holds at most what has already arrived. A declared length over `maxBytes`, or zero, is
 * an error: the caller closes.
 */
export class FrameReader {
  private pending: Buffer = Buffer.alloc(0);
  private readonly maxBytes: number;

  constructor(maxBytes: number) {
    this.maxBytes = maxBytes;
  }

  push(chunk: Buffer): void {
    this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
  }

  /** The next complete message, or undefined until more bytes arrive; throws FrameError on a bad length. */
  next(): Buffer | undefined {
    if (this.pending.length < 2) return undefined;
    const len = this.pending.readUInt16BE(0);
    if (len === 0 || len > this.maxBytes) throw new FrameError(len);
    if (this.pending.length < 2 + len) return undefined;
    const msg = this.pending.subarray(2, 2 + len);
    this.pending = this.pending.subarray(2 + len);
    return msg;
  }
}

export class FrameError extends Error {
  constructor(len: number) {
    super(`DNS message length ${len} out of bounds`);
    this.name = "FrameError";
  }
}

/** Sends a length-prefixed `frame` (from dns-packet's streamEncode) over TCP; the first matching reply wins. */
export function exchangeTcp(
  up: Upstream,
  frame: Buffer,
  matches: ReplyMatcher,
  timeoutMs: number,
  signal: AbortSignal,
): Promise<DecodedPacket> {
  return exchange(up, timeoutMs, signal, (finish) => {
    const sock = connect({ host: up.host, port: up.port });
    const reader = new FrameReader(65535);
    sock.on("error", (e) => finish(e));
    sock.on("close", () => finish(new Error(`DNS server ${up.host}:${up.port} closed the connection`)));
    sock.on("data", (chunk: Buffer) => {
      reader.push(chunk);
      try {
        for (let msg = reader.next(); msg !== undefined; msg = reader.next()) {
          const reply = decode(msg);
          if (matches(reply)) return finish(undefined, reply);
        }
      } catch (e) {
        finish(e instanceof Error ? e : new Error(String(e)));
      }
    });
    sock.write(frame);
    return () => sock.destroy();
  });
}
