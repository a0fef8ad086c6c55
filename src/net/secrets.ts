import { randomBytes } from "node:crypto";
import type { Transform } from "node:stream";
import { InvalidArgumentError } from "../api/errors.ts";
import { hostPatternProblem, matchHost } from "./host-policy.ts";
import { ScrubStream } from "./scrub.ts";

/**
 * Secrets swapped on the wire (NETWORK.md §6, research §1.6). The guest only ever holds a
 * placeholder; the proxy puts the real value into requests toward the secret's hosts and turns it
 * back into the placeholder in responses. Real values never appear in an error, a log line, JSON or
 * util.inspect output produced here.
 */

export const PLACEHOLDER_PREFIX = "SANDBOX_SECRET_";

/** Matchlock's form: the prefix and 32 lower-case hex digits (16 random bytes). */
export function newPlaceholder(): string {
  return PLACEHOLDER_PREFIX + randomBytes(16).toString("hex");
}

export interface Secret {
  /** The guest's environment variable that holds the placeholder. */
  name: string;
  value: string;
  placeholder: string;
  /** Host globs (matchHost) the value may be sent to; empty means every host (Matchlock). */
  hosts: string[];
}

/**
 * Shortest value accepted. The response scrub confirms a guess: a guest that makes an echoing allowed
 * host reflect a candidate sees it come back as the placeholder exactly when it equals the value.
 * Below 8 bytes that is a feasible brute force (many guesses fit in one request body), and a short
 * value would also rewrite innocent text in every response. Real tokens are far longer.
 */
export const MIN_SECRET_LENGTH = 8;

/**
 * The value goes verbatim into header values, so it must be printable ASCII (or tab): CR, LF and NUL
 * would inject headers, other controls make Node refuse the request, and non-ASCII text is sent as
 * Latin-1 by Node, which would neither reach the server as written nor be found again by the scrub.
 */
const VALUE_OK = /^[\t\x20-\x7e]+$/;

export function validateSecret(s: Secret): void {
  if (typeof s.name !== "string" || !/^[A-Za-z_][A-Za-z0-9_]*$/.test(s.name)) {
    throw new InvalidArgumentError(
      `secret name ${JSON.stringify(s.name)} is not an environment variable name (letters, digits and _, not starting with a digit)`,
    );
  }
  const bad = (why: string) => new InvalidArgumentError(`secret ${s.name}: ${why}`);
  if (typeof s.value !== "string" || s.value === "") throw bad("the value is empty");
  if (/[\r\n\0]/.test(s.value)) throw bad("the value contains a line break or NUL (it would inject headers)");
  if (!VALUE_OK.test(s.value))
    throw bad("the value must be printable ASCII (no control or non-ASCII characters)");
  if (Buffer.byteLength(s.value) < MIN_SECRET_LENGTH) {
    throw bad(`the value is shorter than ${MIN_SECRET_LENGTH} characters, too easy to guess`);
  }
  if (typeof s.placeholder !== "string" || s.placeholder === "") throw bad("the placeholder is empty");
  if (!/^[A-Za-z0-9_.-]+$/.test(s.placeholder)) {
    throw bad(
      `the placeholder ${JSON.stringify(s.placeholder)} may hold only letters, digits, "_", "." and "-"`,
    );
  }
  if (s.placeholder.includes(s.value))
    throw bad("the placeholder contains the value (the guest would see it)");
  if (!Array.isArray(s.hosts)) throw bad("hosts must be a list of host patterns");
  for (const h of s.hosts) {
    const problem = hostPatternProblem(h);
    if (problem !== undefined) throw bad(`invalid host pattern: ${problem}`);
  }
}

/** A copy whose value is not enumerable: JSON.stringify and util.inspect of it leave the value out. */
function sealed(s: Secret): Secret {
  const copy = { name: s.name, placeholder: s.placeholder, hosts: Object.freeze([...s.hosts]) } as Secret;
  Object.defineProperty(copy, "value", { value: s.value, enumerable: false });
  return Object.freeze(copy);
}

function escapeRegExp(s: string): string {
  return s.replace(/[\\^$.*+?()[\]{}|]/g, "\\$&");
}

/** One regex over several literals, longest first: at each position the longest one wins. */
function alternation(literals: readonly string[]): RegExp {
  const sorted = [...literals].sort((a, b) => b.length - a.length);
  return new RegExp(sorted.map(escapeRegExp).join("|"), "g");
}

export type RequestVerdict =
  /** A placeholder went toward a host its secret is not for: refuse (403) and name the secret. */
  | { leak: string }
  /** The request to send: placeholders swapped for values, and which secrets were. */
  | { rawHeaders: string[]; url: string; swapped: Secret[] };

/**
 * What to scrub for each swapped secret: its value, and its percent-encoded form when that differs
 * (the query carries that one, and an upstream may echo the query back as it received it).
 */
function echoForms(swapped: readonly Secret[]): Map<string, string> {
  const byForm = new Map<string, string>();
  for (const x of swapped) {
    for (const form of [x.value, encodeURIComponent(x.value)])
      if (!byForm.has(form)) byForm.set(form, x.placeholder);
  }
  return byForm;
}

