import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { X509Certificate } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { connect, createServer, type DetailedPeerCertificate, type Server } from "node:tls";
import { isMatchlockError } from "../../src/api/errors.ts";
import { MitmCa } from "../../src/net/mitm-ca.ts";

const DAY = 24 * 3600 * 1000;

/** A TLS server on loopback whose certificates come from `ca`, one per SNI. */
async function serve(ca: MitmCa): Promise<Server> {
  const server = createServer({
    SNICallback: (name, done) => {
      ca.secureContext(name).then((ctx) => done(null, ctx), done);
    },
  });
  server.on("secureConnection", (s) => s.end("hi"));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return server;
}

interface Handshake {
  authorized: boolean;
  error: string | undefined;
  cert: DetailedPeerCertificate;
}

function handshake(server: Server, trusted: string, servername: string): Promise<Handshake> {
  const { port } = server.address() as AddressInfo;
  return new Promise((resolve, reject) => {
    const s = connect({ host: "127.0.0.1", port, ca: trusted, servername, rejectUnauthorized: false }, () => {
      const result = {
        authorized: s.authorized,
        error: s.authorizationError?.toString(),
        cert: s.getPeerCertificate(true),
      };
      s.destroy();
      resolve(result);
    });
    s.on("error", reject);
  });
}

