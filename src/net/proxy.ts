import {
  type ClientRequest,
  createServer as createHttpServer,
  Agent as HttpAgent,
  type Server as HttpServer,
  request as httpRequest,
  type IncomingMessage,
  type ServerResponse,
} from "node:http";
import { Agent as HttpsAgent, request as httpsRequest } from "node:https";
import { createServer, isIP, connect as netConnect, type Server, type Socket } from "node:net";
import type { Duplex, Readable } from "node:stream";
import { TLSSocket, connect as tlsConnect } from "node:tls";
import { getExtensionData, readTlsClientHello } from "read-tls-client-hello";
import { messageOf } from "../api/errors.ts";
import { type NetworkEvent, type NetworkProtocol, networkEvent } from "../api/events.ts";
import { applyBodyPlan, type BodyPlan } from "./hook-body.ts";
import { type HookRequest, hookRequest, type NetworkHooks, requestTarget } from "./hooks.ts";
import type { AllowList } from "./host-policy.ts";
import type { MitmCa } from "./mitm-ca.ts";
import { deleteHeader, setHeader } from "./raw-headers.ts";
import type { Secret, SecretBook } from "./secrets.ts";
import { listenOn } from "./tcp-relay.ts";

/**
 * Intercept mode's HTTP and HTTPS proxy (NETWORK.md §6). nftables sends the guest's TCP 80 and 443
 * here. For HTTPS the ClientHello is peeked first and the SNI checked against the allow-list
 * *before* any certificate is minted; an allowed name is terminated with a leaf of the VM's own CA.
 * Every request then passes, in order: Host = SNI (no domain fronting), the allow-list, the secret
 * leak check and swap, resolution through the VM's own DNS (the pinned, policy-checked address, never
 * the one the guest dialled) and the private floor on that exact address. Upstream connections are
 * kept alive and pooled; bodies stream both ways with back-pressure (SSE flows as it comes); real
 * secret values an upstream echoes are turned back into placeholders before the guest sees them.
 */

export interface ProxyOptions {
  /** The gateway address: the listeners are reachable only through the TAP. */
  address: string;
  allow: AllowList;
  secrets: SecretBook;
  ca: MitmCa;
  /** Network hooks (`network.interception`); absent or empty: none run. */
  hooks?: NetworkHooks;
  /** A records for a name through the VM's DNS (allow-list, floor and pins applied). */
  resolve: (name: string) => Promise<string[]>;
  /** Why the guest may not reach this address (the private floor), or undefined. */
  refuses: (address: string) => string | undefined;
  /** A TLS flow with no SNI: handed to the plain TCP path, which decides by address. */
  passthrough: (socket: Socket) => void;
  onEvent: (e: NetworkEvent) => void;
  /** Guest connections at once; more are reset (a guest cannot exhaust the host's sockets). */
  maxConnections?: number;
}

/** What the proxy knows about a guest connection. */
interface ConnInfo {
  scheme: "http" | "https";
  sni?: string;
}

const HELLO_TIMEOUT_MS = 10_000;
const CONNECT_TIMEOUT_MS = 30_000;
/** Hop-by-hop headers (RFC 9110 §7.6.1) never travel past the proxy. */
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
  "expect", // Node's server already answered 100-continue
]);

/** `Host: Example.TEST:443` → `example.test`; IPv6 literals keep their address. */
export function hostOfHeader(host: string | undefined): string {
  if (!host) return "";
  let h = host.trim();
  if (h.startsWith("[")) h = h.slice(1, h.indexOf("]") < 0 ? undefined : h.indexOf("]"));
  else if (/:\d*$/.test(h)) h = h.slice(0, h.lastIndexOf(":"));
  return h.toLowerCase().replace(/\.$/, "");
}

