import { createPrivateKey, randomBytes, webcrypto } from "node:crypto";
import { isIP } from "node:net";
import { createSecureContext, type SecureContext } from "node:tls";
// tsyringe, which @peculiar/x509 uses, needs the Reflect metadata polyfill loaded before it.
import "reflect-metadata";
import * as x509 from "@peculiar/x509";
import { InvalidArgumentError } from "../api/errors.ts";
import { canonicalAddress } from "./host-policy.ts";

/**
 * The per-VM certificate authority of intercept mode (NETWORK.md §6, research §5.4): a P-256 CA
 * that lives only in this process's memory, and leaf certificates minted for each SNI the guest
 * dials. Nothing here touches the disk.
 */

const NAME = "Sandbox MITM CA"; // Matchlock's CN and O, so guests and docs written for it still read right
const DAY = 24 * 3600 * 1000;
const EC = { name: "ECDSA", namedCurve: "P-256" } as const;
const SIGN = { name: "ECDSA", hash: "SHA-256" } as const;
/** RFC 5280's ub-common-name: a longer name goes in the SAN alone. */
const MAX_CN = 64;

const crypto = webcrypto;
type CryptoKey = webcrypto.CryptoKey;

function serial(): string {
  return randomBytes(16).toString("hex");
}

/** PKCS#8 DER → PEM, the form Node's TLS takes a key in. */
function keyPem(pkcs8: ArrayBuffer): string {
  return createPrivateKey({ key: Buffer.from(pkcs8), format: "der", type: "pkcs8" }).export({
    type: "pkcs8",
    format: "pem",
  }) as string;
}

/** The name a leaf is minted for: lower case, no trailing dot, IPs in one spelling; or a user error. */
function leafName(sni: string): string {
  const name = sni.toLowerCase().replace(/\.$/, "");
  const ip = canonicalAddress(name);
  if (ip !== undefined && !ip.includes("%")) return ip;
  if (name.length <= 253 && /^[a-z0-9_-]+(\.[a-z0-9_-]+)*$/.test(name)) return name;
  throw new InvalidArgumentError(`cannot mint a certificate for ${JSON.stringify(sni)}: not a host name`);
}

interface Leaf {
  context: SecureContext;
  certPem: string;
}

export interface MitmCaOptions {
  /** Secure contexts kept, least recently used evicted first (default 256). */
  maxLeaves?: number;
}

export class MitmCa {
  readonly certPem: string;
  readonly #caCert: x509.X509Certificate;
  /** Non-extractable: it signs and is never exported. */
  readonly #caKey: CryptoKey;
  /** The extensions every leaf carries, built once (basic constraints, key usages, authority key id). */
  readonly #leafExtensions: x509.Extension[];
  /**
   * One key pair for every leaf: minting is then one signature, not a key generation. The public
   * half is kept as SPKI bytes, which spares the library an export per leaf.
   */
  readonly #leafSpki: ArrayBuffer;
  readonly #leafKeyPem: string;
  readonly #maxLeaves: number;
  /** SNI → the leaf being minted or minted; a Map iterates oldest first, which makes it an LRU. */
  readonly #leaves = new Map<string, Promise<Leaf>>();

