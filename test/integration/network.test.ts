import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import { openState } from "../../src/state/store.ts";
import { CLI, type CliResult, REPO, tempHome } from "../helpers/cli.ts";
import { busyboxLayer, dockerSave, makeTar } from "../helpers/images.ts";
import { createTopology, FAKE, FAKE_PORTS, fakeBytes, type Topology } from "../helpers/netns.ts";
import { CRASH_PHASES, leftovers, listRows, networkLeftovers } from "../helpers/vms.ts";

/**
 * Networking from inside real VMs. Every matchlock process here runs in a test namespace whose only
 * link leads to the fake internet (test/helpers/netns.ts): nothing reaches the machine's uplink.
 */

const h = tempHome();
let t: Topology;

/** The CLI run inside the test's host namespace, as a user would run it there. */
async function ml(args: string[], extra: NodeJS.ProcessEnv = {}, timeoutMs = 180_000): Promise<CliResult> {
  const started = Date.now();
  const r = await t.execInHost(process.execPath, [CLI, ...args], { env: { ...h.env, ...extra }, timeoutMs });
  return { ...r, ms: Date.now() - started };
}

/** Runs a shell script in a running VM; its stdout (stderr appended, for messages). */
async function sh(id: string, script: string): Promise<string> {
  const r = await ml(["exec", id, "--", "sh", "-c", script]);
  return r.stdout.toString() + r.stderr;
}

async function startVm(flags: string[]): Promise<string> {
  const r = await ml(["run", "-d", ...flags, "--", "sleep", "3600"]);
  assert.equal(r.code, 0, r.stderr);
  return r.stdout.toString().trim();
}

function resources(id: string): Record<string, unknown> {
  const s = openState(paths(h.env));
  try {
    return s.lifecycle.current(id)?.resources as Record<string, unknown>;
  } finally {
    s.close();
  }
}

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

before(async () => {
  t = await createTopology();
});
after(async () => {
  await ml(["kill", "--all"]).catch(() => {});
  await ml(["gc"]).catch(() => {});
  await t?.close();
  h.cleanup();
});

