import { createServer, type Server, type Socket } from "node:net";
import { MatchlockError, messageOf } from "../api/errors.ts";
import { type PortForward, validateAddress } from "../api/specs.ts";
import type { TcpIO, TcpStream } from "../guest/agent-client.ts";

/**
 * Port forwarding over the agent channel: a host listener per (address, local port); each accepted
 * connection becomes a TCP stream to the guest's loopback. Works with no NIC at all. Both
 * directions keep their half-close, so a response sent after the request's end arrives whole.
 */

export type { PortForward };

export interface PortBinding {
  address: string;
  localPort: number;
  remotePort: number;
}

/** Anything that can open a TCP stream to a guest port: the agent client, or a relay client. */
export type TcpConnector = (port: number, io: TcpIO) => Promise<TcpStream>;

/** Joins a host socket to a guest TCP stream until both directions are done. */
export async function bridge(sock: Socket, connect: TcpConnector, remotePort: number): Promise<void> {
  sock.pause();
  let stream: TcpStream | undefined;
  let earlyAcks = 0; // bytes delivered before connect() returned the stream
  const ack = (n: number) => {
    if (stream) stream.ack(n);
    else earlyAcks += n;
  };
  try {
    stream = await connect(remotePort, {
      onData: (d) => {
        const n = d.length;
        // Acknowledge once the bytes left for the client: the guest never runs ahead of it.
        sock.write(d, () => ack(n));
      },
      onEnd: () => sock.end(),
    });
  } catch {
    sock.destroy(); // the guest refused: so does the forward (the client sees a reset)
    return;
  }
  if (earlyAcks > 0) stream.ack(earlyAcks);
  const s = stream;
  sock.on("data", (chunk: Buffer) => {
    sock.pause();
    s.write(chunk).then(
      () => sock.resume(),
      () => sock.destroy(),
    );
  });
  sock.on("end", () => s.end());
  sock.on("error", () => s.abort());
  sock.on("close", (hadError) => {
    if (hadError) s.abort();
  });
  sock.resume();
  const errno = await s.closed.catch(() => -1);
  if (errno !== 0) sock.destroy();
  else if (!sock.writableEnded) sock.end();
}

export class PortForwarder {
  private readonly servers: Server[] = [];
  private readonly sockets = new Set<Socket>();
  private readonly connect: TcpConnector;

  constructor(connect: TcpConnector) {
    this.connect = connect;
  }

  /** Listens for every forward on every address; all or nothing. */
  async add(forwards: PortForward[], addresses: string[] = ["127.0.0.1"]): Promise<PortBinding[]> {
    const bindings: PortBinding[] = [];
    const opened: Server[] = [];
    try {
      for (const address of addresses.map(validateAddress)) {
        for (const f of forwards) {
          const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (sock) => {
            this.sockets.add(sock);
            sock.on("close", () => this.sockets.delete(sock));
            bridge(sock, this.connect, f.remotePort).catch(() => sock.destroy());
          });
          await new Promise<void>((resolve, reject) => {
            server.once("error", reject);
            server.listen(f.localPort, address, () => resolve());
          });
          opened.push(server);
          const port = (server.address() as { port: number }).port;
          bindings.push({ address, localPort: port, remotePort: f.remotePort });
        }
      }
    } catch (e) {
      for (const s of opened) s.close();
      throw new MatchlockError("VM_FAILED", `cannot listen for port forwarding: ${messageOf(e)}`);
    }
    this.servers.push(...opened);
    return bindings;
  }

  close(): void {
    for (const s of this.servers) s.close();
    for (const s of this.sockets) s.destroy();
    this.servers.length = 0;
  }
}
