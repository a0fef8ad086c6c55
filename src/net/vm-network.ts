import { appendFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { isIPv4 } from "node:net";
import type { SandboxConfig } from "../api/config.ts";
import type { NetworkEvent } from "../api/events.ts";
import { networkEvent } from "../api/events.ts";
import type { ProcIdentity } from "../state/procs.ts";
import type { SubnetAllocation } from "../state/subnets.ts";
import { DnsServer, upstreamsFromResolvConf } from "./dns.ts";
import { PrivateFloor } from "./floor.ts";
import type { NetworkHooks } from "./hooks.ts";
import { applyTable, createTap, type HostNetSpec } from "./host-net.ts";
import type { AllowList } from "./host-policy.ts";
import type { MitmCa } from "./mitm-ca.ts";
import { macAddress, tableName, tapName } from "./names.ts";
import { originalDestination } from "./original-dst.ts";
import type { InterceptProxy } from "./proxy.ts";
import type { SecretBook } from "./secrets.ts";
import { TcpRelay } from "./tcp-relay.ts";

/**
 * A VM's network from the owner's side: the TAP and table (host-net.ts), and the DNS server and TCP
 * relay listening on the gateway; in intercept mode also the HTTP/HTTPS proxy, with the allow-list
 * deciding DNS, proxy and plain TCP alike (one AllowList object, so a runtime change applies to all
 * three at once). The host objects are removed by the cleanup steps (they must go even when the
 * owner is dead); `close` stops the listeners.
 */

export type NetworkConfig = SandboxConfig["network"];

export interface NetworkPlan {
  tap: string;
  table: string;
  mac: string;
  gateway: string;
  guest: string;
  subnet: string;
  prefixLength: number;
  mtu: number;
}

export function planNetwork(vmId: string, alloc: SubnetAllocation, mtu: number): NetworkPlan {
  const tap = tapName(vmId);
  return {
    tap,
    table: tableName(tap),
    mac: macAddress(vmId),
    gateway: alloc.gateway_ip,
    guest: alloc.guest_ip,
    subnet: alloc.subnet,
    prefixLength: Number(alloc.subnet.split("/")[1] ?? 24),
    mtu,
  };
}

/** What the guest's agent needs to configure eth0 (the kernel has no `ip=` autoconfig). */
export function guestKernelArg(plan: NetworkPlan): string {
  return `matchlock.net=${plan.guest}/${plan.prefixLength},${plan.gateway},${plan.mtu}`;
}

/** The resolvers DNS forwards to: `dns_servers`, else the host's /etc/resolv.conf. */
export async function upstreamResolvers(config: NetworkConfig): Promise<string[]> {
  if (config.dns_servers.length > 0) return [...config.dns_servers];
  try {
    return upstreamsFromResolvConf(await readFile("/etc/resolv.conf", "utf8"));
  } catch {
    return [];
  }
}

/** `add_hosts` as DNS answers: name → its IPv4 addresses. */
export function localHostsOf(config: NetworkConfig): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const { host, ip } of config.add_hosts) {
    if (!isIPv4(ip)) continue; // the guest has no IPv6; /etc/hosts still lists it
    const name = host.toLowerCase().replace(/\.$/, "");
    out.set(name, [...(out.get(name) ?? []), ip]);
  }
  return out;
}

/** At most this many lines of refused flows per VM in net.log: a guest cannot fill the disk. */
const LOG_LINES = 10_000;

/** Keys seen in the last `ms` milliseconds (bounded: a flood of distinct keys only forgets sooner). */
class RecentKeys {
  private readonly seenAt = new Map<string, number>();
  private readonly ms: number;
  constructor(ms: number) {
    this.ms = ms;
  }
  seen(key: string): boolean {
    const now = Date.now();
    const at = this.seenAt.get(key);
    if (at !== undefined && now - at < this.ms) return true;
    if (this.seenAt.size >= 1024) this.seenAt.clear();
    this.seenAt.set(key, now);
    return false;
  }
}

/** Intercept mode's policy: present, the proxy runs and every name and address is checked. */
export interface InterceptPolicy {
  allow: AllowList;
  secrets: SecretBook;
  ca: MitmCa;
  /** Network hooks (`network.interception`), run by the proxy. */
  hooks?: NetworkHooks;
}

export interface VmNetworkOptions {
  config: NetworkConfig;
  owner: ProcIdentity;
  logFile?: string;
  intercept?: InterceptPolicy;
  /** Every allow/deny decision (intercept mode), and refused flows in any mode. */
  onEvent?: (e: NetworkEvent) => void;
  /**
   * The TAP of a clone made ahead of time (sandbox/prestart.ts), made by its QEMU: renamed to the
   * plan's TAP instead of creating one. It is not persistent: it goes when that QEMU exits.
   */
  adoptTap?: string;
}

export class VmNetwork {
  readonly plan: NetworkPlan;
  readonly floor: PrivateFloor;
  /** Undefined in open mode. */
  readonly intercept: InterceptPolicy | undefined;
  private readonly dns: DnsServer;
  private readonly tcp: TcpRelay;
  private readonly proxy: InterceptProxy | undefined;
  private readonly spec: HostNetSpec;

  private constructor(
    spec: HostNetSpec,
    plan: NetworkPlan,
    floor: PrivateFloor,
    dns: DnsServer,
    tcp: TcpRelay,
    proxy: InterceptProxy | undefined,
    intercept: InterceptPolicy | undefined,
  ) {
    this.spec = spec;
    this.plan = plan;
    this.floor = floor;
    this.dns = dns;
    this.tcp = tcp;
    this.proxy = proxy;
    this.intercept = intercept;
  }

