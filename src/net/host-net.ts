import { writeFile } from "node:fs/promises";
import { BlockList } from "node:net";
import { MatchlockError, messageOf } from "../api/errors.ts";
import { runCommand } from "../host/command.ts";
import type { ProcIdentity } from "../state/procs.ts";
import { TABLE_PREFIX, TAP_PREFIX, tableName } from "./names.ts";

/**
 * The host end of a VM's network: a TAP with the gateway address and one nftables table that sends
 * every guest flow to listeners of the owning process (NETWORK.md §2). Nothing is forwarded or
 * masqueraded, so the host's ip_forward does not matter and a dead owner leaves no open path.
 * `ip` and `nft` cost ~0.1 s per spawn here, so each step is one batch.
 */

export interface HostNetSpec {
  tap: string;
  gateway: string;
  guest: string;
  prefixLength: number;
  mtu: number;
  /** Written on the TAP (its alias) so `gc` can tell a live VM's TAP from a dead one's without records. */
  owner: ProcIdentity;
}

/** The owning process's listeners, all bound to the gateway address. */
export interface ListenerPorts {
  dnsUdp: number;
  dnsTcp: number;
  /** Every other guest TCP flow (relayed to its original destination when policy allows). */
  tcp: number;
  /** Intercept mode: the proxy's listeners for guest TCP 80 and 443. */
  http?: number;
  https?: number;
}

const OWNER_ALIAS = /^matchlock owner=(\d+):(\d+)$/;

/** One line: the tool's last complaint (`ioctl(TUNSETIFF): Operation not permitted`), not its whole output. */
function netError(what: string, e: unknown): MatchlockError {
  const last = messageOf(e)
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "" && !/^Command failed /.test(l)) // ip -batch's own trailer says nothing
    .pop();
  return new MatchlockError("NETWORK_FAILED", `${what}: ${last ?? "failed"}`, {
    cause: e,
    hint: "networking needs root (CAP_NET_ADMIN), iproute2 and nftables; `matchlock diagnose` checks them, or use --no-network",
  });
}

/**
 * Creates the TAP (no carrier until QEMU attaches, so no guest packet can arrive before the table
 * exists), gives it the gateway address and MTU, and turns IPv6 off on it. With `renameFrom`, an
 * existing TAP whose QEMU holds a paused guest (no packet either) becomes it instead.
 */
export async function createTap(spec: HostNetSpec, opts: { renameFrom?: string } = {}): Promise<void> {
  const batch = [
    // A clone made ahead of time (sandbox/prestart.ts) holds a TAP its QEMU made, down and without
    // an address: it takes this VM's name (possible while down), then the same settings.
    opts.renameFrom === undefined
      ? `tuntap add dev ${spec.tap} mode tap`
      : `link set dev ${opts.renameFrom} name ${spec.tap}`,
    `link set dev ${spec.tap} alias "matchlock owner=${spec.owner.pid}:${spec.owner.start_time}"`,
    `link set dev ${spec.tap} mtu ${spec.mtu}`,
    `addr add ${spec.gateway}/${spec.prefixLength} dev ${spec.tap}`,
    `link set dev ${spec.tap} up`,
  ];
  try {
    await runCommand("ip", ["-batch", "-"], { input: `${batch.join("\n")}\n`, errorCode: "NETWORK_FAILED" });
    await writeFile(`/proc/sys/net/ipv6/conf/${spec.tap}/disable_ipv6`, "1\n").catch(
      (e: NodeJS.ErrnoException) => {
        if (e.code !== "ENOENT") throw e; // no IPv6 in this kernel at all: nothing to turn off
      },
    );
  } catch (e) {
    throw netError(`creating the TAP ${spec.tap}`, e);
  }
}