/** The path of a request target without its query, for events (a query may carry a secret). */
function pathOf(url: string): string {
  const q = url.search(/[?#]/);
  return q < 0 ? url : url.slice(0, q);
}

/** rawHeaders minus hop-by-hop ones and those the Connection header names. */
function endToEnd(raw: readonly string[], keepUpgrade = false): string[] {
  const named = new Set<string>();
  for (let i = 0; i + 1 < raw.length; i += 2) {
    if ((raw[i] as string).toLowerCase() === "connection") {
      for (const t of (raw[i + 1] as string).split(",")) named.add(t.trim().toLowerCase());
    }
  }
  const out: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = (raw[i] as string).toLowerCase();
    const hop = HOP_BY_HOP.has(name) || named.has(name);
    if (hop && !(keepUpgrade && (name === "upgrade" || name === "connection"))) continue;
    out.push(raw[i] as string, raw[i + 1] as string);
  }
  return out;
}

/** A request that passed every check: where it goes and what is sent. */
interface Admission {
  host: string;
  address: string;
  rawHeaders: string[];
  url: string;
  swapped: Secret[];
  /** The request as the before hooks left it, before the swap: what after hooks match and see. */
  hooked: HookRequest;
}

/** A refusal the guest sees as an HTTP response, and the event that records it. */
class Refusal extends Error {
  readonly status: number;
  readonly reason: string;
  constructor(status: number, reason: string) {
    super(reason);
    this.status = status;
    this.reason = reason;
  }
}

/** The guest's answer to a refused request: 403 says "Blocked by policy", the rest name the problem. */
function refuse(res: ServerResponse, r: Refusal): void {
  res.writeHead(r.status, { "content-type": "text/plain", connection: "close" });
  res.end(r.status === 403 ? `Blocked by policy: ${r.reason}\n` : `matchlock: ${r.reason}\n`);
}

/** Counts the bytes that flow through a stream without touching them. */
function countBytes(s: NodeJS.ReadableStream, add: (n: number) => void): void {
  s.on("data", (c: Buffer | string) => add(typeof c === "string" ? Buffer.byteLength(c) : c.length));
}

export class InterceptProxy {
  readonly httpPort: number;
  readonly httpsPort: number;
  private readonly listeners: Server[];
  private readonly http: HttpServer;
  private readonly sockets = new Set<Socket>();
  private readonly agents: { http: HttpAgent; https: HttpsAgent };
  private readonly info = new WeakMap<Duplex, ConnInfo>();
  private readonly opts: ProxyOptions;

  private constructor(opts: ProxyOptions, listeners: Server[], ports: number[]) {
    this.opts = opts;
    this.listeners = listeners;
    this.httpPort = ports[0] as number;
    this.httpsPort = ports[1] as number;
    // Matchlock keeps 4 idle upstream connections per host for 90 s; so do we.
    const pool = { keepAlive: true, maxFreeSockets: 4, timeout: 90_000, scheduling: "lifo" as const };
    this.agents = { http: new HttpAgent(pool), https: new HttpsAgent(pool) };
    this.http = createHttpServer({ noDelay: true, keepAliveTimeout: 60_000, requestTimeout: 0 });
    this.http.on("request", (req, res) => {
      this.onRequest(req, res).catch((e) => this.fail(res, e));
    });
    this.http.on("upgrade", (req: IncomingMessage, sock: Duplex, head: Buffer) => {
      this.onUpgrade(req, sock, head).catch(() => sock.destroy());
    });
    this.http.on("connect", (req: IncomingMessage, sock: Duplex) => {
      const conn = this.info.get(req.socket) ?? { scheme: "http" };
      this.emitBlocked(
        conn,
        req.method ?? "CONNECT",
        req.url ?? "",
        hostOfHeader(req.url),
        "CONNECT is refused",
      );
      sock.end("HTTP/1.1 405 Method Not Allowed\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    });
    this.http.on("clientError", (_e, sock: Duplex) => sock.destroy());
  }

  static async listen(opts: ProxyOptions): Promise<InterceptProxy> {
    const listeners: Server[] = [];
    const ports: number[] = [];
    try {
      for (let i = 0; i < 2; i++) {
        const server = createServer({ noDelay: true });
        listeners.push(server);
        ports.push(await listenOn(server, opts.address));
      }
    } catch (e) {
      for (const l of listeners) l.close();
      throw e;
    }
    const proxy = new InterceptProxy(opts, listeners, ports);
    listeners[0]?.on("connection", (s: Socket) => proxy.accept(s, "http"));
    listeners[1]?.on("connection", (s: Socket) => proxy.accept(s, "https"));
    return proxy;
  }

  close(): void {
    for (const l of this.listeners) l.close();
    this.http.close();
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
    this.agents.http.destroy();
    this.agents.https.destroy();
  }

  private accept(sock: Socket, scheme: "http" | "https"): void {
    sock.on("error", () => {});
    if (this.sockets.size >= (this.opts.maxConnections ?? 1024)) {
      sock.resetAndDestroy();
      return;
    }
    this.sockets.add(sock);
    sock.once("close", () => this.sockets.delete(sock));
    if (scheme === "http") {
      this.info.set(sock, { scheme });
      this.http.emit("connection", sock);
      return;
    }
    this.acceptTls(sock).catch(() => sock.destroy());
  }

  /** Peek the SNI; refuse before minting anything; then terminate TLS with a leaf for that name. */
  private async acceptTls(sock: Socket): Promise<void> {
    const timer = setTimeout(() => sock.destroy(), HELLO_TIMEOUT_MS);
    let sni: string | undefined;
    try {
      const hello = await readTlsClientHello(sock);
      sni = getExtensionData(hello, "server_name")?.serverName?.toLowerCase().replace(/\.$/, "");
    } catch {
      clearTimeout(timer);
      this.emitBlocked({ scheme: "https" }, "", "", "", "not a TLS ClientHello on port 443", 443);
      sock.resetAndDestroy();
      return;
    } finally {
      clearTimeout(timer);
    }
    if (!sni) {
      // No name to check or to mint for (a client dialling a bare IP): the plain TCP path decides by address.
      this.sockets.delete(sock);
      this.opts.passthrough(sock);
      return;
    }
    if (!this.opts.allow.allowsName(sni)) {
      this.emitBlocked({ scheme: "https", sni }, "", "", sni, "TLS server name not in the allow-list", 443);
      sock.resetAndDestroy();
      return;
    }
    const secureContext = await this.opts.ca.secureContext(sni);
    const tls = new TLSSocket(sock, { isServer: true, secureContext, ALPNProtocols: ["http/1.1"] });
    tls.on("error", () => sock.destroy());
    this.info.set(tls, { scheme: "https", sni });
    this.http.emit("connection", tls);
  }

  /**
   * Every check a request passes before anything leaves the host, in order: Host = SNI, the
   * allow-list, origin form, the before hooks, the secret leak check and swap (on what the hooks
   * produced), resolution and the floor. A Refusal says which failed. `upgrade` keeps the headers
   * an upgrade needs.
   */
  private async admit(req: IncomingMessage, conn: ConnInfo, upgrade: boolean): Promise<Admission> {
    const host = hostOfHeader(req.headers.host);
    if (host === "") throw new Refusal(400, "the request has no Host header");
    if (conn.sni !== undefined && host !== conn.sni) {
      throw new Refusal(421, `Host "${host}" does not match the TLS server name "${conn.sni}"`);
    }
    if (!this.opts.allow.allowsName(host)) throw new Refusal(403, "host not in the allow-list");
    // An absolute-form target (`GET http://other.host/ …`) would let the upstream route by a name the
    // checks never saw: only origin form (`/path?query`) is forwarded.
    const target = req.url ?? "/";
    if (!target.startsWith("/"))
      throw new Refusal(400, "only origin-form request targets (/path) are accepted");
    let hooked = hookRequest(host, req.method ?? "GET", target, endToEnd(req.rawHeaders, upgrade));
    const hooks = this.opts.hooks;
    if (hooks !== undefined && !hooks.isEmpty) {
      const r = await hooks.before(hooked);
      if (r.kind === "refused") throw new Refusal(r.status, r.reason);
      hooked = r.request;
    }
    const verdict = this.opts.secrets.prepareRequest(host, hooked.rawHeaders, requestTarget(hooked));
    if ("leak" in verdict) {
      throw new Refusal(403, `secret ${verdict.leak} sent to a host it is not allowed for`);
    }
    let addresses: string[];
    if (isIP(host) !== 0) addresses = [host];
    else {
      try {
        addresses = await this.opts.resolve(host);
      } catch (e) {
        throw new Refusal(502, `cannot resolve ${host}: ${messageOf(e)}`);
      }
    }
    if (addresses.length === 0)
      throw new Refusal(502, `${host} does not resolve (or only to refused addresses)`);
    let refused: string | undefined;
    const address = addresses.find((a) => {
      refused = this.opts.refuses(a);
      return refused === undefined;
    });
    if (address === undefined) throw new Refusal(403, `${host} resolves to ${addresses[0]}: ${refused}`);
    return {
      host,
      address,
      rawHeaders: verdict.rawHeaders,
      url: verdict.url,
      swapped: verdict.swapped,
      hooked,
    };
  }

  /** admit, with a refusal recorded as a blocked event and returned for the caller to answer. */
  private async check(
    req: IncomingMessage,
    conn: ConnInfo,
    port: number,
    upgrade: boolean,
  ): Promise<Admission | Refusal> {
    try {
      return await this.admit(req, conn, upgrade);
    } catch (e) {
      if (!(e instanceof Refusal)) throw e;
      const host = hostOfHeader(req.headers.host) || (conn.sni ?? "");
      this.emitBlocked(
        conn,
        req.method ?? "",
        this.urlOf(conn, host, req.url),
        host,
        e.reason,
        port,
        e.status,
      );
      return e;
    }
  }

  private async onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const started = performance.now();
    const conn = this.info.get(req.socket) ?? { scheme: "http" };
    const port = conn.scheme === "https" ? 443 : 80;
    const a = await this.check(req, conn, port, false);
    if (a instanceof Refusal) {
      req.resume();
      refuse(res, a);
      return;
    }
    let headers = a.rawHeaders;
    // Scanning a response for echoed secrets, or rewriting it, needs its bytes as sent: no compression.
    if (a.swapped.length > 0 || this.opts.hooks?.mayRewriteBody(a.hooked)) {
      headers = setHeader(headers, "accept-encoding", "identity");
    }
    const counts = { req: 0, res: 0 };
    const upstream: ClientRequest = (conn.scheme === "https" ? httpsRequest : httpRequest)({
      host: a.address,
      port,
      method: req.method,
      path: a.url,
      headers,
      setHost: false,
      agent: conn.scheme === "https" ? this.agents.https : this.agents.http,
      ...(conn.scheme === "https" ? { servername: a.host } : {}),
      timeout: CONNECT_TIMEOUT_MS,
    });
    const event = (status: number, blocked?: string) =>
      this.opts.onEvent(
        networkEvent({
          protocol: conn.scheme,
          method: req.method ?? "",
          url: this.urlOf(conn, a.host, req.url),
          host: a.host,
          port,
          status_code: status,
          request_bytes: counts.req,
          response_bytes: counts.res,
          duration_ms: Math.round(performance.now() - started),
          blocked: blocked !== undefined,
          ...(blocked === undefined ? {} : { block_reason: blocked }),
        }),
      );
    upstream.on("timeout", () => upstream.destroy(new Error("timed out")));
    upstream.on("error", (e) => {
      if (!res.headersSent) {
        event(502);
        res.writeHead(502, { "content-type": "text/plain", connection: "close" });
        res.end(`matchlock: cannot reach ${a.host} (${a.address}:${port}): ${messageOf(e)}\n`);
      } else res.destroy();
    });
    upstream.on("response", (up) => {
      upstream.setTimeout(0);
      res.once("close", () => {
        if (!res.writableFinished) up.destroy();
      });
      this.respond(a, up, res, counts, event).catch((e) => {
        up.destroy();
        this.fail(res, e);
      });
    });
    countBytes(req, (n) => {
      counts.req += n;
    });
    req.pipe(upstream);
    res.once("close", () => {
      if (!res.writableFinished) upstream.destroy();
    });
  }

  /**
   * The upstream's response to the guest: headers scrubbed of echoed secrets, then the after hooks
   * (which may refuse it, edit headers or plan a body rewrite), then the body through the plan and
   * the secret scrubber last, so that text a hook inserted is scrubbed too.
   */
  private async respond(
    a: Admission,
    up: IncomingMessage,
    res: ServerResponse,
    counts: { res: number },
    event: (status: number, blocked?: string) => void,
  ): Promise<void> {
    const status = up.statusCode ?? 502;
    let raw = endToEnd(up.rawHeaders);
    const scrub = this.opts.secrets.scrubber(a.swapped);
    if (scrub) {
      for (let i = 1; i < raw.length; i += 2)
        raw[i] = this.opts.secrets.scrubText(raw[i] as string, a.swapped);
    }
    let plan: BodyPlan = { kind: "pass" };
    const hooks = this.opts.hooks;
    if (hooks?.hasAfterFor(a.hooked)) {
      const r = await hooks.after(a.hooked, { status, rawHeaders: raw });
      if (r.kind === "refused") {
        up.destroy();
        event(r.status, r.reason);
        refuse(res, new Refusal(r.status, r.reason));
        return;
      }
      raw = r.rawHeaders;
      plan = r.body;
    }
    // Counted where the body starts to flow: a listener attached earlier would start it early.
    countBytes(up, (n) => {
      counts.res += n;
    });
    let body: Readable = up;
    if (plan.kind !== "pass") {
      const out = await applyBodyPlan(plan, up);
      body = out.body;
      if (out.length !== undefined) raw = setHeader(raw, "content-length", String(out.length));
    }
    if (scrub) {
      raw = deleteHeader(raw, "content-length"); // the placeholder's length is not the value's
      body = body.pipe(scrub);
    }
    if (res.destroyed) {
      up.destroy();
      return;
    }
    res.writeHead(status, up.statusMessage, raw);
    res.flushHeaders(); // streaming responses (SSE) start at once
    body.pipe(res);
    res.once("finish", () => event(up.statusCode ?? 0));
  }

  /** WebSocket and other upgrades: the same checks (before hooks only), then the sockets are joined. */
  private async onUpgrade(req: IncomingMessage, sock: Duplex, head: Buffer): Promise<void> {
    const conn = this.info.get(req.socket) ?? { scheme: "http" };
    const port = conn.scheme === "https" ? 443 : 80;
    const a = await this.check(req, conn, port, true);
    if (a instanceof Refusal) {
      sock.end(`HTTP/1.1 ${a.status} Blocked\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
      return;
    }
    const upstream =
      conn.scheme === "https"
        ? tlsConnect({ host: a.address, port, servername: a.host, ALPNProtocols: ["http/1.1"] })
        : netConnect({ host: a.address, port });
    upstream.on("error", () => sock.destroy());
    sock.on("error", () => upstream.destroy());
    const lines = [`${req.method} ${a.url} HTTP/1.1`];
    const headers = a.rawHeaders;
    for (let i = 0; i + 1 < headers.length; i += 2) lines.push(`${headers[i]}: ${headers[i + 1]}`);
    upstream.write(`${lines.join("\r\n")}\r\n\r\n`);
    if (head.length > 0) upstream.write(head);
    const scrub = this.opts.secrets.scrubber(a.swapped);
    (scrub ? upstream.pipe(scrub) : upstream).pipe(sock);
    sock.pipe(upstream);
    sock.once("close", () => upstream.destroy());
    upstream.once("close", () => sock.destroy());
    this.opts.onEvent(
      networkEvent({
        protocol: conn.scheme,
        method: req.method ?? "",
        url: this.urlOf(conn, a.host, req.url),
        host: a.host,
        port,
        blocked: false,
      }),
    );
  }

  private urlOf(conn: ConnInfo, host: string, url: string | undefined): string {
    return `${conn.scheme}://${host}${pathOf(url ?? "/")}`;
  }

  private emitBlocked(
    conn: ConnInfo,
    method: string,
    url: string,
    host: string,
    reason: string,
    port?: number,
    status = 0,
  ): void {
    const protocol: NetworkProtocol = conn.scheme;
    this.opts.onEvent(
      networkEvent({
        protocol,
        method,
        url,
        host,
        ...(port === undefined ? {} : { port }),
        status_code: status,
        blocked: true,
        block_reason: reason,
      }),
    );
  }

  /** A handler that threw unexpectedly: the guest gets a 502, the owner stays up. */
  private fail(res: ServerResponse, e: unknown): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    res.writeHead(502, { "content-type": "text/plain", connection: "close" });
    res.end(`matchlock: proxy error: ${messageOf(e)}\n`);
  }
}