  private constructor(parts: {
    caCert: x509.X509Certificate;
    caKey: CryptoKey;
    caKeyId: string;
    leafSpki: ArrayBuffer;
    leafKeyPem: string;
    maxLeaves: number;
  }) {
    this.#caCert = parts.caCert;
    this.#caKey = parts.caKey;
    this.#leafExtensions = [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.AuthorityKeyIdentifierExtension(parts.caKeyId),
    ];
    this.#leafSpki = parts.leafSpki;
    this.#leafKeyPem = parts.leafKeyPem;
    this.#maxLeaves = parts.maxLeaves;
    this.certPem = parts.caCert.toString("pem");
  }

  static async create(opts: MitmCaOptions = {}): Promise<MitmCa> {
    const maxLeaves = opts.maxLeaves ?? 256;
    if (!Number.isInteger(maxLeaves) || maxLeaves < 1) {
      throw new InvalidArgumentError(`maxLeaves must be a positive integer, not ${maxLeaves}`);
    }
    const ca = await crypto.subtle.generateKey(EC, false, ["sign", "verify"]);
    // Extractable because Node's TLS takes the key as PEM; exported once, then only the PEM is kept.
    const leaf = await crypto.subtle.generateKey(EC, true, ["sign", "verify"]);
    const ski = await x509.SubjectKeyIdentifierExtension.create(ca.publicKey, false, crypto);
    const now = Date.now();
    const caCert = await x509.X509CertificateGenerator.createSelfSigned(
      {
        serialNumber: serial(),
        name: [{ CN: [NAME] }, { O: [NAME] }],
        notBefore: new Date(now - DAY),
        notAfter: new Date(now + 3652 * DAY),
        keys: ca,
        signingAlgorithm: SIGN,
        extensions: [
          new x509.BasicConstraintsExtension(true, 0, true),
          new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
          ski,
        ],
      },
      crypto,
    );
    return new MitmCa({
      caCert,
      caKey: ca.privateKey,
      caKeyId: ski.keyId,
      leafSpki: await crypto.subtle.exportKey("spki", leaf.publicKey),
      leafKeyPem: keyPem(await crypto.subtle.exportKey("pkcs8", leaf.privateKey)),
      maxLeaves,
    });
  }

  /**
   * A TLS server context presenting a leaf for `sni` (chained to this CA), for an SNICallback or
   * `new TLSSocket(…, {secureContext})`. Cached per name; concurrent calls for one name share one
   * minting. Throws InvalidArgumentError when `sni` is not a host name or IP address.
   */
  async secureContext(sni: string): Promise<SecureContext> {
    return (await this.#leaf(sni)).context;
  }

  /** The leaf certificate (PEM) `secureContext(sni)` presents, for inspection and tests. */
  async leafPem(sni: string): Promise<string> {
    return (await this.#leaf(sni)).certPem;
  }

  #leaf(sni: string): Promise<Leaf> {
    const name = leafName(sni);
    const cached = this.#leaves.get(name);
    if (cached !== undefined) {
      this.#leaves.delete(name);
      this.#leaves.set(name, cached);
      return cached;
    }
    const minting = this.#mint(name);
    this.#leaves.set(name, minting);
    minting.catch(() => {
      if (this.#leaves.get(name) === minting) this.#leaves.delete(name);
    });
    if (this.#leaves.size > this.#maxLeaves) {
      const oldest = this.#leaves.keys().next().value as string;
      this.#leaves.delete(oldest);
    }
    return minting;
  }

  async #mint(name: string): Promise<Leaf> {
    const ip = isIP(name) !== 0;
    const short = name.length <= MAX_CN;
    const now = Date.now();
    const cert = await x509.X509CertificateGenerator.create(
      {
        serialNumber: serial(),
        // A name too long for a CN goes in the SAN only, which RFC 5280 then wants critical.
        subject: short ? [{ CN: [name] }] : [],
        issuer: this.#caCert.subjectName,
        // Guest clocks may lag the host's: a day of slack before, a year after.
        notBefore: new Date(now - DAY),
        notAfter: new Date(now + 365 * DAY),
        publicKey: this.#leafSpki,
        signingKey: this.#caKey,
        signingAlgorithm: SIGN,
        extensions: [
          ...this.#leafExtensions,
          new x509.SubjectAlternativeNameExtension([{ type: ip ? "ip" : "dns", value: name }], !short),
        ],
      },
      crypto,
    );
    const certPem = cert.toString("pem");
    // "\n" between the PEMs: glued end and begin lines make OpenSSL fail with "bad end line".
    const context = createSecureContext({ key: this.#leafKeyPem, cert: `${certPem}\n${this.certPem}` });
    return { context, certPem };
  }
}