describe("open mode (the default)", () => {
  let a: string;
  let b: string;
  before(async () => {
    // Two VMs at once: the default one, and one with every network option.
    [a, b] = await Promise.all([
      startVm([]),
      startVm([
        "--add-host",
        `db.internal:${FAKE.private}`,
        "--allow-private-host",
        FAKE.private,
        "--dns-servers",
        FAKE.resolver2,
        "--mtu",
        "1200",
        "--hostname",
        "box",
      ]),
    ]);
  });
  after(async () => {
    await Promise.all([ml(["kill", a]), ml(["kill", b])]);
  });

  test("HTTP to a fake-internet host by name and by address", async () => {
    const out = await sh(a, `wget -qO- http://example.test/ && wget -qO- http://${FAKE.web}/`);
    assert.equal(out, `hello from ${FAKE.web}\nhello from ${FAKE.web}\n`);
    await t.waitHit((x) => x.kind === "dns" && x.name === "example.test" && x.server === FAKE.resolver);
  });

  test("DNS goes through the gateway; a query to any other resolver lands on ours", async () => {
    const conf = await sh(a, "cat /etc/resolv.conf");
    const gw = resources(a).gateway_ip as string;
    assert.equal(conf, `nameserver ${gw}\n`);
    const out = await sh(a, "nslookup other.test; nslookup www.example.test 192.0.2.53");
    assert.match(out, new RegExp(`Address: ${FAKE.other.replaceAll(".", "\\.")}`));
    assert.match(out, new RegExp(`Address: ${FAKE.web.replaceAll(".", "\\.")}`));
    // 192.0.2.53 does not exist in the fake internet: the answer came from our resolver, which asked
    // the configured upstream.
    await t.waitHit((x) => x.kind === "dns" && x.name === "www.example.test" && x.server === FAKE.resolver);
  });

  test("AAAA is answered empty; a name answered with a private address is refused (rebinding)", async () => {
    const out = await sh(a, "nslookup -type=AAAA example.test; echo; nslookup rebind.test; echo rc=$?");
    assert.doesNotMatch(out, /has AAAA address|Address: [0-9a-f:]*:/i);
    assert.match(out, /rc=1/);
    assert.doesNotMatch(out, new RegExp(FAKE.private.replaceAll(".", "\\.")));
  });

  test("--add-host, --allow-private-host, --dns-servers, --mtu and --hostname", async () => {
    const out = await sh(
      b,
      'cat /etc/hosts; echo "host=$(hostname)"; cat /etc/hostname; ip link show eth0; ' +
        "wget -qO- http://db.internal/; nslookup other.test",
    );
    assert.match(out, /^127\.0\.0\.1\tlocalhost localhost\.localdomain box$/m);
    assert.match(out, /^10\.1\.2\.3\tdb\.internal$/m);
    assert.match(out, /^::1\tlocalhost ip6-localhost ip6-loopback$/m);
    assert.match(out, /^host=box$/m);
    assert.match(out, /^box$/m);
    assert.match(out, /eth0: .* mtu 1200 /);
    assert.match(out, /^private$/m, "the allowed private address is reachable");
    await t.waitHit((x) => x.kind === "http" && x.server === FAKE.private);
    await t.waitHit((x) => x.kind === "dns" && x.name === "other.test" && x.server === FAKE.resolver2);
  });

  /** Lines of the VM's net.log (refused flows and DNS answers, with reasons). */
  const netLog = (id: string) => readFileSync(join(h.home, "vms", id, "net.log"), "utf8");
  const re = (s: string) => s.replaceAll(".", "\\.");

  test("every private-floor range is refused, and nothing reaches the private server", async () => {
    const targets = [
      FAKE.private,
      "172.16.0.1",
      "192.168.1.1",
      "100.64.0.1",
      "169.254.169.254",
      "169.254.1.1",
      "198.18.0.1",
      "192.0.0.1",
      "0.1.2.3",
    ];
    const before = t.hits().filter((x) => x.kind === "http" && x.server === FAKE.private).length;
    // The relay accepts a flow before it knows where it was going, then resets it: wget sees a reset.
    // (No -T: busybox 1.35's wget crashes on a reset when it has a timeout.)
    const out = await sh(a, targets.map((ip) => `wget -qO- http://${ip}/; echo "${ip} rc=$?"`).join("; "));
    for (const ip of targets) assert.match(out, new RegExp(`^${re(ip)} rc=1$`, "m"), out);
    const log = netLog(a);
    for (const ip of targets) assert.match(log, new RegExp(`tcp ${re(ip)}:80 refused: `), log);
    assert.match(log, /tcp 10\.1\.2\.3:80 refused: private \(RFC 1918\)/);
    assert.match(log, /tcp 169\.254\.169\.254:80 refused: the cloud metadata address/);
    const afterHits = t.hits().filter((x) => x.kind === "http" && x.server === FAKE.private).length;
    assert.equal(afterHits, before, "the private server saw no request");
  });

  test("host services are refused through the gateway and through the host's own addresses", async () => {
    const gw = resources(a).gateway_ip as string;
    const out = await sh(
      a,
      `for ip in ${gw} ${FAKE.hostUplink}; do nc -w 5 $ip ${FAKE_PORTS.hostService} </dev/null; echo "$ip done"; done`,
    );
    // A reset may come before or after nc's connect completes; either way no byte of the service arrives.
    assert.match(out, new RegExp(`^${re(gw)} done$`, "m"));
    assert.match(out, new RegExp(`^${re(FAKE.hostUplink)} done$`, "m"));
    assert.doesNotMatch(out, /host-service/, "no byte from the host service");
    const log = netLog(a);
    assert.match(
      log,
      new RegExp(`tcp ${re(gw)}:${FAKE_PORTS.hostService} refused: an address of the host`),
      log,
    );
    assert.match(
      log,
      new RegExp(`tcp ${re(FAKE.hostUplink)}:${FAKE_PORTS.hostService} refused: an address of the host`),
      log,
    );
    assert.equal(t.hits().filter((x) => x.kind === "host-service").length, 0);
  });

  test("ICMP, non-DNS UDP and IPv6 carry nothing", async () => {
    const out = await sh(
      a,
      `ping -c 1 -W 2 ${FAKE.web} >/dev/null 2>&1; echo "ping rc=$?"; ` +
        `echo x > /tmp/x; tftp -p -l /tmp/x -r x ${FAKE.web} ${FAKE_PORTS.udpEcho} 2>/dev/null & sleep 3; kill $! 2>/dev/null; ` +
        `echo "v6 addrs=$(ip -6 addr show dev eth0 | grep -c inet6) routes=$(ip -6 route show dev eth0 | grep -c .)"; ` +
        `nc -w 3 2001:db8::1 80 </dev/null 2>/dev/null; echo "v6 rc=$?"; ` +
        // ULA and NAT64 targets cannot even leave the guest: it has no IPv6 route.
        `for ip in fd00::1 64:ff9b::cb00:710a; do nc -w 3 $ip 80 </dev/null 2>/dev/null; echo "$ip rc=$?"; done`,
    );
    for (const ip of ["fd00::1", "64:ff9b::cb00:710a"]) assert.match(out, new RegExp(`^${ip} rc=1$`, "m"));
    assert.match(out, /^ping rc=1$/m);
    assert.match(out, /^v6 addrs=0 routes=0$/m, "eth0 has no IPv6");
    assert.match(out, /^v6 rc=1$/m);
    assert.equal(t.hits().filter((x) => x.kind === "udp").length, 0, "the UDP echo server saw nothing");
  });

  test("16 MiB down and 16 MiB up arrive intact", async () => {
    const n = 16 * 1024 * 1024;
    const out = await sh(
      a,
      `wget -qO- http://${FAKE.web}/bytes/${n} | sha256sum; ` +
        `head -c ${n} /dev/urandom > /tmp/up; sha256sum < /tmp/up; nc ${FAKE.web} ${FAKE_PORTS.echo} < /tmp/up | sha256sum`,
    );
    const lines = out
      .trim()
      .split("\n")
      .map((l) => l.split(/\s+/)[0]);
    assert.equal(lines[0], sha256(fakeBytes(n)), out);
    assert.equal(lines[2], lines[1], `the echo came back intact: ${out}`);
  });

  test("a half-closed TCP flow is echoed to its end", async () => {
    const out = await sh(a, `printf 'one\\ntwo\\n' | nc ${FAKE.web} ${FAKE_PORTS.echo}`);
    assert.equal(out, "one\ntwo\n");
  });

  test("two VMs get different subnets and cannot reach each other", async () => {
    const ra = resources(a);
    const rb = resources(b);
    assert.notEqual(ra.subnet_cidr, rb.subnet_cidr);
    assert.match(ra.tap_name as string, /^fc-[0-9a-f]{8}$/);
    assert.equal(ra.firewall_table, `matchlock_${ra.tap_name}`);
    const out = await sh(b, "nc -l -p 8080 -e echo b-answers & sleep 1; echo listening");
    assert.match(out, /listening/);
    const tries = await sh(
      a,
      `wget -qO- http://${rb.guest_ip}:8080/; echo "guest rc=$?"; wget -qO- http://${rb.gateway_ip}/; echo "gw rc=$?"`,
    );
    assert.match(tries, /^guest rc=1$/m, tries);
    assert.match(tries, /^gw rc=1$/m, tries);
    assert.doesNotMatch(tries, /b-answers/);
    const log = netLog(a);
    assert.match(
      log,
      new RegExp(`tcp ${re(rb.guest_ip as string)}:8080 refused: a matchlock VM subnet`),
      log,
    );
  });
});

