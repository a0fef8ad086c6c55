import { canonicalHeaderKey } from "../api/http-fields.ts";

/**
 * Edits of Node's flat header lists (`[name, value, name, value, …]`, as in `rawHeaders`), the form
 * the proxy sends on. Names compare case-insensitively; everything not edited keeps its order and
 * spelling.
 */

export function firstHeader(raw: readonly string[], name: string): string | undefined {
  const n = name.toLowerCase();
  for (let i = 0; i + 1 < raw.length; i += 2) if ((raw[i] as string).toLowerCase() === n) return raw[i + 1];
  return undefined;
}

/** Go's Header.Set: one value under `name`, in the place of the first old one (or last). */
export function setHeader(raw: readonly string[], name: string, value: string): string[] {
  const n = name.toLowerCase();
  const out: string[] = [];
  let placed = false;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    if ((raw[i] as string).toLowerCase() !== n) out.push(raw[i] as string, raw[i + 1] as string);
    else if (!placed) {
      out.push(name, value);
      placed = true;
    }
  }
  if (!placed) out.push(name, value);
  return out;
}

export function deleteHeader(raw: readonly string[], name: string): string[] {
  const n = name.toLowerCase();
  const out: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    if ((raw[i] as string).toLowerCase() !== n) out.push(raw[i] as string, raw[i + 1] as string);
  }
  return out;
}

/** The map Matchlock's callbacks get: canonical names, values in order; `omit` lower-case names. */
export function headerMap(
  raw: readonly string[],
  omit: ReadonlySet<string> = new Set(),
): Record<string, string[]> {
  // A Map, then own properties: a header named `__proto__` or `constructor` is just a header.
  const out = new Map<string, string[]>();
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i] as string;
    if (omit.has(name.toLowerCase())) continue;
    const key = canonicalHeaderKey(name);
    const values = out.get(key);
    if (values) values.push(raw[i + 1] as string);
    else out.set(key, [raw[i + 1] as string]);
  }
  return Object.fromEntries(out);
}

/**
 * A callback's header map replacing the whole set, except the headers in `keep` (lower-case names):
 * those stay as they were and the map's entries for them are ignored. The proxy keeps the ones it
 * owns (Host, framing) this way.
 */
export function replaceHeaders(
  raw: readonly string[],
  map: Readonly<Record<string, readonly string[]>>,
  keep: ReadonlySet<string>,
): string[] {
  const out: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    if (keep.has((raw[i] as string).toLowerCase())) out.push(raw[i] as string, raw[i + 1] as string);
  }
  for (const [name, values] of Object.entries(map)) {
    if (keep.has(name.toLowerCase())) continue;
    for (const value of values) out.push(canonicalHeaderKey(name), value);
  }
  return out;
}