  /**
   * TAP, then listeners on its gateway address, then the table that routes the guest to them: in
   * this order no guest packet ever meets an unfiltered interface (the TAP has no carrier until QEMU
   * starts; an adopted TAP's QEMU holds a guest that stays paused until the sandbox resumes it,
   * after this). On failure, the listeners are closed; the TAP and table are the cleanup steps' job.
   */
  static async start(plan: NetworkPlan, opts: VmNetworkOptions): Promise<VmNetwork> {
    const spec: HostNetSpec = {
      tap: plan.tap,
      gateway: plan.gateway,
      guest: plan.guest,
      prefixLength: plan.prefixLength,
      mtu: plan.mtu,
      owner: opts.owner,
    };
    let lines = 0;
    const log = (line: string) => {
      if (!opts.logFile || lines > LOG_LINES) return;
      lines++;
      const text = lines > LOG_LINES ? "(more refused flows: not logged)" : line;
      try {
        appendFileSync(opts.logFile, `${new Date().toISOString()} ${text}\n`);
      } catch {}
    };
    await createTap(spec, opts.adoptTap === undefined ? {} : { renameFrom: opts.adoptTap });
    const floor = new PrivateFloor({
      allowed: opts.config.allow_private_hosts,
      blockPrivate: opts.config.block_private_ips,
    });
    const refuses = (ip: string) => floor.refuses(ip);
    const policy = opts.intercept;
    const recentDns = new RecentKeys(2000);
    const emit = opts.onEvent ?? (() => {});
    const dns = await DnsServer.listen({
      address: plan.gateway,
      localHosts: localHostsOf(opts.config),
      upstreams: await upstreamResolvers(opts.config),
      refuses,
      ...(policy ? { allowName: (name: string) => policy.allow.allowsName(name) } : {}),
      onBlocked: (e) => {
        // A resolver asks A and AAAA (and retries): one decision, one line.
        if (recentDns.seen(`${e.name} ${e.reason}`)) return;
        log(`dns ${e.name}: ${e.reason}`);
        emit(
          networkEvent({
            protocol: "dns",
            method: "",
            url: "",
            host: e.name,
            blocked: true,
            block_reason: e.reason,
          }),
        );
      },
    });
    /**
     * Plain TCP in intercept mode (research §5.3): allowed toward an address the list names, or one
     * our DNS answered for an allowed name (so `git@github.com:22` works with --allow-host github.com);
     * an empty list allows every public address (Matchlock). The floor applies in every case.
     */
    const tcpRefuses = (ip: string): string | undefined => {
      const floorSays = floor.refuses(ip);
      if (floorSays !== undefined || !policy) return floorSays;
      if (policy.allow.allowsAddress(ip)) return undefined;
      if (dns.namesFor(ip).some((n) => policy.allow.allowsName(n))) return undefined;
      return "not in the allow-list (neither the address nor a name resolved to it is allowed)";
    };
    let tcp: TcpRelay | undefined;
    let proxy: InterceptProxy | undefined;
    try {
      tcp = await TcpRelay.listen({
        address: plan.gateway,
        originalDestination,
        refuses: tcpRefuses,
        onFlow: (e) => {
          const d = e.destination;
          if (e.refused !== undefined) log(`tcp ${d ? `${d.address}:${d.port}` : "?"} refused: ${e.refused}`);
          if (e.refused === undefined && !policy) return; // open mode: only refusals are news
          emit(
            networkEvent({
              protocol: "tcp",
              method: "",
              url: "",
              host: d?.address ?? "?",
              ...(d ? { port: d.port } : {}),
              blocked: e.refused !== undefined,
              ...(e.refused === undefined ? {} : { block_reason: e.refused }),
            }),
          );
        },
      });
      const relay = tcp;
      if (policy) {
        // Loaded here, in intercept mode only: TLS, HTTP and the hooks cost ~50 ms of module loading,
        // which every other `run` would pay.
        const { InterceptProxy } = await import("./proxy.ts");
        proxy = await InterceptProxy.listen({
          address: plan.gateway,
          allow: policy.allow,
          secrets: policy.secrets,
          ca: policy.ca,
          ...(policy.hooks === undefined ? {} : { hooks: policy.hooks }),
          resolve: (name) => dns.resolve4(name),
          refuses,
          passthrough: (s) => relay.adopt(s),
          onEvent: emit,
        });
      }
      await applyTable(spec, {
        dnsUdp: dns.udpPort,
        dnsTcp: dns.tcpPort,
        tcp: tcp.port,
        ...(proxy ? { http: proxy.httpPort, https: proxy.httpsPort } : {}),
      });
    } catch (e) {
      proxy?.close();
      tcp?.close();
      await dns.close();
      throw e;
    }
    return new VmNetwork(spec, plan, floor, dns, tcp, proxy, policy);
  }

  /**
   * Makes the TAP again, same name and address (the table matches it by name): an adopted TAP
   * (`adoptTap`) went with its QEMU, and the cold boot that replaces a failed restore needs one.
   */
  async recreateTap(): Promise<void> {
    await createTap(this.spec);
  }

  /** QEMU's NIC: virtio-net on the TAP, with Matchlock's MAC. */
  get nic(): { tap: string; mac: string } {
    return { tap: this.plan.tap, mac: this.plan.mac };
  }

  async close(): Promise<void> {
    this.proxy?.close();
    this.tcp.close();
    await this.dns.close();
  }
}