/**
 * The VM's table (research §3.2): prerouting DNATs guest DNS (to any address) and every TCP flow
 * to our listeners; input accepts from the guest only those DNATed flows (`ct status dnat` stops a
 * guest that connects to a listener's port directly) and drops the rest, IPv6 included; forward
 * drops everything to or from the TAP.
 */
export function ruleset(spec: HostNetSpec, ports: ListenerPorts): string {
  const t = JSON.stringify(spec.tap);
  const gw = spec.gateway;
  const table = tableName(spec.tap);
  const proxied =
    ports.http !== undefined && ports.https !== undefined
      ? [
          `iifname ${t} tcp dport 80 dnat ip to ${gw}:${ports.http}`,
          `iifname ${t} tcp dport 443 dnat ip to ${gw}:${ports.https}`,
        ]
      : [];
  const tcpPorts = [ports.dnsTcp, ports.tcp, ...(proxied.length > 0 ? [ports.http, ports.https] : [])];
  return `table inet ${table} {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname ${t} udp dport 53 dnat ip to ${gw}:${ports.dnsUdp}
    iifname ${t} tcp dport 53 dnat ip to ${gw}:${ports.dnsTcp}
${proxied
  .map(
    (l) => `    ${l}
`,
  )
  .join("")}    iifname ${t} meta l4proto tcp dnat ip to ${gw}:${ports.tcp}
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname != ${t} accept
    meta nfproto ipv6 drop
    ip saddr != ${spec.guest} drop
    ct state established,related accept
    ct status dnat ip daddr ${gw} udp dport ${ports.dnsUdp} accept
    ct status dnat ip daddr ${gw} tcp dport { ${tcpPorts.join(", ")} } accept
    drop
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname ${t} drop
    oifname ${t} drop
  }
}
`;
}

/**
 * Applies the table in one transaction. A stale table of the same name (a dead VM's, not yet
 * swept) is replaced in the same transaction, never merged with.
 */
export async function applyTable(spec: HostNetSpec, ports: ListenerPorts): Promise<void> {
  const table = tableName(spec.tap);
  // `add` then `delete` makes the delete succeed whether or not the table existed (nft 1.0.6 has no `destroy`).
  const text = `add table inet ${table}\ndelete table inet ${table}\n${ruleset(spec, ports)}`;
  try {
    await runCommand("nft", ["-f", "-"], { input: text, errorCode: "NETWORK_FAILED" });
  } catch (e) {
    throw netError(`applying the nftables table ${table}`, e);
  }
}

/** Deletes the table in every family (Matchlock's tables are `ip`), ignoring ones that do not exist. */
export async function deleteTable(table: string): Promise<boolean> {
  // Ours are `inet`: one command in the usual case, the listing only when that was not it.
  const direct = await runCommand("nft", ["delete", "table", "inet", table], { allowFailure: true });
  if (direct.code === 0) return true;
  const existing = (await listTables()).filter((t) => t.name === table);
  if (existing.length === 0) return false;
  const text = existing.map((t) => `delete table ${t.family} ${t.name}`).join("\n");
  await runCommand("nft", ["-f", "-"], { input: `${text}\n`, errorCode: "NETWORK_FAILED" });
  return true;
}

/** Deletes the TAP; false if it did not exist. */
export async function deleteTap(tap: string): Promise<boolean> {
  const r = await runCommand("ip", ["link", "delete", "dev", tap], { allowFailure: true });
  if (r.code === 0) return true;
  if ((await listTaps()).some((l) => l.name === tap)) {
    throw new MatchlockError("NETWORK_FAILED", `ip link delete ${tap}: ${r.stderr.trim()}`);
  }
  return false;
}

export interface TapLink {
  name: string;
  /** From the alias we set; undefined for TAPs made by something else (Matchlock itself, an old build). */
  owner: ProcIdentity | undefined;
}

