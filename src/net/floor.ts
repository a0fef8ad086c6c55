import { BlockList, isIP } from "node:net";
import { networkInterfaces } from "node:os";
import { SUBNET_PREFIX } from "../state/subnets.ts";

/**
 * The private floor: addresses a guest may never reach through the host, in every network mode
 * (NETWORK.md §5). One function decides it for DNS answers and for every TCP dial, on the exact
 * address dialled. TEST-NET ranges (192.0.2/24, 198.51.100/24, 203.0.113/24) stay public on
 * purpose: the tests' fake internet lives there.
 */

interface Range {
  cidr: string;
  reason: string;
  /** Opened by `block_private_ips: false` (Matchlock's switch); the others only by an exact address. */
  liftable: boolean;
}

const V4: Range[] = [
  { cidr: "0.0.0.0/8", reason: "a 'this network' address (0.0.0.0/8)", liftable: false },
  { cidr: "127.0.0.0/8", reason: "loopback", liftable: false },
  { cidr: "169.254.169.254/32", reason: "the cloud metadata address", liftable: false },
  { cidr: `${SUBNET_PREFIX}.0.0/16`, reason: "a matchlock VM subnet", liftable: false },
  { cidr: "10.0.0.0/8", reason: "private (RFC 1918)", liftable: true },
  { cidr: "172.16.0.0/12", reason: "private (RFC 1918)", liftable: true },
  { cidr: "192.168.0.0/16", reason: "private (RFC 1918)", liftable: true },
  { cidr: "100.64.0.0/10", reason: "carrier-grade NAT (RFC 6598)", liftable: true },
  { cidr: "169.254.0.0/16", reason: "link-local", liftable: true },
  { cidr: "192.0.0.0/24", reason: "IETF protocol assignments (192.0.0.0/24)", liftable: false },
  { cidr: "198.18.0.0/15", reason: "benchmarking (198.18.0.0/15)", liftable: false },
  { cidr: "224.0.0.0/4", reason: "multicast", liftable: false },
  { cidr: "240.0.0.0/4", reason: "reserved (240.0.0.0/4)", liftable: false },
];

const V6: Range[] = [
  { cidr: "::/128", reason: "the unspecified address", liftable: false },
  { cidr: "::1/128", reason: "loopback", liftable: false },
  { cidr: "64:ff9b::/96", reason: "NAT64", liftable: false },
  { cidr: "64:ff9b:1::/48", reason: "NAT64", liftable: false },
  { cidr: "fc00::/7", reason: "unique local (ULA)", liftable: true },
  { cidr: "fe80::/10", reason: "link-local", liftable: true },
  { cidr: "fec0::/10", reason: "site-local", liftable: false },
  { cidr: "ff00::/8", reason: "multicast", liftable: false },
];

/** Each range with a one-entry BlockList, built once (first match wins: specific before general). */
function compile(ranges: Range[], family: "ipv4" | "ipv6"): Array<{ range: Range; list: BlockList }> {
  return ranges.map((range) => {
    const [net, bits] = range.cidr.split("/");
    const list = new BlockList();
    list.addSubnet(net as string, Number(bits), family);
    return { range, list };
  });
}
const COMPILED = { ipv4: compile(V4, "ipv4"), ipv6: compile(V6, "ipv6") };

function rangeOf(address: string, family: "ipv4" | "ipv6"): Range | undefined {
  return COMPILED[family].find((c) => c.list.check(address, family))?.range;
}

/** `::ffff:1.2.3.4` → `1.2.3.4`; anything else unchanged. */
function unmapV4(address: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return m?.[1] ?? address;
}

export interface FloorOptions {
  /** Exact addresses opened on purpose (`--allow-private-host`). */
  allowed?: readonly string[];
  /** Matchlock's `block_private_ips` (default true); false opens only the liftable ranges. */
  blockPrivate?: boolean;
  /** The host's own addresses; default: every interface of this network namespace, re-read each second. */
  hostAddresses?: () => Iterable<string>;
}

export function hostAddresses(): string[] {
  const out: string[] = [];
  for (const list of Object.values(networkInterfaces())) for (const a of list ?? []) out.push(a.address);
  return out;
}

/**
 * hostAddresses, re-read at most once a second: reading them costs ~16 syscalls and grows with the
 * host's interfaces (one TAP per VM), and the proxy checks twice per request (bench/net: -0.15 ms p50).
 */
let cached: { at: number; addrs: string[] } | undefined;
function recentHostAddresses(): string[] {
  const now = performance.now();
  if (!cached || now - cached.at > 1000) cached = { at: now, addrs: hostAddresses() };
  return cached.addrs;
}

export class PrivateFloor {
  private readonly allowed: Set<string>;
  private readonly blockPrivate: boolean;
  private readonly hostAddrs: () => Iterable<string>;

  constructor(opts: FloorOptions = {}) {
    this.allowed = new Set((opts.allowed ?? []).map((a) => unmapV4(a.toLowerCase())));
    this.blockPrivate = opts.blockPrivate ?? true;
    this.hostAddrs = opts.hostAddresses ?? recentHostAddresses;
  }

  /** Why the guest may not reach `address`, or undefined if it may. A non-address is refused. */
  refuses(address: string): string | undefined {
    const a = unmapV4(address.toLowerCase());
    const family = isIP(a);
    if (family === 0) return "not an IP address";
    if (this.allowed.has(a)) return undefined;
    for (const h of this.hostAddrs()) if (unmapV4(h.toLowerCase()) === a) return "an address of the host";
    const r = rangeOf(a, family === 4 ? "ipv4" : "ipv6");
    if (!r) return undefined;
    if (r.liftable && !this.blockPrivate) return undefined;
    return r.reason;
  }
}
