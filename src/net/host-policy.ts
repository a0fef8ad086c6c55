import { isIP } from "node:net";
import { InvalidArgumentError } from "../api/errors.ts";

/**
 * The allow-list (`--allow-host`, `network.allowed_hosts`) and the host globs of secrets, with
 * Matchlock's semantics (ML:pkg/policy/engine.go matchGlob, research §1.6). Pure logic: the proxy
 * asks, this module answers.
 */

/** Lower case and one trailing dot dropped: `API.X.com.` and `api.x.com` are the same name. */
function normalize(name: string): string {
  const lower = name.toLowerCase();
  return lower.endsWith(".") ? lower.slice(0, -1) : lower;
}

/**
 * One spelling per address, so that equal addresses compare equal: IPv6 compressed and lower-cased,
 * `::ffff:1.2.3.4` unmapped to `1.2.3.4` (how Node reports a v4 peer on a dual-stack socket).
 * Undefined when `ip` is not an IP literal.
 */
export function canonicalAddress(ip: string): string | undefined {
  const family = isIP(ip);
  if (family === 4) return ip;
  if (family !== 6) return undefined;
  const [addr = "", zone] = ip.split("%", 2);
  // WHATWG URL parsing is the serializer of RFC 5952 Node ships; a zone id is not part of its grammar.
  const compact = new URL(`http://[${addr}]`).hostname.slice(1, -1);
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(compact);
  if (mapped && zone === undefined) {
    const hi = Number.parseInt(mapped[1] as string, 16);
    const lo = Number.parseInt(mapped[2] as string, 16);
    return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
  }
  return zone === undefined ? compact : `${compact}%${zone}`;
}

/**
 * Ordered wildcards: every `*` is any run of characters (possibly empty, dots included); the fixed
 * parts must appear in order, the first as a prefix and the last as a suffix. Leftmost placement of
 * each middle part is enough: it leaves the most room for the parts after it.
 */
function matchWildcards(parts: readonly string[], host: string): boolean {
  const first = parts[0] as string;
  const last = parts[parts.length - 1] as string;
  if (host.length < first.length + last.length) return false;
  if (!host.startsWith(first) || !host.endsWith(last)) return false;
  const end = host.length - last.length;
  let at = first.length;
  for (const part of parts.slice(1, -1)) {
    const found = host.indexOf(part, at);
    if (found < 0 || found + part.length > end) return false;
    at = found + part.length;
  }
  return true;
}

/**
 * Matchlock's host glob:
 * - `*` matches everything;
 * - `*.x.com` matches every name ending in `.x.com`, but not the apex `x.com`;
 * - `x.*` matches every name starting with `x.`;
 * - any other `*` is an ordered wildcard (see matchWildcards);
 * - anything else is an exact match.
 * The three named forms are cases of the ordered wildcard, so one algorithm serves them all.
 *
 * Ours, unlike Matchlock: names compare case-insensitively (DNS names are case-insensitive, and a
 * guest could otherwise dodge a rule by writing `API.x.com`), one trailing dot on either side is
 * ignored (`x.com.` is the fully-qualified spelling of `x.com`), and two IP literals compare as
 * addresses (`2001:DB8::0:1` equals `2001:db8::1`). `host` is a bare name or address, no port.
 */
export function matchHost(pattern: string, host: string): boolean {
  const p = normalize(pattern);
  const h = normalize(host);
  if (p === "*") return true;
  if (!p.includes("*")) {
    if (p === h) return true;
    const pa = canonicalAddress(p);
    return pa !== undefined && pa === canonicalAddress(h);
  }
  return matchWildcards(p.split("*"), h);
}

