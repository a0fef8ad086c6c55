/**
 * The request target as network hooks see and change it: its path and raw query apart, the path in
 * the form rules match against, and Matchlock's query edits done on the raw text so that the
 * parameters a rule does not touch go out byte for byte as the guest wrote them.
 */

/**
 * `/a/b?x=1` → path `/a/b`, query `x=1`. An absolute-form target (`http://h/a?x`, RFC 9112 §3.2.2)
 * gives its origin-form parts, so a rule's path glob cannot be dodged by spelling the URL in full;
 * the caller sends the origin form it gets back from `targetOf`. `*` (OPTIONS) stays `*`.
 */
export function splitTarget(url: string): { path: string; rawQuery: string } {
  let target = url;
  const absolute = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*/i.exec(target);
  if (absolute) target = target.slice(absolute[0].length) || "/";
  const hash = target.indexOf("#");
  if (hash >= 0) target = target.slice(0, hash);
  const q = target.indexOf("?");
  return q < 0 ? { path: target, rawQuery: "" } : { path: target.slice(0, q), rawQuery: target.slice(q + 1) };
}

export function targetOf(path: string, rawQuery: string): string {
  return rawQuery === "" ? path : `${path}?${rawQuery}`;
}

/** %XX → the byte; anything else (including a malformed escape) as it is; then UTF-8. */
function percentDecode(s: string, plusIsSpace: boolean): string {
  const text = plusIsSpace ? s.replaceAll("+", " ") : s;
  if (!text.includes("%")) return text;
  const out: number[] = [];
  const raw = Buffer.from(text, "utf8");
  for (let i = 0; i < raw.length; i++) {
    const b = raw[i] as number;
    const hex = b === 0x25 ? raw.toString("latin1", i + 1, i + 3) : "";
    if (/^[0-9a-f]{2}$/i.test(hex)) {
      out.push(Number.parseInt(hex, 16));
      i += 2;
    } else out.push(b);
  }
  return Buffer.from(out).toString("utf8");
}

/**
 * The path rules match and callbacks see: percent-decoded (as Go's URL.Path, so `/v1/%61dmin`
 * is `/v1/admin`), then, ours, with `.` and `..` segments resolved and runs of `/` collapsed. A
 * server normalises `/v1/public/../admin/x` or `/v1//admin/x` to `/v1/admin/x` before routing it;
 * a glob `/v1/admin/*` must see that too, or a guest could walk around a block rule. A trailing
 * `/` is kept (`/v1/admin/*` matches `/v1/admin/`, as in Go).
 */
export function canonicalPath(rawPath: string): string {
  if (rawPath === "") return "/";
  if (!rawPath.startsWith("/")) return rawPath; // `*`
  const decoded = percentDecode(rawPath, false);
  const segments = decoded.split("/").slice(1);
  const out: string[] = [];
  for (const seg of segments) {
    if (seg === "" || seg === ".") continue;
    if (seg === "..") out.pop();
    else out.push(seg);
  }
  const last = segments.at(-1);
  const trailing = (last === "" || last === "." || last === "..") && out.length > 0;
  return `/${out.join("/")}${trailing ? "/" : ""}`;
}

/** Characters a path segment may carry unescaped (RFC 3986 pchar, plus `/`). */
const PATH_SAFE = /[A-Za-z0-9\-._~!$&'()*+,;=:@/]/;

/**
 * A decoded path (a rule's `rewrite_path`, a callback's `path`) as it goes on the wire, as Go's
 * URL.EscapedPath does once Matchlock clears RawPath: `%` and anything outside pchar escaped.
 */
export function encodePath(path: string): string {
  let out = "";
  for (const c of path) {
    if (PATH_SAFE.test(c)) out += c;
    else for (const b of Buffer.from(c, "utf8")) out += `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

interface Pair {
  /** As written, `k=v` or `k`. */
  raw: string;
  key: string;
  value: string;
}

function pairsOf(rawQuery: string): Pair[] {
  if (rawQuery === "") return [];
  return rawQuery
    .split("&")
    .filter((p) => p !== "")
    .map((raw) => {
      const eq = raw.indexOf("=");
      const k = eq < 0 ? raw : raw.slice(0, eq);
      const val = eq < 0 ? "" : raw.slice(eq + 1);
      return { raw, key: percentDecode(k, true), value: percentDecode(val, true) };
    });
}

function encodePair(key: string, value: string): string {
  return `${encodeURIComponent(key)}=${encodeURIComponent(value)}`;
}

/** Go's `url.Query()` reduced to its first values, what Matchlock sends callbacks. */
export function firstQueryValues(rawQuery: string): Record<string, string> {
  const out = new Map<string, string>();
  for (const p of pairsOf(rawQuery)) if (!out.has(p.key)) out.set(p.key, p.value);
  return Object.fromEntries(out); // own properties, even for a key named __proto__
}

/**
 * Matchlock's `set_query` then `delete_query` (Go's Values.Set and Del). Unlike Go, which re-encodes
 * and sorts the whole query, the untouched parameters keep their place and spelling: a set key
 * takes the place of its first occurrence, a new key goes last.
 */
export function editQuery(
  rawQuery: string,
  set: ReadonlyArray<readonly [string, string]>,
  del: readonly string[],
): string {
  let pairs = pairsOf(rawQuery);
  for (const [key, value] of set) {
    const raw = encodePair(key, value);
    const first = pairs.findIndex((p) => p.key === key);
    if (first < 0) pairs.push({ raw, key, value });
    else pairs = pairs.flatMap((p, i) => (i === first ? [{ raw, key, value }] : p.key === key ? [] : [p]));
  }
  const gone = new Set(del);
  return pairs
    .filter((p) => !gone.has(p.key))
    .map((p) => p.raw)
    .join("&");
}

/** A callback's `query`: the whole query replaced, in the order given; `{}` removes it. */
export function queryFromMap(query: Readonly<Record<string, string>>): string {
  return Object.entries(query)
    .map(([k, v]) => encodePair(k, v))
    .join("&");
}
