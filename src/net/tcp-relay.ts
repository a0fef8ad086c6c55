import { connect, createServer, type Server, type Socket } from "node:net";
import type { Destination } from "./original-dst.ts";

/**
 * Open mode's TCP path: every guest TCP flow lands on this listener (nftables DNAT); the relay learns
 * where it was going, checks the private floor on that exact address, dials it from the host and
 * copies both ways. `pipe` gives back-pressure (a slow reader on either side stops the other), and
 * half-open sockets keep a half-close (shutdown(SHUT_WR)) a half-close. A refused flow is reset.
 */

export interface TcpFlowEvent {
  destination: Destination | undefined;
  /** Why the flow was refused; undefined for a relayed one. */
  refused?: string;
}

export interface TcpRelayOptions {
  /** The gateway address: the listener is reachable only through the TAP. */
  address: string;
  originalDestination: (socket: Socket) => Promise<Destination | undefined>;
  /** Why the guest may not reach this address (the private floor), or undefined. */
  refuses: (address: string) => string | undefined;
  onFlow?: (e: TcpFlowEvent) => void;
  connectTimeoutMs?: number;
  /** Flows at once; past it new ones are reset (a guest cannot exhaust the host's sockets). */
  maxFlows?: number;
}

/**
 * Binds a listener to `address` on a free port and returns the port. After that, accept errors
 * (EMFILE…) are ignored: a guest that exhausts descriptors must not take the owner down.
 */
export async function listenOn(server: Server, address: string): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen({ host: address, port: 0 }, () => {
      server.off("error", reject);
      resolve();
    });
  });
  server.on("error", () => {});
  const a = server.address();
  return typeof a === "object" && a ? a.port : 0;
}

export class TcpRelay {
  readonly port: number;
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();
  private readonly opts: TcpRelayOptions;

  private constructor(server: Server, port: number, opts: TcpRelayOptions) {
    this.server = server;
    this.port = port;
    this.opts = opts;
  }

  static async listen(opts: TcpRelayOptions): Promise<TcpRelay> {
    const server = createServer({ allowHalfOpen: true, noDelay: true });
    const relay = new TcpRelay(server, await listenOn(server, opts.address), opts);
    server.on("connection", (guest) => relay.adopt(guest));
    return relay;
  }

  /** Relays a guest flow accepted elsewhere (the proxy's TLS flows with no server name). */
  adopt(guest: Socket): void {
    this.handle(guest, this.opts).catch(() => guest.destroy());
  }

  private track(s: Socket): void {
    this.sockets.add(s);
    s.once("close", () => this.sockets.delete(s));
  }

  private async handle(guest: Socket, opts: TcpRelayOptions): Promise<void> {
    guest.on("error", () => {});
    this.track(guest);
    if (this.sockets.size > 2 * (opts.maxFlows ?? 1024)) {
      guest.resetAndDestroy();
      return;
    }
    guest.pause();
    const dst = await opts.originalDestination(guest);
    const refused = dst === undefined ? "its original destination is unknown" : opts.refuses(dst.address);
    if (refused !== undefined || dst === undefined) {
      opts.onFlow?.({ destination: dst, refused });
      guest.resetAndDestroy();
      return;
    }
    const upstream = connect({ host: dst.address, port: dst.port, allowHalfOpen: true, noDelay: true });
    upstream.on("error", () => {});
    this.track(upstream);
    const timer = setTimeout(() => upstream.destroy(), opts.connectTimeoutMs ?? 30_000);
    upstream.once("connect", () => {
      clearTimeout(timer);
      opts.onFlow?.({ destination: dst });
      guest.pipe(upstream);
      upstream.pipe(guest);
      guest.resume();
    });
    // Any error or a close before both ends finished: reset the other side, as a router would.
    const abort = (other: Socket) => () => {
      clearTimeout(timer);
      if (!other.destroyed) other.resetAndDestroy();
    };
    upstream.once("close", (hadError) => {
      if (hadError || !upstream.readableEnded) abort(guest)();
    });
    guest.once("close", (hadError) => {
      if (hadError || !guest.readableEnded) abort(upstream)();
    });
  }

  close(): void {
    this.server.close();
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }
}