/** Every `fc-*` link in this network namespace. */
export async function listTaps(): Promise<TapLink[]> {
  const r = await runCommand("ip", ["-j", "link", "show"], { allowFailure: true });
  if (r.code !== 0) return [];
  let links: Array<{ ifname?: string; ifalias?: string }> = [];
  try {
    links = JSON.parse(r.stdout.toString("utf8")) as typeof links;
  } catch {
    return [];
  }
  return links
    .filter((l) => l.ifname?.startsWith(TAP_PREFIX))
    .map((l) => {
      const m = OWNER_ALIAS.exec(l.ifalias ?? "");
      return {
        name: l.ifname as string,
        owner: m ? { pid: Number(m[1]), start_time: Number(m[2]) } : undefined,
      };
    });
}

export interface NftTable {
  family: string;
  name: string;
}

/** Every `matchlock_*` table in this network namespace, in any family. */
export async function listTables(): Promise<NftTable[]> {
  const r = await runCommand("nft", ["-j", "list", "tables"], { allowFailure: true });
  if (r.code !== 0) return [];
  try {
    const doc = JSON.parse(r.stdout.toString("utf8")) as { nftables?: Array<{ table?: NftTable }> };
    return (doc.nftables ?? [])
      .flatMap((e) => (e.table ? [e.table] : []))
      .filter((t) => t.name.startsWith(TABLE_PREFIX));
  } catch {
    return [];
  }
}

/** The TAP a table belongs to: `matchlock_fc-x` and Matchlock's `matchlock_nat_fc-x` → `fc-x`. */
export function tapOfTable(table: string): string | undefined {
  const m = /^matchlock_(?:nat_)?(fc-[\w-]+)$/.exec(table);
  return m?.[1];
}

/**
 * A test for "does the host already route into this IPv4 subnet" (a VPN, Docker, another matchlock
 * home's VMs): a VM subnet overlapping a route would make the guest unreachable or capture traffic.
 * The default route does not count.
 */
export async function routedSubnets(): Promise<(subnet: string) => boolean> {
  const r = await runCommand("ip", ["-j", "-4", "route", "show", "table", "all"], { allowFailure: true });
  const routes = new BlockList();
  const nets: Array<[string, number]> = [];
  try {
    for (const e of JSON.parse(r.stdout.toString("utf8")) as Array<{ dst?: string; type?: string }>) {
      if (!e.dst || e.dst === "default" || (e.type !== undefined && e.type !== "unicast")) continue;
      const [net, bits] = e.dst.split("/");
      if (!net || !/^\d+\.\d+\.\d+\.\d+$/.test(net)) continue;
      const len = bits === undefined ? 32 : Number(bits);
      routes.addSubnet(net, len, "ipv4");
      nets.push([net, len]);
    }
  } catch {
    // no ip, or output we cannot read: assume nothing is routed (the TAP's own route then wins)
  }
  return (subnet) => {
    const [net, bits] = subnet.split("/");
    if (!net) return false;
    if (routes.check(net, "ipv4")) return true;
    const mine = new BlockList();
    mine.addSubnet(net, Number(bits ?? 32), "ipv4");
    return nets.some(([n]) => mine.check(n, "ipv4"));
  };
}

export interface BaseChain {
  family: string;
  table: string;
  name: string;
  hook: string;
  policy: string;
}

/** The base chains of other tables that drop by default on the input hook: they drop our DNATed flows. */
export async function droppingInputChains(): Promise<BaseChain[]> {
  const r = await runCommand("nft", ["-j", "list", "chains"], { allowFailure: true });
  if (r.code !== 0) return [];
  try {
    const doc = JSON.parse(r.stdout.toString("utf8")) as { nftables?: Array<{ chain?: Partial<BaseChain> }> };
    return (doc.nftables ?? [])
      .flatMap((e) => (e.chain ? [e.chain] : []))
      .filter((c): c is BaseChain => c.hook === "input" && c.policy === "drop" && !!c.table)
      .filter((c) => !c.table.startsWith(TABLE_PREFIX));
  } catch {
    return [];
  }
}
