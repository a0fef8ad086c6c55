/**
 * bench/net's owner side, run by bench/net.ts inside the bench's host namespace (`ip netns exec`):
 * the real TCP relay (original destination + private floor), the real DNS server and the real
 * nftables table, on an interface that plays a VM's TAP (a veth whose peer is the "guest" namespace).
 *
 *   node bench/net-host.ts <iface> <gateway> <guest> <upstream resolver>
 *
 * Prints `ready <json ports>` once the table is applied; exits when stdin closes.
 */
import { DnsServer } from "../src/net/dns.ts";
import { PrivateFloor } from "../src/net/floor.ts";
import { applyTable, type HostNetSpec } from "../src/net/host-net.ts";
import { originalDestination } from "../src/net/original-dst.ts";
import { TcpRelay } from "../src/net/tcp-relay.ts";

const [tap, gateway, guest, upstream] = process.argv.slice(2);
if (!tap || !gateway || !guest || !upstream) {
  throw new Error("usage: net-host.ts <iface> <gateway> <guest> <upstream>");
}

const floor = new PrivateFloor();
const refuses = (ip: string) => floor.refuses(ip);
const dns = await DnsServer.listen({
  address: gateway,
  localHosts: new Map(),
  upstreams: [upstream],
  refuses,
});
const tcp = await TcpRelay.listen({ address: gateway, originalDestination, refuses });
const spec: HostNetSpec = {
  tap,
  gateway,
  guest,
  prefixLength: 24,
  mtu: 1500,
  owner: { pid: process.pid, start_time: 0 },
};
const ports = { dnsUdp: dns.udpPort, dnsTcp: dns.tcpPort, tcp: tcp.port };
await applyTable(spec, ports);

const stop = async () => {
  tcp.close();
  await dns.close();
  process.exit(0);
};
process.stdin.on("end", () => void stop());
process.stdin.on("error", () => void stop());
process.stdin.resume();
process.stdout.write(`ready ${JSON.stringify(ports)}\n`);