/** `https://user@api.x.com:8443/v1?q` → `api.x.com`, to show the user what to write instead. */
function hostOfUrl(url: string): string {
  const rest = url.replace(/^[a-z][a-z0-9+.-]*:\/\//i, "");
  const authority = rest.split(/[/?#]/, 1)[0] ?? "";
  const host = authority.slice(authority.lastIndexOf("@") + 1);
  if (host.startsWith("[")) return host.slice(1, host.indexOf("]") < 0 ? undefined : host.indexOf("]"));
  return host.split(":", 1)[0] ?? "";
}

function like(host: string): string {
  return host ? `like ${host}` : "like api.example.com";
}

/**
 * Why `pattern` cannot be a host pattern, as one sentence naming it, or undefined if it is fine.
 * Matchlock accepts any string and silently never matches a typo; we refuse the common mistakes
 * (a URL, a path, a port, a leading dot) so that the user learns at once.
 */
export function hostPatternProblem(pattern: string): string | undefined {
  const shown = JSON.stringify(pattern);
  if (pattern.trim() === "") return "a host pattern is empty";
  if (/\s/.test(pattern)) return `${shown} contains whitespace: give one host name per pattern`;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(pattern)) {
    return `${shown} is a URL: give the host name only, ${like(hostOfUrl(pattern))}`;
  }
  if (canonicalAddress(pattern) !== undefined) return undefined;
  if (/^\[[0-9a-f:.%]+\]$/i.test(pattern)) {
    return `${shown} has brackets: give the address alone, ${like(pattern.slice(1, -1))}`;
  }
  if (pattern.includes("/"))
    return `${shown} has a path: give the host name only, ${like(hostOfUrl(pattern))}`;
  if (/^[^:]*:\d*$/.test(pattern)) {
    return `${shown} has a port: give the host name only, ${like(hostOfUrl(pattern))}`;
  }
  if (pattern.includes(":")) return `${shown} is neither a host name nor an IP address`;
  const bad = /[^A-Za-z0-9.*_-]/.exec(pattern);
  if (bad) {
    return `${shown} contains ${JSON.stringify(bad[0])}: a host pattern has only letters, digits, ".", "-", "_" and "*"`;
  }
  if (pattern.startsWith(".")) {
    return `${shown} starts with a dot: write *${pattern} for every subdomain, or ${pattern.slice(1)} for the name itself`;
  }
  if (pattern.includes("..")) return `${shown} has an empty label ("..")`;
  if (normalize(pattern).length > 253) return `${shown} is longer than a host name can be (253 characters)`;
  return undefined;
}

/** The identity of a pattern for dedup and removal: `API.x.com.` and `api.x.com` are one entry. */
function keyOf(pattern: string): string {
  return canonicalAddress(pattern) ?? normalize(pattern);
}

/** Validates every pattern before anything changes, so that a bad list is refused whole. */
function checked(patterns: readonly string[]): string[] {
  const trimmed = patterns.map((p) => p.trim());
  for (const p of trimmed) {
    const problem = hostPatternProblem(p);
    if (problem !== undefined) throw new InvalidArgumentError(`invalid host pattern: ${problem}`);
  }
  return trimmed;
}

/**
 * The names (and addresses) a guest may reach. Empty means every host, as in Matchlock; the private
 * floor still applies either way.
 */
export class AllowList {
  /** key → the pattern as the user wrote it (trimmed); a Map keeps insertion order. */
  private readonly entries = new Map<string, string>();

  constructor(patterns: readonly string[]) {
    this.add(patterns);
  }

  /** A copy, in insertion order, spelled as given. */
  get patterns(): string[] {
    return [...this.entries.values()];
  }

  get isEmpty(): boolean {
    return this.entries.size === 0;
  }

  /** May the guest reach the host `name` (no port)? */
  allowsName(name: string): boolean {
    if (this.isEmpty) return true;
    for (const p of this.entries.values()) if (matchHost(p, name)) return true;
    return false;
  }

  /**
   * May the guest open a raw connection to `ip` (TCP that is neither HTTP nor HTTPS)? Matchlock runs
   * the same glob over the address text, so an entry equal to the address allows it, and so do `*`
   * and address globs like `10.0.0.*`; a name pattern never matches an address.
   */
  allowsAddress(ip: string): boolean {
    if (this.isEmpty) return true;
    const a = canonicalAddress(ip);
    if (a === undefined) return false;
    for (const p of this.entries.values()) if (matchHost(p, a)) return true;
    return false;
  }

  /** Adds the patterns not already present; returns those, trimmed, in order. Throws before any change. */
  add(patterns: readonly string[]): string[] {
    const added: string[] = [];
    for (const p of checked(patterns)) {
      const key = keyOf(p);
      if (this.entries.has(key)) continue;
      this.entries.set(key, p);
      added.push(p);
    }
    return added;
  }

  /** Removes the listed patterns; returns the entries removed, as they were spelled in the list. */
  remove(patterns: readonly string[]): string[] {
    const removed: string[] = [];
    for (const p of checked(patterns)) {
      const key = keyOf(p);
      const existing = this.entries.get(key);
      if (existing === undefined) continue;
      this.entries.delete(key);
      removed.push(existing);
    }
    return removed;
  }
}