test("the SDK (RPC create with network fields) gets the same network", async () => {
  const program = `
    import { Client, Sandbox } from ${JSON.stringify(join(REPO, "dist", "sdk", "index.js"))};
    const c = new Client();
    await c.launch(new Sandbox().withHostname("sdkbox").withNetworkMTU(1300).withDNSServers(${JSON.stringify(FAKE.resolver2)})
      .addHost("db.internal", ${JSON.stringify(FAKE.private)}).allowPrivateHost(${JSON.stringify(FAKE.private)}).withBlockPrivateIPs(true));
    const r = await c.exec("hostname; ip link show eth0 | grep -o 'mtu [0-9]*'; wget -qO- http://db.internal/; wget -qO- http://example.test/");
    process.stdout.write(r.stdout);
    await c.close();
  `;
  const r = await t.execInHost(process.execPath, ["--input-type=module", "-e", program], {
    env: h.env,
    timeoutMs: 180_000,
  });
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.toString(), `sdkbox\nmtu 1300\nprivate\nhello from ${FAKE.web}\n`);
  await t.waitHit((x) => x.kind === "dns" && x.name === "example.test" && x.server === FAKE.resolver2);
});

test("without CAP_NET_ADMIN, run fails with one line saying why, and leaves nothing behind", async () => {
  const known = new Set(listRows((await ml(["list"])).stdout.toString()).keys());
  const r = await t.execInHost(
    "capsh",
    ["--drop=cap_net_admin", "--", "-c", 'exec "$0" "$@"', process.execPath, CLI, "run", "--", "true"],
    { env: h.env, timeoutMs: 120_000 },
  );
  assert.equal(r.code, 1);
  const lines = r.stderr.trim().split("\n");
  assert.match(
    lines[0] as string,
    /^matchlock: creating the TAP fc-[0-9a-f]{8}: .*(not permitted|Operation)/,
  );
  assert.match(r.stderr, /--no-network/);
  assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
  assert.deepEqual(
    [...listRows((await ml(["list"])).stdout.toString()).keys()].filter((k) => !known.has(k)),
    [],
  );
  const links = await t.execInHost("ip", ["-o", "link"]);
  assert.doesNotMatch(links.stdout.toString(), / fc-/, "no TAP left");
  const ok = await t.execInHost(
    "capsh",
    [
      "--drop=cap_net_admin",
      "--",
      "-c",
      'exec "$0" "$@"',
      process.execPath,
      CLI,
      "run",
      "--no-network",
      "--",
      "echo",
      "offline",
    ],
    { env: h.env, timeoutMs: 120_000 },
  );
  assert.equal(ok.stdout.toString(), "offline\n", ok.stderr);
});

