import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { parseSandboxConfig } from "../../src/api/config.ts";
import { paths } from "../../src/api/paths.ts";
import { parseAddHost, parseDnsServers, parsePrivateHost } from "../../src/api/specs.ts";
import { PrivateFloor } from "../../src/net/floor.ts";
import { ruleset, tapOfTable } from "../../src/net/host-net.ts";
import { macAddress, tableName, tapName } from "../../src/net/names.ts";
import { findInConntrack } from "../../src/net/original-dst.ts";
import { hostsFile } from "../../src/sandbox/etc-files.ts";
import { openState } from "../../src/state/store.ts";
import { qemuArgv } from "../../src/vm/qemu/argv.ts";

describe("private floor", () => {
  const floor = new PrivateFloor({ hostAddresses: () => ["198.51.100.1", "fe80::1"] });

  test("refuses every private, loopback, metadata and special range", () => {
    for (const ip of [
      "0.0.0.0",
      "0.1.2.3",
      "127.0.0.1",
      "127.255.0.9",
      "10.1.2.3",
      "172.16.0.1",
      "172.31.255.255",
      "192.168.1.1",
      "100.64.0.1",
      "100.127.255.254",
      "169.254.1.1",
      "169.254.169.254",
      "192.0.0.8",
      "198.18.0.1",
      "224.0.0.1",
      "239.255.255.250",
      "240.0.0.1",
      "255.255.255.255",
      "10.99.3.1",
      "::",
      "::1",
      "::ffff:127.0.0.1",
      "::FFFF:10.0.0.1",
      "64:ff9b::a00:1",
      "64:ff9b:1::1",
      "fc00::1",
      "fd12:3456::1",
      "fe80::2",
      "fec0::1",
      "ff02::1",
    ]) {
      assert.notEqual(floor.refuses(ip), undefined, ip);
    }
  });

  test("lets public addresses and the TEST-NET ranges through", () => {
    for (const ip of [
      "203.0.113.10",
      "198.51.100.2",
      "192.0.2.1",
      "8.8.8.8",
      "1.1.1.1",
      "2001:db8::1",
      "172.32.0.1",
      "100.128.0.1",
      "::ffff:203.0.113.10",
    ]) {
      assert.equal(floor.refuses(ip), undefined, ip);
    }
  });

  test("the host's own addresses are refused, with their reason", () => {
    assert.equal(floor.refuses("198.51.100.1"), "an address of the host");
    assert.equal(floor.refuses("::ffff:198.51.100.1"), "an address of the host");
  });

  test("a non-address is refused", () => {
    assert.equal(floor.refuses("example.test"), "not an IP address");
    assert.equal(floor.refuses(""), "not an IP address");
  });

  test("--allow-private-host opens exactly one address", () => {
    const f = new PrivateFloor({ allowed: ["10.1.2.3", "127.0.0.1"], hostAddresses: () => [] });
    assert.equal(f.refuses("10.1.2.3"), undefined);
    assert.equal(f.refuses("::ffff:10.1.2.3"), undefined);
    assert.equal(f.refuses("127.0.0.1"), undefined);
    assert.equal(f.refuses("10.1.2.4"), "private (RFC 1918)");
  });

  test("block_private_ips=false opens RFC 1918, CGNAT, link-local and ULA only", () => {
    const f = new PrivateFloor({ blockPrivate: false, hostAddresses: () => ["192.168.1.5"] });
    for (const ip of ["10.1.2.3", "172.16.0.1", "192.168.0.1", "100.64.0.1", "169.254.1.1", "fd00::1"]) {
      assert.equal(f.refuses(ip), undefined, ip);
    }
    for (const ip of ["127.0.0.1", "169.254.169.254", "192.168.1.5", "10.99.1.1", "::1", "224.0.0.1"]) {
      assert.notEqual(f.refuses(ip), undefined, ip);
    }
  });
});