/** Replaces, in a response header value, every real value of `swapped` by its placeholder. */
export function scrubText(s: string, swapped: readonly Secret[]): string {
  if (swapped.length === 0) return s;
  const byForm = echoForms(swapped);
  return s.replace(alternation([...byForm.keys()]), (v) => byForm.get(v) as string);
}

/**
 * A stream that replaces every real value of `swapped` by its placeholder in a response body, or
 * undefined when nothing was swapped. The body's length changes, so the proxy must not forward the
 * upstream's Content-Length for a scrubbed body.
 */
export function scrubber(swapped: readonly Secret[]): Transform | undefined {
  if (swapped.length === 0) return undefined;
  return new ScrubStream(
    [...echoForms(swapped)].map(([form, placeholder]) => ({
      from: Buffer.from(form),
      to: Buffer.from(placeholder),
    })),
  );
}

export class SecretBook {
  readonly #secrets: Secret[];
  readonly #byPlaceholder = new Map<string, number>();
  /** Every placeholder, longest first; undefined when the book is empty. */
  readonly #finder: RegExp | undefined;

  constructor(secrets: readonly Secret[]) {
    const names = new Set<string>();
    for (const s of secrets) {
      validateSecret(s);
      if (names.has(s.name)) throw new InvalidArgumentError(`secret ${s.name} is given twice`);
      names.add(s.name);
      const other = this.#byPlaceholder.get(s.placeholder);
      if (other !== undefined) {
        const first = secrets[other]?.name;
        throw new InvalidArgumentError(`secrets ${first} and ${s.name} have the same placeholder`);
      }
      this.#byPlaceholder.set(s.placeholder, this.#byPlaceholder.size);
    }
    this.#secrets = secrets.map(sealed);
    this.#finder = secrets.length === 0 ? undefined : alternation(secrets.map((s) => s.placeholder));
  }

  get isEmpty(): boolean {
    return this.#secrets.length === 0;
  }

  /** name → placeholder: what the guest's environment gets. */
  env(): Record<string, string> {
    return Object.fromEntries(this.#secrets.map((s) => [s.name, s.placeholder]));
  }

  /** Every secret's host patterns, once each, in order: they join the allow-list. */
  hosts(): string[] {
    const seen = new Map<string, string>();
    for (const s of this.#secrets)
      for (const h of s.hosts) if (!seen.has(h.toLowerCase())) seen.set(h.toLowerCase(), h);
    return [...seen.values()];
  }

  /**
   * Checks and rewrites one request toward `host` (no port). `rawHeaders` is Node's flat
   * [name, value, …] list; `url` the request target. A placeholder anywhere in a header name or
   * value or in the URL, toward a host its secret is not for, is a leak (Matchlock's ErrSecretLeak).
   * Otherwise placeholders are swapped in header values and in the query only: never header names,
   * the path (servers log paths) or bodies (an upstream may echo them), as in Matchlock. In the query
   * the value is percent-encoded, so that the server decodes exactly the value.
   */
  prepareRequest(host: string, rawHeaders: readonly string[], url: string): RequestVerdict {
    const finder = this.#finder;
    if (finder === undefined) return { rawHeaders: [...rawHeaders], url, swapped: [] };
    const mayGo = this.#secrets.map((s) => s.hosts.length === 0 || s.hosts.some((p) => matchHost(p, host)));
    const present = new Set<number>();
    for (const text of [...rawHeaders, url]) {
      for (const m of text.matchAll(finder)) present.add(this.#byPlaceholder.get(m[0]) as number);
    }
    const leaked = [...present].sort((a, b) => a - b).find((i) => !mayGo[i]);
    if (leaked !== undefined) return { leak: (this.#secrets[leaked] as Secret).name };

    const used = new Set<number>();
    const swap = (text: string, encode: boolean) =>
      text.replace(finder, (placeholder) => {
        const i = this.#byPlaceholder.get(placeholder) as number;
        used.add(i);
        const value = (this.#secrets[i] as Secret).value;
        return encode ? encodeURIComponent(value) : value;
      });
    const headers = rawHeaders.map((h, i) => (i % 2 === 1 ? swap(h, false) : h));
    const q = url.indexOf("?");
    const newUrl = q < 0 ? url : url.slice(0, q + 1) + swap(url.slice(q + 1), true);
    const swapped = this.#secrets.filter((_, i) => used.has(i));
    return { rawHeaders: headers, url: newUrl, swapped };
  }

  /** See the module function scrubber. */
  scrubber(swapped: readonly Secret[]): Transform | undefined {
    return scrubber(swapped);
  }

  /** See the module function scrubText. */
  scrubText(s: string, swapped: readonly Secret[]): string {
    return scrubText(s, swapped);
  }

  /** Names, placeholders and hosts only: never a value. */
  toJSON(): Array<Omit<Secret, "value">> {
    return this.#secrets.map((s) => ({ name: s.name, placeholder: s.placeholder, hosts: [...s.hosts] }));
  }

  toString(): string {
    return `SecretBook(${this.#secrets.map((s) => s.name).join(", ")})`;
  }

  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return `SecretBook ${JSON.stringify(this.toJSON())}`;
  }
}
