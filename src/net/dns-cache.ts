import type { Answer } from "dns-packet";

/**
 * The two memories of the gateway DNS server, both bounded whatever the guest or an upstream
 * sends: answers by (type, name) until their TTL runs out, and pins (address → the names this
 * VM's DNS answered with it), which the proxy reads to tell which name an address belongs to.
 */

/** What a lookup produced, before it is dressed as a reply to one query. */
export interface Resolution {
  rcode: number;
  answers: Answer[];
  authorities: Answer[];
}

export const RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 } as const;

const MIN_TTL_S = 1; // a TTL of 0 would make every query go upstream
const MAX_TTL_S = 3600;
const NEGATIVE_TTL_S = 30;

interface CacheEntry {
  resolution: Resolution;
  storedAt: number;
  expiresAt: number;
}

/** A record's TTL, aged by the seconds since it was stored. */
function aged(record: Answer, elapsedS: number): Answer {
  if (record.type === "OPT") return record;
  return { ...record, ttl: Math.max(0, (record.ttl ?? 0) - elapsedS) } as Answer;
}

/** How long an upstream reply may be served from the cache, in seconds; 0 = not at all. */
function cacheSeconds(r: Resolution): number {
  const negative = r.rcode === RCODE.NXDOMAIN || (r.rcode === RCODE.NOERROR && r.answers.length === 0);
  if (negative) return NEGATIVE_TTL_S;
  if (r.rcode !== RCODE.NOERROR) return 0; // SERVFAIL, REFUSED…: ask again next time
  let ttl = MAX_TTL_S;
  for (const a of r.answers) if (a.type !== "OPT") ttl = Math.min(ttl, a.ttl ?? 0);
  return Math.max(MIN_TTL_S, ttl);
}

/** Upstream replies by `${type} ${name}`. When full, the oldest entry goes. */
export class AnswerCache {
  private readonly entries = new Map<string, CacheEntry>();
  private readonly maxEntries: number;

  constructor(maxEntries: number) {
    this.maxEntries = maxEntries;
  }

  get size(): number {
    return this.entries.size;
  }

  /** The stored resolution with its TTLs aged, or undefined if absent or expired. */
  get(key: string, now: number): Resolution | undefined {
    const e = this.entries.get(key);
    if (!e) return undefined;
    if (now >= e.expiresAt) {
      this.entries.delete(key);
      return undefined;
    }
    const elapsedS = Math.floor((now - e.storedAt) / 1000);
    const r = e.resolution;
    return {
      rcode: r.rcode,
      answers: r.answers.map((a) => aged(a, elapsedS)),
      authorities: r.authorities.map((a) => aged(a, elapsedS)),
    };
  }

  set(key: string, resolution: Resolution, now: number): void {
    const seconds = cacheSeconds(resolution);
    if (seconds === 0) return;
    this.entries.delete(key); // re-inserted last: the oldest is always first
    while (this.entries.size >= this.maxEntries) {
      const oldest = this.entries.keys().next();
      if (oldest.done) break;
      this.entries.delete(oldest.value);
    }
    this.entries.set(key, { resolution, storedAt: now, expiresAt: now + seconds * 1000 });
  }
}

/** Address → names, each with its own expiry. When full, the oldest pin goes. */
export class PinTable {
  private readonly byAddress = new Map<string, Map<string, number>>();
  /** Every (address, name) pair in the order pinned, for eviction. */
  private readonly order = new Map<string, { ip: string; name: string }>();
  private readonly maxPins: number;

  constructor(maxPins: number) {
    this.maxPins = maxPins;
  }

  get size(): number {
    return this.order.size;
  }

  /** Pins `ip` to `name` for `ttlS` seconds from `now` (at least one second), extending any older pin. */
  pin(ip: string, name: string, ttlS: number, now: number): void {
    const expiresAt = now + Math.max(MIN_TTL_S, ttlS) * 1000;
    const key = `${ip} ${name}`;
    this.order.delete(key);
    while (this.order.size >= this.maxPins) {
      const oldest = this.order.entries().next();
      if (oldest.done) break;
      this.unpin(oldest.value[0], oldest.value[1].ip, oldest.value[1].name);
    }
    this.order.set(key, { ip, name });
    let names = this.byAddress.get(ip);
    if (!names) {
      names = new Map();
      this.byAddress.set(ip, names);
    }
    names.set(name, Math.max(expiresAt, names.get(name) ?? 0));
  }

  namesFor(ip: string, now: number): string[] {
    const names = this.byAddress.get(ip);
    if (!names) return [];
    const live: string[] = [];
    for (const [name, expiresAt] of names) {
      if (now < expiresAt) live.push(name);
      else this.unpin(`${ip} ${name}`, ip, name);
    }
    return live;
  }

  private unpin(key: string, ip: string, name: string): void {
    this.order.delete(key);
    const names = this.byAddress.get(ip);
    if (!names) return;
    names.delete(name);
    if (names.size === 0) this.byAddress.delete(ip);
  }
}
