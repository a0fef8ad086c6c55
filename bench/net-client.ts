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
 */
import { randomBytes } from "node:crypto";
import { createSocket } from "node:dgram";
import { connect, createServer } from "node:net";
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

const [mode, a, b, c] = process.argv.slice(2);
if (mode === "download" && a && b) await download(a, b);
else if (mode === "connect" && a && b) await connects(a, Number(b));
else if (mode === "dns" && a && b && c) await dns(a, Number(b), c);
else if (mode === "serve" && a && b && c) serve(a, Number(b), Number(c));
else throw new Error("usage: net-client.ts download|connect|dns|serve … (see the header)");