test("original destination: getsockopt through koffi and the conntrack fallback agree", async () => {
  const program = `
    import { createServer, connect } from "node:net";
    import { execFileSync } from "node:child_process";
    import { viaConntrack, viaGetsockopt } from ${JSON.stringify(join(REPO, "src", "net", "original-dst.ts"))};
    const server = createServer(async (sock) => {
      const out = { ffi: viaGetsockopt(sock), ct: await viaConntrack(sock) };
      process.stdout.write(JSON.stringify(out));
      sock.destroy(); server.close();
      execFileSync("nft", ["delete", "table", "inet", "odtest"]);
    });
    server.listen(0, "127.0.0.1", () => {
      const port = server.address().port;
      execFileSync("nft", ["-f", "-"], { input: "table inet odtest { chain out { type nat hook output priority -100; ip daddr 192.0.2.77 tcp dport 7777 redirect to :" + port + "; }; }" });
      connect({ host: "192.0.2.77", port: 7777 }).on("error", () => {});
    });
  `;
  const r = await t.execInHost(process.execPath, ["--input-type=module", "-e", program], {
    timeoutMs: 30_000,
  });
  assert.equal(r.code, 0, r.stderr);
  const want = { address: "192.0.2.77", port: 7777 };
  assert.deepEqual(JSON.parse(r.stdout.toString()), { ffi: want, ct: want });
});

test("an image whose resolv.conf is a dangling symlink still resolves: DNS to any address lands on ours", async () => {
  const stub = await makeTar([
    { name: "etc/resolv.conf", type: "symlink", linkname: "../run/systemd/resolve/stub-resolv.conf" },
  ]);
  const archive = await dockerSave({ layers: [await busyboxLayer(), stub] }, "test/resolved:latest");
  const imp = await t.execInHost(process.execPath, [CLI, "image", "import", "test/resolved:latest"], {
    env: h.env,
    input: archive,
  });
  assert.equal(imp.code, 0, imp.stderr);
  const r = await ml(["run", "--image", "test/resolved:latest", "--", "busybox", "nslookup", "example.test"]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout.toString(), new RegExp(`Address: ${FAKE.web.replaceAll(".", "\\.")}`));
});

