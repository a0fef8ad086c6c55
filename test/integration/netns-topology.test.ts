import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import {
  createTopology,
  execInNs,
  FAKE,
  FAKE_API_KEY,
  FAKE_PORTS,
  fakeBytes,
  sweepStaleTopologies,
  type Topology,
} from "../helpers/netns.ts";

/** The fake internet itself, without any VM: its servers answer, and nothing leaves its two namespaces. */

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
const node = process.execPath;
const namespaces = () => spawnSync("ip", ["netns", "list"], { encoding: "utf8" }).stdout;

/** A TCP client in a namespace: sends `send`, half-closes, prints what came back, or `ERR <code>`. */
const TCP_CLIENT = `
const [host, port, send, ms] = process.argv.slice(1);
const s = require("node:net").connect({ host, port: Number(port), allowHalfOpen: true });
const got = [];
s.on("connect", () => s.end(send));
s.on("data", (d) => got.push(d));
s.on("end", () => { process.stdout.write(Buffer.concat(got)); process.exit(0); });
s.on("error", (e) => { process.stdout.write("ERR " + e.code); process.exit(2); });
setTimeout(() => { process.stdout.write("ERR timeout"); process.exit(3); }, Number(ms));
`;

/** Streams a URL with fetch; prints the content type and each chunk with its arrival time (ms from start). */
const SSE_CLIENT = `
const started = Date.now();
const res = await fetch(process.argv[1]);
const events = [];
const dec = new TextDecoder();
for await (const chunk of res.body) events.push([Date.now() - started, dec.decode(chunk)]);
process.stdout.write(JSON.stringify({ type: res.headers.get("content-type"), events }));
`;

