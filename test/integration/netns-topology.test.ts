import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import {
  createTopology,
  execInNs,
  FAKE,
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
    assert.deepEqual(h, { kind: "http", server: FAKE.web, method: "GET", path: "/", bytes: 24 });
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
    assert.match(namespaces(), new RegExp(`^${extra.hostNs}\\b`, "m"));
    await extra.close();
    await extra.close();
    assert.doesNotMatch(namespaces(), new RegExp(`${extra.hostNs}|${extra.netNs}`));
    assert.ok(!existsSync(`/etc/netns/${extra.hostNs}`));
  });

  test("sweepStaleTopologies removes namespaces of dead test processes only", () => {
    const dead = spawnSync(node, ["-e", "process.stdout.write(String(process.pid))"], { encoding: "utf8" });
    const stale = `mlt-${Number(dead.stdout).toString(36)}-0-n`;
    spawnSync("ip", ["netns", "add", stale]);
    const swept = sweepStaleTopologies();
    assert.ok(swept.includes(stale));
    assert.ok(!swept.includes(t.hostNs));
    assert.doesNotMatch(namespaces(), new RegExp(stale));
    assert.match(namespaces(), new RegExp(t.hostNs));
  });
});