test("--no-network: loopback only, and no TAP, subnet row or table", async () => {
  const id = await startVm(["--no-network"]);
  try {
    const out = await sh(id, "ip -o link");
    const links = out.split("\n").filter((l) => /^\d+: /.test(l));
    assert.equal(links.length, 1, out);
    assert.match(links[0] as string, /^1: lo: /);
    assert.equal(resources(id).tap_name, undefined);
    const s = openState(paths(h.env));
    assert.equal(s.subnets.get(id), undefined);
    s.close();
    assert.deepEqual(networkLeftovers(id, t.hostNs), []);
  } finally {
    await ml(["kill", id]);
  }
});

describe("crash safety with networking on", () => {
  for (const [phase, cmd] of CRASH_PHASES) {
    test(`SIGKILL at ${phase}: gc leaves no TAP, table, listener or subnet row`, async () => {
      const env = { MATCHLOCK_TEST_CRASH_AT: phase, MATCHLOCK_TEST_NO_PDEATHSIG: "1" };
      const known = new Set(listRows((await ml(["list"])).stdout.toString()).keys());
      const r = await ml(["run", "--", ...cmd], env);
      assert.equal(r.signal, "SIGKILL", `the owner should have died at ${phase}: ${r.stderr}`);
      const id = [...listRows((await ml(["list"])).stdout.toString()).keys()].find((k) => !known.has(k));
      assert.ok(id, "the VM is recorded");
      const gc = await ml(["gc"]);
      assert.equal(gc.code, 0, gc.stdout.toString() + gc.stderr);
      assert.deepEqual(leftovers(h.env, id, t.hostNs), []);
      const listeners = await t.execInHost("ss", ["-Hltun"]);
      assert.doesNotMatch(listeners.stdout.toString(), /10\.99\./);
    });
  }

  test("run -d, SIGKILL of the owner, gc: everything goes, even with no record naming it", async () => {
    const id = (await ml(["run", "-d", "--", "sleep", "600"], { MATCHLOCK_TEST_NO_PDEATHSIG: "1" })).stdout
      .toString()
      .trim();
    const owner = openState(paths(h.env));
    const pid = owner.vms.get(id)?.pid as number;
    // The record goes too: the sweep finds the TAP and table by name and the dead owner in its alias.
    owner.lifecycle.remove(id);
    owner.vms.remove(id);
    owner.close();
    assert.deepEqual(networkLeftovers(id, t.hostNs).length, 2);
    process.kill(pid, "SIGKILL");
    await new Promise((r) => setTimeout(r, 200));
    const gc = await ml(["gc"]);
    assert.equal(gc.code, 0, gc.stderr);
    assert.match(gc.stdout.toString(), new RegExp(`${id}\\s+cleaned\\s+deleted orphan TAP fc-`));
    assert.deepEqual(networkLeftovers(id, t.hostNs), []);
  });
});

test("diagnose checks TAP creation, nftables, and an input firewall that would drop guest flows", async () => {
  const checks = async () => {
    const r = await ml(["diagnose", "--json"]);
    const doc = JSON.parse(r.stdout.toString()) as {
      checks: Array<{ name: string; status: string; fix?: string }>;
    };
    return new Map(doc.checks.map((c) => [c.name, c]));
  };
  const ok = await checks();
  assert.equal(ok.get("network: TAP")?.status, "ok");
  assert.equal(ok.get("network: nftables")?.status, "ok");
  assert.equal(ok.get("network: host firewall")?.status, "ok");
  const rules = "table inet hostfw { chain input { type filter hook input priority 0; policy drop; }; }";
  assert.equal((await t.execInHost("nft", ["-f", "-"], { input: rules })).code, 0);
  try {
    const warned = (await checks()).get("network: host firewall");
    assert.equal(warned?.status, "warn");
    assert.equal(warned?.fix, 'nft insert rule inet hostfw input iifname "fc-*" accept');
  } finally {
    await t.execInHost("nft", ["delete", "table", "inet", "hostfw"]);
  }
});