describe("network names", () => {
  test("TAP, table and MAC follow Matchlock", () => {
    assert.equal(tapName("vm-0a1b2c3d"), "fc-0a1b2c3d");
    assert.equal(tableName("fc-0a1b2c3d"), "matchlock_fc-0a1b2c3d");
    assert.match(macAddress("vm-0a1b2c3d"), /^AA:FC:[0-9A-F]{2}:[0-9A-F]{2}:[0-9A-F]{2}:[0-9A-F]{2}$/);
    assert.notEqual(macAddress("vm-0a1b2c3d"), macAddress("vm-0a1b2c3e"));
    assert.equal(macAddress("vm-0a1b2c3d"), macAddress("vm-0a1b2c3d"));
    assert.equal(tapOfTable("matchlock_fc-0a1b2c3d"), "fc-0a1b2c3d");
    assert.equal(tapOfTable("matchlock_nat_fc-0a1b2c3d"), "fc-0a1b2c3d");
    assert.equal(tapOfTable("matchlock_other"), undefined);
  });
});

describe("nftables ruleset", () => {
  const spec = {
    tap: "fc-0a1b2c3d",
    gateway: "10.99.7.1",
    guest: "10.99.7.2",
    prefixLength: 24,
    mtu: 1500,
    owner: { pid: 1, start_time: 1 },
  };
  const text = ruleset(spec, { dnsUdp: 40001, dnsTcp: 40002, tcp: 40003 });

  test("DNATs DNS to any address and every TCP flow to the gateway's listeners", () => {
    assert.match(text, /table inet matchlock_fc-0a1b2c3d/);
    assert.match(text, /iifname "fc-0a1b2c3d" udp dport 53 dnat ip to 10\.99\.7\.1:40001/);
    assert.match(text, /iifname "fc-0a1b2c3d" tcp dport 53 dnat ip to 10\.99\.7\.1:40002/);
    assert.match(text, /iifname "fc-0a1b2c3d" meta l4proto tcp dnat ip to 10\.99\.7\.1:40003/);
    // DNS over TCP is matched before the catch-all TCP rule
    assert.ok(text.indexOf("tcp dport 53") < text.indexOf("meta l4proto tcp"));
  });

  test("input accepts only DNATed flows from the guest's address; forward drops both ways", () => {
    assert.match(text, /ip saddr != 10\.99\.7\.2 drop/);
    assert.match(text, /meta nfproto ipv6 drop/);
    assert.match(text, /ct status dnat ip daddr 10\.99\.7\.1 udp dport 40001 accept/);
    assert.match(text, /ct status dnat ip daddr 10\.99\.7\.1 tcp dport \{ 40002, 40003 \} accept/);
    assert.match(text, /chain forward \{[^}]*iifname "fc-0a1b2c3d" drop\s+oifname "fc-0a1b2c3d" drop/);
    assert.doesNotMatch(text, /masquerade|snat/);
  });
});

describe("original destination from conntrack", () => {
  const table = [
    "ipv4     2 tcp      6 431999 ESTABLISHED src=10.99.7.2 dst=203.0.113.10 sport=40000 dport=2222 src=10.99.7.1 dst=10.99.7.2 sport=40003 dport=40000 [ASSURED] mark=0 zone=0 use=2",
    "ipv4     2 udp      17 29 src=10.99.7.2 dst=8.8.8.8 sport=5353 dport=53 src=10.99.7.1 dst=10.99.7.2 sport=40001 dport=5353 mark=0 zone=0 use=2",
    "ipv4     2 tcp      6 431999 ESTABLISHED src=10.99.7.2 dst=203.0.113.66 sport=40001 dport=80 src=10.99.7.1 dst=10.99.7.2 sport=40003 dport=40001 [ASSURED] mark=0 zone=0 use=2",
  ].join("\n");

  test("the entry whose reply goes from our listener to the guest's port", () => {
    const flow = { guest: "10.99.7.2", listener: "10.99.7.1", listenerPort: 40003 };
    assert.deepEqual(findInConntrack(table, { ...flow, guestPort: 40000 }), {
      address: "203.0.113.10",
      port: 2222,
    });
    assert.deepEqual(findInConntrack(table, { ...flow, guestPort: 40001 }), {
      address: "203.0.113.66",
      port: 80,
    });
    assert.equal(findInConntrack(table, { ...flow, guestPort: 5353 }), undefined);
  });
});

