/**
 * bench/net's owner side, run by bench/net.ts inside the bench's host namespace (`ip netns exec`):
 * the real TCP relay (original destination + private floor), the real DNS server and the real
 * nftables table, on an interface that plays a VM's TAP (a veth whose peer is the "guest" namespace).
 *
 *   node bench/net-host.ts <iface> <gateway> <guest> <upstream> [--host <name>=<ip>]… [--intercept <ca.pem>]
 *     [--rules <n>] [--callback <socket>]
 *
 * --host: a name the DNS server answers locally (as --add-host does), e.g. the bench's cheap HTTPS source.
 * --intercept: intercept mode, wired as src/net/vm-network.ts does: the same AllowList (example.test and
 *   *.example.test) decides DNS, the proxy and plain TCP; the InterceptProxy takes guest TCP 80 and 443, with
 *   a SecretBook of one secret (for api.example.test only, so every request is scanned for its placeholder
 *   and none is swapped) and a fresh MitmCa, whose certificate is written to <ca.pem> for the guest to trust.
 *   Upstream trust comes from NODE_EXTRA_CA_CERTS (the topology's CA), which bench/net.ts sets.
 * --rules n: n network hook rules (with --intercept): n − 1 before rules on example.test whose paths never
 *   match `/` (each is still checked) and one that sets a header on every request, as a real list would.
 * --callback <socket>: one before rule whose callback is served on <socket> (bench/net.ts serves it).
 *
 * Prints `ready <json ports>` once the table is applied; exits when stdin closes.
 */
import { writeFileSync } from "node:fs";
import { DnsServer } from "../src/net/dns.ts";
import { PrivateFloor } from "../src/net/floor.ts";
import { compileHooks } from "../src/net/hooks.ts";
import { applyTable, type HostNetSpec, type ListenerPorts } from "../src/net/host-net.ts";
import { AllowList } from "../src/net/host-policy.ts";
import { MitmCa } from "../src/net/mitm-ca.ts";
import { originalDestination } from "../src/net/original-dst.ts";
import { InterceptProxy } from "../src/net/proxy.ts";
import { newPlaceholder, SecretBook } from "../src/net/secrets.ts";
import { TcpRelay } from "../src/net/tcp-relay.ts";

const argv = process.argv.slice(2);
const [tap, gateway, guest, upstream] = argv;
if (!tap || !gateway || !guest || !upstream) {
  throw new Error(
    "usage: net-host.ts <iface> <gateway> <guest> <upstream> [--host name=ip]… [--intercept <ca.pem>]",
  );
}
const localHosts = new Map<string, string[]>();
let caOut: string | undefined;
let ruleCount = 0;
let callbackSocket: string | undefined;
for (let i = 4; i < argv.length; i += 2) {
  const [flag, value] = [argv[i], argv[i + 1]];
  const eq = value?.indexOf("=") ?? -1;
  if (flag === "--host" && value && eq > 0) localHosts.set(value.slice(0, eq), [value.slice(eq + 1)]);
  else if (flag === "--intercept" && value) caOut = value;
  else if (flag === "--rules" && value) ruleCount = Number(value);
  else if (flag === "--callback" && value) callbackSocket = value;
  else throw new Error(`net-host.ts: unexpected ${flag} ${value ?? ""}`);
}

const floor = new PrivateFloor();
const refuses = (ip: string) => floor.refuses(ip);
const policy =
  caOut === undefined
    ? undefined
    : {
        allow: new AllowList(["example.test", "*.example.test"]),
        secrets: new SecretBook([
          {
            name: "BENCH_KEY",
            value: "sk-bench-0123456789abcdef",
            placeholder: newPlaceholder(),
            hosts: ["api.example.test"],
          },
        ]),
        ca: await MitmCa.create(),
        hooks: compileHooks({
          rules: [
            ...Array.from({ length: Math.max(0, ruleCount - 1) }, (_, i) => ({
              hosts: ["example.test"],
              path: `/v1/r${i}/*`,
              action: "block",
            })),
            ...(ruleCount > 0 ? [{ hosts: ["*.test"], set_headers: { "X-Bench": "1" } }] : []),
            ...(callbackSocket === undefined ? [] : [{ callback_id: "bench" }]),
          ],
          ...(callbackSocket === undefined ? {} : { callback_socket: callbackSocket }),
        }),
      };
const dns = await DnsServer.listen({
  address: gateway,
  localHosts,
  upstreams: [upstream],
  refuses,
  ...(policy ? { allowName: (name: string) => policy.allow.allowsName(name) } : {}),
});
// vm-network.ts's plain-TCP rule in intercept mode: an allowed address, or one pinned to an allowed name.
const tcpRefuses = (ip: string): string | undefined => {
  const floorSays = floor.refuses(ip);
  if (floorSays !== undefined || !policy) return floorSays;
  if (policy.allow.allowsAddress(ip)) return undefined;
  if (dns.namesFor(ip).some((n) => policy.allow.allowsName(n))) return undefined;
  return "not in the allow-list";
};
const tcp = await TcpRelay.listen({ address: gateway, originalDestination, refuses: tcpRefuses });
let events = 0;
const proxy = policy
  ? await InterceptProxy.listen({
      address: gateway,
      allow: policy.allow,
      secrets: policy.secrets,
      ca: policy.ca,
      hooks: policy.hooks,
      resolve: (name) => dns.resolve4(name),
      refuses,
      passthrough: (s) => tcp.adopt(s),
      onEvent: () => {
        events++;
      },
    })
  : undefined;
const spec: HostNetSpec = {
  tap,
  gateway,
  guest,
  prefixLength: 24,
  mtu: 1500,
  owner: { pid: process.pid, start_time: 0 },
};
const ports: ListenerPorts = {
  dnsUdp: dns.udpPort,
  dnsTcp: dns.tcpPort,
  tcp: tcp.port,
  ...(proxy ? { http: proxy.httpPort, https: proxy.httpsPort } : {}),
};
await applyTable(spec, ports);
if (policy && caOut !== undefined) writeFileSync(caOut, policy.ca.certPem);

const stop = async () => {
  proxy?.close();
  tcp.close();
  await dns.close();
  if (proxy) process.stderr.write(`net-host: ${events} proxy events\n`);
  process.exit(0);
};
process.stdin.on("end", () => void stop());
process.stdin.on("error", () => void stop());
process.stdin.resume();
process.stdout.write(`ready ${JSON.stringify(ports)}\n`);
