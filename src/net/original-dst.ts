import { readFile } from "node:fs/promises";
import type { Socket } from "node:net";
import { loadLibc } from "../host/libc.ts";

/**
 * Where a DNATed guest flow was going before nftables redirected it to our listener. Node cannot ask
 * for SO_ORIGINAL_DST, so it goes through an FFI to libc's getsockopt (koffi: maintained, prebuilt
 * for every platform on npm, no compiler needed at install); if that cannot load, the conntrack
 * table in /proc is searched instead (slower: linear in the table's size).
 */

export interface Destination {
  address: string;
  port: number;
}

const SOL_IP = 0;
const SO_ORIGINAL_DST = 80;
const AF_INET = 2;

type GetSockOpt = (fd: number, level: number, name: number, val: Buffer, len: Buffer) => number;

let getsockopt: GetSockOpt | null | undefined;

function loadGetsockopt(): GetSockOpt | null {
  if (getsockopt !== undefined) return getsockopt;
  try {
    getsockopt = loadLibc().func("int getsockopt(int, int, int, void *, void *)") as GetSockOpt;
  } catch {
    getsockopt = null;
  }
  return getsockopt;
}

/** The socket's file descriptor; Node keeps it on the (undocumented, stable on Linux) handle. */
function fdOf(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : undefined;
}

/** SO_ORIGINAL_DST through the FFI; undefined if koffi cannot load or the socket was not NATed. */
export function viaGetsockopt(socket: Socket): Destination | undefined {
  const fn = loadGetsockopt();
  const fd = fdOf(socket);
  if (!fn || fd === undefined) return undefined;
  const addr = Buffer.alloc(16);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(addr.length);
  if (fn(fd, SOL_IP, SO_ORIGINAL_DST, addr, len) !== 0) return undefined;
  if (addr.readUInt16LE(0) !== AF_INET) return undefined;
  return { address: [...addr.subarray(4, 8)].join("."), port: addr.readUInt16BE(2) };
}

/**
 * The conntrack entry whose reply tuple is (our listener → the guest's port): its first tuple is
 * the original one.
 */
export function findInConntrack(
  table: string,
  flow: { guest: string; guestPort: number; listener: string; listenerPort: number },
): Destination | undefined {
  const reply = `src=${flow.listener} dst=${flow.guest} sport=${flow.listenerPort} dport=${flow.guestPort}`;
  for (const line of table.split("\n")) {
    if (!line.includes(" tcp ") || !line.includes(reply)) continue;
    const m = /src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)/.exec(line);
    if (m && m[1] === flow.guest && Number(m[3]) === flow.guestPort) {
      return { address: m[2] as string, port: Number(m[4]) };
    }
  }
  return undefined;
}

/** The fallback: the conntrack table in /proc (needs CONFIG_NF_CONNTRACK_PROCFS). */
export async function viaConntrack(socket: Socket): Promise<Destination | undefined> {
  const { remoteAddress, remotePort, localAddress, localPort } = socket;
  if (!remoteAddress || !remotePort || !localAddress || !localPort) return undefined;
  let table: string;
  try {
    table = await readFile("/proc/net/nf_conntrack", "utf8");
  } catch {
    return undefined;
  }
  return findInConntrack(table, {
    guest: remoteAddress,
    guestPort: remotePort,
    listener: localAddress,
    listenerPort: localPort,
  });
}

export async function originalDestination(socket: Socket): Promise<Destination | undefined> {
  return viaGetsockopt(socket) ?? (await viaConntrack(socket));
}