describe("network flags and config", () => {
  test("--add-host, --dns-servers and --allow-private-host parse or name the bad value", () => {
    assert.deepEqual(parseAddHost("db.internal:10.1.2.3"), { host: "db.internal", ip: "10.1.2.3" });
    assert.deepEqual(parseAddHost("v6:2001:db8::1"), { host: "v6", ip: "2001:db8::1" });
    assert.throws(() => parseAddHost("db.internal"), /invalid --add-host "db.internal"/);
    assert.throws(() => parseAddHost("bad host:10.1.2.3"), /invalid --add-host/);
    assert.throws(() => parseAddHost("x:not-an-ip"), /invalid --add-host/);
    assert.deepEqual(parseDnsServers(["198.51.100.53,198.51.100.2", "1.1.1.1"]), [
      "198.51.100.53",
      "198.51.100.2",
      "1.1.1.1",
    ]);
    assert.throws(() => parseDnsServers(["dns.example"]), /invalid --dns-servers entry "dns.example"/);
    assert.equal(parsePrivateHost("10.1.2.3"), "10.1.2.3");
    assert.throws(() => parsePrivateHost("10.1.2.0/24"), /one IP address/);
  });

  test("RPC configs with hostile network values are refused naming the field", () => {
    const bad: Array<[unknown, RegExp]> = [
      [{ network: { hostname: "a\n10.0.0.1 evil" } }, /network\.hostname/],
      [{ network: { add_hosts: [{ host: "x y", ip: "10.1.2.3" }] } }, /network\.add_hosts\.0\.host/],
      [{ network: { add_hosts: [{ host: "x", ip: "10.1.2.3\n" }] } }, /network\.add_hosts\.0\.ip/],
      [{ network: { dns_servers: ["8.8.8.8 # x"] } }, /network\.dns_servers\.0/],
      [{ network: { allow_private_hosts: ["10.0.0.0/8"] } }, /network\.allow_private_hosts\.0/],
      [{ network: { mtu: 100 } }, /network\.mtu/],
    ];
    for (const [input, re] of bad) assert.throws(() => parseSandboxConfig(input), re, JSON.stringify(input));
    const ok = parseSandboxConfig({ network: { dns_servers: null, add_hosts: null, hostname: "" } });
    assert.deepEqual(ok.network.dns_servers, []);
  });

  test("/etc/hosts has Matchlock's layout", () => {
    assert.equal(
      hostsFile("box", [{ host: "db.internal", ip: "10.1.2.3" }]),
      "127.0.0.1\tlocalhost localhost.localdomain box\n10.1.2.3\tdb.internal\n" +
        "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
  });

  test("QEMU gets a virtio-net NIC on the TAP only when asked", () => {
    const spec = {
      id: "vm-0a1b2c3d",
      dir: "/tmp/x",
      kernel: "k",
      initramfs: "i",
      kernelArgs: [],
      cpus: 1,
      memoryMb: 256,
      disks: [],
      accel: "tcg" as const,
    };
    const paths = { agentSocket: "a", qmpSocket: "q", vfsSocket: "v", consoleLog: "c" };
    const withNic = qemuArgv(
      { ...spec, nic: { tap: "fc-0a1b2c3d", mac: "AA:FC:00:00:00:01" } },
      paths,
      undefined,
    );
    assert.ok(withNic.includes("tap,id=net0,ifname=fc-0a1b2c3d,script=no,downscript=no"));
    assert.ok(withNic.includes("virtio-net-device,netdev=net0,mac=AA:FC:00:00:00:01"));
    assert.ok(!qemuArgv(spec, paths, undefined).includes("-netdev"));
  });
});

describe("subnet allocation", () => {
  test("passes over routed subnets, and says so when none is left", () => {
    const home = mkdtempSync(join(tmpdir(), "matchlock-subnet-"));
    const s = openState(paths({ MATCHLOCK_HOME: home, MATCHLOCK_CACHE: join(home, "cache") }));
    try {
      const routed = new Set(["10.99.1.0/24", "10.99.2.0/24"]);
      assert.equal(s.subnets.allocate("vm-00000001", (n) => routed.has(n)).subnet, "10.99.3.0/24");
      assert.equal(s.subnets.allocate("vm-00000002").subnet, "10.99.1.0/24");
      assert.throws(
        () => s.subnets.allocate("vm-00000003", () => true),
        (e: Error & { code?: string }) => e.code === "NETWORK_FAILED" && /no free subnet/.test(e.message),
      );
    } finally {
      s.close();
      rmSync(home, { recursive: true, force: true });
    }
  });
});