describe("netns topology (the fake internet)", () => {
  let t: Topology;
  before(async () => {
    t = await createTopology();
  });
  after(async () => {
    await t?.close();
  });

  test("HTTP from the host namespace: hello line, logged as a hit", async () => {
    const r = await t.execInHost("curl", ["-sS", `http://${FAKE.web}/`]);
    assert.equal(r.stdout.toString(), `hello from ${FAKE.web}\n`, r.stderr);
    const h = await t.waitHit((h) => h.kind === "http" && h.path === "/");
    assert.deepEqual(h, {
      kind: "http",
      server: FAKE.web,
      method: "GET",
      path: "/",
      bytes: 24,
      scheme: "http",
      host: FAKE.web,
      headers: {
        host: FAKE.web,
        "user-agent": h.kind === "http" ? h.headers["user-agent"] : "",
        accept: "*/*",
      },
    });
    assert.match(h.kind === "http" ? (h.headers["user-agent"] ?? "") : "", /^curl\//);
    const other = await t.execInHost("curl", ["-sS", `http://${FAKE.other}/`]);
    assert.equal(other.stdout.toString(), `hello from ${FAKE.other}\n`);
    const priv = await t.execInHost("curl", ["-sS", `http://${FAKE.private}/x`]);
    assert.equal(priv.stdout.toString(), "private\n");
    await t.waitHit((h) => h.kind === "http" && h.server === FAKE.private && h.path === "/x");
  });

  test("DNS on both resolvers, UDP and TCP, with every query logged", async () => {
    const dig = async (...args: string[]) =>
      (await t.execInHost("dig", ["+short", ...args])).stdout.toString();
    assert.equal(await dig(`@${FAKE.resolver}`, "example.test"), `${FAKE.web}\n`);
    await t.waitHit((h) => h.kind === "dns" && h.name === "example.test" && h.server === FAKE.resolver);
    assert.equal(await dig(`@${FAKE.resolver2}`, "+tcp", "Other.Test"), `${FAKE.other}\n`);
    assert.ok(
      t.hits().some((h) => h.kind === "dns" && h.name === "other.test" && h.server === FAKE.resolver2),
    );
    assert.equal(await dig("alias.test"), `example.test.\n${FAKE.web}\n`); // via /etc/netns/<hostNs>/resolv.conf
    assert.equal(await dig("rebind.test"), `${FAKE.private}\n`);
    assert.equal(await dig("api.example.test"), `${FAKE.web}\n`);
    assert.equal(await dig("deadbeef.attacker.test"), `${FAKE.other}\n`);
    assert.equal(await dig("a.b.attacker.test"), `${FAKE.other}\n`);
    assert.ok(t.hits().some((h) => h.kind === "dns" && h.name === "deadbeef.attacker.test"));
    assert.equal(await dig("AAAA", "example.test"), "");
    const nx = await t.execInHost("dig", [`@${FAKE.resolver}`, "nope.test"]);
    assert.match(nx.stdout.toString(), /status: NXDOMAIN/);
    assert.ok(t.hits().some((h) => h.kind === "dns" && h.name === "nope.test" && h.type === "A"));
  });

  test("TCP echo with half-close, and UDP echo", async () => {
    const payload = "x".repeat(100_000);
    const r = await t.execInHost(node, ["-e", TCP_CLIENT, FAKE.web, "2222", payload, "5000"]);
    assert.equal(r.stdout.toString(), payload, r.stderr);
    await t.waitHit((h) => h.kind === "tcp-echo" && h.server === FAKE.web && h.peer === FAKE.hostUplink);
    const udp = await t.execInHost(node, [
      "-e",
      `const s = require("node:dgram").createSocket("udp4");
       s.on("message", (m) => { process.stdout.write(m); s.close(); });
       s.send("ping", 9999, "${FAKE.web}");
       setTimeout(() => process.exit(3), 3000).unref();`,
    ]);
    assert.equal(udp.stdout.toString(), "ping");
    await t.waitHit((h) => h.kind === "udp" && h.peer === FAKE.hostUplink);
  });

  test("16 MiB each way: /bytes matches fakeBytes, /sha256 matches the body sent", async () => {
    const n = 16 * 1024 * 1024;
    const down = await t.execInHost("curl", ["-sS", `http://${FAKE.web}/bytes/${n}`]);
    assert.equal(down.stdout.length, n, down.stderr);
    assert.equal(sha(down.stdout), sha(fakeBytes(n)));
    const body = randomBytes(n);
    const up = await t.execInHost("curl", ["-sS", "--data-binary", "@-", `http://${FAKE.web}/sha256`], {
      input: body,
    });
    assert.equal(up.stdout.toString(), `${sha(body)} ${n}\n`, up.stderr);
    await t.waitHit((h) => h.kind === "http" && h.method === "POST" && h.bytes === n);
    assert.ok(t.hits().some((h) => h.kind === "http" && h.path === `/bytes/${n}` && h.bytes === n));
    // The pattern is the same whatever the offset a chunk starts at.
    assert.deepEqual(fakeBytes(10, 7), fakeBytes(17).subarray(7));
  });

  test("HTTPS on both servers with the topology's CA: SNI, Host and headers in the hits", async () => {
    const curl = (url: string, ...args: string[]) =>
      t.execInHost("curl", ["-sS", "--cacert", t.caFile, ...args, url]);
    const web = await curl("https://example.test/");
    assert.equal(web.stdout.toString(), `hello from ${FAKE.web}\n`, web.stderr);
    const tls = await t.waitHit((h) => h.kind === "tls" && h.sni === "example.test");
    assert.deepEqual(tls, { kind: "tls", server: FAKE.web, sni: "example.test" });
    const h = await t.waitHit((h) => h.kind === "http" && h.scheme === "https" && h.path === "/");
    assert.ok(h.kind === "http");
    assert.equal(h.server, FAKE.web);
    assert.equal(h.host, "example.test");
    assert.equal(h.sni, "example.test");
    assert.equal(h.headers.host, "example.test");
    assert.equal(h.bytes, `hello from ${FAKE.web}\n`.length);

    // The other server, by a name under a wildcard, by its address (no SNI), and by the attacker's names.
    // www.other.test is not in the zone: curl's --resolve pins it to FAKE.other (the cert's *.other.test).
    const other = await curl("https://www.other.test/", "--resolve", `www.other.test:443:${FAKE.other}`);
    assert.equal(other.stdout.toString(), `hello from ${FAKE.other}\n`, other.stderr);
    await curl("https://x.attacker.test/");
    await t.waitHit((h) => h.kind === "http" && h.server === FAKE.other && h.sni === "x.attacker.test");
    const byIp = await curl(`https://${FAKE.other}:${FAKE_PORTS.https}/query?a=1&b=%20x`);
    assert.deepEqual(JSON.parse(byIp.stdout.toString()), { query: "a=1&b=%20x" }, byIp.stderr);
    const ipHit = await t.waitHit((h) => h.kind === "http" && h.path.startsWith("/query"));
    assert.ok(ipHit.kind === "http" && ipHit.sni === undefined && ipHit.host === FAKE.other);
    assert.ok(!("sni" in ipHit));

    // /bytes over HTTPS, like over HTTP.
    const n = 1024 * 1024 + 3;
    const down = await curl(`https://api.example.test/bytes/${n}`);
    assert.equal(sha(down.stdout), sha(fakeBytes(n)), down.stderr);
    await t.waitHit(
      (h) => h.kind === "http" && h.scheme === "https" && h.path === `/bytes/${n}` && h.bytes === n,
    );
    // And a 404 for anything else.
    const nf = await curl("https://example.test/nope", "-w", "%{http_code}", "-o", "/dev/null");
    assert.equal(nf.stdout.toString(), "404");
  });

  test("HTTPS without the CA fails, and the failed handshake is a tls hit", async () => {
    const r = await t.execInHost("curl", ["-sS", "https://other.test/"]);
    assert.equal(r.code, 60, r.stderr); // certificate problem
    const h = await t.waitHit((h) => h.kind === "tls" && h.sni === "other.test" && h.error !== undefined);
    assert.equal(h.kind === "tls" && h.server, FAKE.other);
    assert.ok(!t.hits().some((h) => h.kind === "http" && h.sni === "other.test"), "no request made it");
  });

  test("a bare TLS handshake, and a bare TCP connect, are each a tls hit", async () => {
    const before = t.hits().length;
    const r = await t.execInHost("sh", [
      "-c",
      `openssl s_client -connect ${FAKE.other}:443 -servername deadbeef.attacker.test -CAfile ${t.caFile} ` +
        "-verify_return_error </dev/null 2>&1",
    ]);
    assert.equal(r.code, 0, r.stdout.toString());
    assert.match(r.stdout.toString(), /Verify return code: 0 \(ok\)/);
    const h = await t.waitHit((h) => h.kind === "tls" && h.sni === "deadbeef.attacker.test");
    assert.deepEqual(h, { kind: "tls", server: FAKE.other, sni: "deadbeef.attacker.test" });
    const tcp = await t.execInHost(node, ["-e", TCP_CLIENT, FAKE.web, "443", "", "3000"]);
    assert.equal(tcp.code, 0, tcp.stdout.toString());
    await t.waitHit((h) => h.kind === "tls" && h.server === FAKE.web && h.error !== undefined);
    const mine = t.hits().slice(before);
    assert.ok(!mine.some((h) => h.kind === "http"), "no request on either connection");
  });

  test("/model accepts only the right key, GET or POST, over HTTP and HTTPS", async () => {
    const call = async (url: string, ...args: string[]) => {
      const r = await t.execInHost("curl", [
        "-sS",
        "--cacert",
        t.caFile,
        "-w",
        " %{http_code}",
        ...args,
        url,
      ]);
      return r.stdout.toString();
    };
    const good = `Authorization: Bearer ${FAKE_API_KEY}`;
    const ok = `${JSON.stringify({ ok: true, model: "fake" })}\n 200`;
    const bad = `${JSON.stringify({ error: "bad key" })}\n 401`;
    assert.equal(await call("https://api.example.test/model", "-H", good, "--data-binary", "{}"), ok);
    assert.equal(await call("https://api.example.test/model", "-H", good), ok);
    assert.equal(await call(`http://${FAKE.web}/model`, "-H", good), ok);
    assert.equal(
      await call("https://api.example.test/model", "-H", "Authorization: Bearer sk-test-FAKE"),
      bad,
    );
    assert.equal(await call("https://api.example.test/model", "-H", `Authorization: ${FAKE_API_KEY}`), bad);
    assert.equal(await call("https://api.example.test/model"), bad);
    // The key twice is not the key.
    assert.equal(await call("https://api.example.test/model", "-H", good, "-H", good), bad);
    const post = await t.waitHit((h) => h.kind === "http" && h.method === "POST" && h.path === "/model");
    assert.ok(
      post.kind === "http" && post.bytes === 2 && post.headers.authorization === `Bearer ${FAKE_API_KEY}`,
    );
  });

  test("/headers echoes the request headers, and the authorization header as x-echo-authorization", async () => {
    /** curl -i: the response head, then the body. */
    const split = (out: Buffer) => {
      const [head = "", body = ""] = out.toString().split("\r\n\r\n");
      return { head, body: JSON.parse(body) as Record<string, string> };
    };
    const r = await t.execInHost("curl", [
      "-sSi",
      "--cacert",
      t.caFile,
      "-H",
      "Authorization: Bearer abc",
      "-H",
      "X-Thing: 1",
      "-H",
      "x-thing: 2",
      "https://example.test/headers",
    ]);
    const { head, body } = split(r.stdout);
    assert.equal(body.authorization, "Bearer abc");
    assert.equal(body["x-thing"], "1, 2");
    assert.equal(body.host, "example.test");
    assert.match(head, /^x-echo-authorization: Bearer abc\r$/m);
    const h = await t.waitHit((h) => h.kind === "http" && h.path === "/headers");
    assert.ok(h.kind === "http");
    assert.deepEqual(h.headers, body);
    const plain = split((await t.execInHost("curl", ["-sSi", `http://${FAKE.other}/headers`])).stdout);
    assert.equal(plain.body.host, FAKE.other);
    assert.doesNotMatch(plain.head, /x-echo-authorization/i);
  });

  test("/sse flushes each event as it is written", async () => {
    const r = await t.execInHost(node, ["-e", SSE_CLIENT, "https://api.example.test/sse?n=5&gapMs=300"], {
      env: { ...process.env, NODE_EXTRA_CA_CERTS: t.caFile },
    });
    assert.equal(r.code, 0, r.stderr);
    const got = JSON.parse(r.stdout.toString()) as { type: string; events: Array<[number, string]> };
    assert.match(got.type, /^text\/event-stream/);
    assert.deepEqual(
      got.events.map(([, d]) => d).join(""),
      [0, 1, 2, 3, 4].map((i) => `data: event ${i}\n\n`).join(""),
    );
    const first = got.events[0]?.[0] ?? Number.NaN;
    const last = got.events.at(-1)?.[0] ?? Number.NaN;
    assert.ok(last - first >= 900, `first event at ${first} ms, last at ${last} ms: not streamed`);
    const defaults = await t.execInHost("curl", ["-sS", "-N", `http://${FAKE.web}/sse`]);
    assert.equal(defaults.stdout.toString().split("\n\n").length, 6);
  });

  test("the host service listens on every address of the host namespace", async () => {
    const fromNet = await execInNs(t.netNs, node, ["-e", TCP_CLIENT, FAKE.hostUplink, "2223", "", "3000"]);
    assert.equal(fromNet.stdout.toString(), "host-service\n", fromNet.stderr);
    await t.waitHit((h) => h.kind === "host-service" && h.peer === FAKE.resolver);
    const local = await t.execInHost(node, ["-e", TCP_CLIENT, "127.0.0.1", "2223", "", "3000"]);
    assert.equal(local.stdout.toString(), "host-service\n");
  });

  test("isolation: the host namespace has lo and up0 only, and the real internet is unreachable", async () => {
    const links = (await t.execInHost("ip", ["-o", "link"])).stdout
      .toString()
      .trim()
      .split("\n")
      .map((l) => l.split(": ")[1]?.split("@")[0]);
    assert.deepEqual(links, ["lo", "up0"]);
    const netLinks = (await execInNs(t.netNs, "ip", ["-o", "link"])).stdout.toString().trim().split("\n");
    assert.equal(netLinks.length, 2);
    const route = (await t.execInHost("ip", ["route", "get", "8.8.8.8"])).stdout.toString();
    assert.match(route, new RegExp(`via ${FAKE.resolver.replaceAll(".", "\\.")} dev up0`));
    const started = Date.now();
    const dial = await t.execInHost(node, ["-e", TCP_CLIENT, "8.8.8.8", "53", "", "3000"]);
    assert.match(dial.stdout.toString(), /^ERR /, "a TCP connect to 8.8.8.8:53 must fail");
    assert.equal(dial.code, 2, `fails fast with an ICMP error, not a timeout: ${dial.stdout}`);
    assert.ok(Date.now() - started < 3000);
  });

  test("close() removes both namespaces and /etc/netns/<hostNs>; a second close() is a no-op", async () => {
    const extra = await createTopology();
    assert.ok(existsSync(`/etc/netns/${extra.hostNs}/resolv.conf`));
    assert.ok(existsSync(extra.caFile));
    assert.notEqual(extra.caFile, t.caFile);
    assert.match(namespaces(), new RegExp(`^${extra.hostNs}\\b`, "m"));
    await extra.close();
    await extra.close();
    assert.doesNotMatch(namespaces(), new RegExp(`${extra.hostNs}|${extra.netNs}`));
    assert.ok(!existsSync(`/etc/netns/${extra.hostNs}`));
    assert.ok(!existsSync(dirname(extra.caFile)), "the CA's directory is gone");
  });

  test("sweepStaleTopologies removes namespaces (and CA dirs) of dead test processes only", () => {
    const dead = spawnSync(node, ["-e", "process.stdout.write(String(process.pid))"], { encoding: "utf8" });
    const stale = `mlt-${Number(dead.stdout).toString(36)}-0-n`;
    spawnSync("ip", ["netns", "add", stale]);
    const stalePki = join(tmpdir(), `mlt-${Number(dead.stdout).toString(36)}-0-pki`);
    mkdirSync(stalePki, { recursive: true });
    const swept = sweepStaleTopologies();
    assert.ok(swept.includes(stale));
    assert.ok(!swept.includes(t.hostNs));
    assert.doesNotMatch(namespaces(), new RegExp(stale));
    assert.match(namespaces(), new RegExp(t.hostNs));
    assert.ok(!existsSync(stalePki));
    assert.ok(existsSync(t.caFile));
  });
});