/** Runs `openssl verify` on a leaf; returns its exit status and output. */
function opensslVerify(caPem: string, leafPem: string, extra: string[] = []): { ok: boolean; out: string } {
  const dir = mkdtempSync(join(tmpdir(), "mitm-ca-test-"));
  try {
    writeFileSync(join(dir, "ca.pem"), caPem);
    writeFileSync(join(dir, "leaf.pem"), leafPem);
    const out = execFileSync(
      "openssl",
      ["verify", "-CAfile", join(dir, "ca.pem"), ...extra, join(dir, "leaf.pem")],
      {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    return { ok: true, out };
  } catch (e) {
    const err = e as { stdout?: string; stderr?: string };
    return { ok: false, out: `${err.stdout ?? ""}${err.stderr ?? ""}` };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function text(pem: string): string {
  return execFileSync("openssl", ["x509", "-noout", "-text"], { input: pem, encoding: "utf8" });
}

describe("MitmCa", () => {
  let ca: MitmCa;
  let server: Server;

  before(async () => {
    ca = await MitmCa.create();
    server = await serve(ca);
  });
  after(() => server.close());

  test("the CA: P-256, Matchlock's name, CA:true pathlen 0 and certSign+cRLSign (critical), now−1 day to +10 years", () => {
    const cert = new X509Certificate(ca.certPem);
    assert.equal(cert.ca, true);
    assert.equal(cert.subject, "CN=Sandbox MITM CA\nO=Sandbox MITM CA");
    assert.equal(cert.issuer, cert.subject);
    assert.equal(cert.publicKey.asymmetricKeyDetails?.namedCurve, "prime256v1");
    assert.equal(cert.serialNumber.replace(/^00/, "").length, 32);
    const from = Date.parse(cert.validFrom);
    const to = Date.parse(cert.validTo);
    assert.ok(Math.abs(Date.now() - DAY - from) < 60_000, cert.validFrom);
    assert.ok(to - from > 3650 * DAY, cert.validTo);
    const t = text(ca.certPem);
    assert.match(t, /Basic Constraints: critical\s+CA:TRUE, pathlen:0/);
    assert.match(t, /Key Usage: critical\s+Certificate Sign, CRL Sign/);
    assert.match(t, /Subject Key Identifier/);
    assert.doesNotMatch(ca.certPem, /PRIVATE KEY/);
  });

  test("a real TLS handshake for an SNI is authorized by the CA, and the leaf names the SNI", async () => {
    const h = await handshake(server, ca.certPem, "api.example.com");
    assert.equal(h.error, undefined);
    assert.equal(h.authorized, true);
    assert.equal(h.cert.subjectaltname, "DNS:api.example.com");
    assert.equal(h.cert.subject.CN, "api.example.com");
    assert.equal(h.cert.issuerCertificate.subject.CN, "Sandbox MITM CA");
  });

  test("the leaf: serverAuth, digitalSignature, CA:false, authority key id, now−1 day to +1 year", async () => {
    const pem = await ca.leafPem("leaf.example.com");
    const cert = new X509Certificate(pem);
    assert.equal(cert.ca, false);
    assert.equal(cert.checkHost("leaf.example.com"), "leaf.example.com");
    assert.equal(cert.checkHost("other.example.com"), undefined);
    assert.deepEqual(cert.keyUsage, ["1.3.6.1.5.5.7.3.1"]);
    assert.equal(cert.checkIssued(new X509Certificate(ca.certPem)), true);
    const from = Date.parse(cert.validFrom);
    assert.ok(Math.abs(Date.now() - DAY - from) < 60_000, cert.validFrom);
    assert.ok(Math.abs(Date.parse(cert.validTo) - from - 366 * DAY) < 60_000, cert.validTo);
    const t = text(pem);
    assert.match(t, /Key Usage: critical\s+Digital Signature\n/);
    assert.match(t, /Basic Constraints: critical\s+CA:FALSE/);
    assert.match(t, /Authority Key Identifier/);
  });

  test("openssl verify -CAfile accepts the leaf for a TLS server and its host name", async () => {
    const r = opensslVerify(ca.certPem, await ca.leafPem("verify.example.com"), [
      "-purpose",
      "sslserver",
      "-verify_hostname",
      "verify.example.com",
    ]);
    assert.ok(r.ok, r.out);
    assert.match(r.out, /: OK/);
  });

  test("an IP literal gets an iPAddress SAN (the proxy names a SNI-less connection by its address)", async () => {
    for (const [ip, want] of [
      ["203.0.113.7", "IP Address:203.0.113.7"],
      ["2001:DB8::7", "IP Address:2001:DB8:0:0:0:0:0:7"],
    ] as const) {
      const pem = await ca.leafPem(ip);
      assert.equal(new X509Certificate(pem).subjectAltName, want);
      assert.ok(opensslVerify(ca.certPem, pem, ["-verify_ip", ip]).ok, ip);
    }
  });

  test("a name too long for a CN goes in a critical SAN alone, and still verifies", async () => {
    const name = `${"a".repeat(60)}.example.com`;
    const pem = await ca.leafPem(name);
    assert.ok(!new X509Certificate(pem).subject, "no CN, empty subject");
    assert.match(text(pem), /Subject Alternative Name: critical\s+DNS:a{60}\.example\.com/);
    assert.ok(opensslVerify(ca.certPem, pem, ["-verify_hostname", name]).ok);
    assert.equal((await handshake(server, ca.certPem, name)).authorized, true);
  });

  test("the same SNI gets the same context object, in any case and with a trailing dot", async () => {
    const a = await ca.secureContext("cache.example.com");
    assert.equal(await ca.secureContext("cache.example.com"), a);
    assert.equal(await ca.secureContext("CACHE.Example.com"), a);
    assert.equal(await ca.secureContext("cache.example.com."), a);
    assert.notEqual(await ca.secureContext("other.example.com"), a);
  });

  test("concurrent requests for one SNI share one minting", async () => {
    const all = await Promise.all(Array.from({ length: 20 }, () => ca.secureContext("burst.example.com")));
    for (const c of all) assert.equal(c, all[0]);
    const pems = await Promise.all([ca.leafPem("burst2.example.com"), ca.leafPem("BURST2.example.com")]);
    assert.equal(pems[0], pems[1]);
  });

  test("not a host name: refused with InvalidArgumentError, nothing minted", async () => {
    for (const bad of ["", "a b", "*.example.com", "evil.com/x", "a..b", "x".repeat(254), "fe80::1%eth0"]) {
      await assert.rejects(
        ca.secureContext(bad),
        (e: unknown) => isMatchlockError(e) && e.code === "INVALID_ARGUMENT",
        bad,
      );
    }
  });

  test("a second CA is a different CA: its leaves are not trusted by the first, nor the other way", async () => {
    const other = await MitmCa.create();
    assert.notEqual(other.certPem, ca.certPem);
    const otherLeaf = await other.leafPem("api.example.com");
    assert.equal(opensslVerify(ca.certPem, otherLeaf).ok, false);
    assert.equal(opensslVerify(other.certPem, await ca.leafPem("api.example.com")).ok, false);
    const otherServer = await serve(other);
    try {
      const h = await handshake(otherServer, ca.certPem, "api.example.com");
      assert.equal(h.authorized, false);
      assert.match(h.error ?? "", /UNABLE_TO_VERIFY_LEAF_SIGNATURE|unable to verify|self.signed/i);
      assert.equal((await handshake(otherServer, other.certPem, "api.example.com")).authorized, true);
    } finally {
      otherServer.close();
    }
  });
});

describe("MitmCa LRU", () => {
  test("beyond maxLeaves the least recently used context is evicted and minted anew", async () => {
    const ca = await MitmCa.create({ maxLeaves: 2 });
    const a = await ca.secureContext("a.example.com");
    const b = await ca.secureContext("b.example.com");
    assert.equal(await ca.secureContext("a.example.com"), a); // a is now the most recent
    await ca.secureContext("c.example.com"); // evicts b
    assert.equal(await ca.secureContext("a.example.com"), a);
    assert.notEqual(await ca.secureContext("b.example.com"), b); // minted again, evicting c
    assert.equal(await ca.secureContext("a.example.com"), a);
  });

  test("maxLeaves must be a positive integer", async () => {
    for (const maxLeaves of [0, -1, 1.5, Number.NaN]) {
      await assert.rejects(MitmCa.create({ maxLeaves }), /maxLeaves must be a positive integer/);
    }
  });
});
