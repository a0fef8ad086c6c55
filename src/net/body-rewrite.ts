import { Duplex } from "node:stream";

/**
 * Network hooks' `body_replacements` on response bytes, streamed. Matchlock applies the list in
 * order, each as Go's bytes.ReplaceAll over the result of the previous one; a chain of one streaming
 * stage per literal computes exactly that, while holding back only what may still become a match:
 * at most `find.length − 1` bytes per stage. So nothing here buffers a body or a line, and the
 * memory a response costs is bounded by the rules, never by the upstream.
 */

export interface Literal {
  find: Buffer;
  replace: Buffer;
}

const EMPTY = Buffer.alloc(0);
/** Output is handed on in pieces of about this size, so that a replacement that grows the text is paced by back-pressure. */
const BATCH = 64 * 1024;

/** One literal, streaming: the same result as `bytes.ReplaceAll` over the whole input. */
class Stage {
  readonly #find: Buffer;
  readonly #replace: Buffer;
  #held: Buffer = EMPTY;

  constructor(l: Literal) {
    if (l.find.length === 0) throw new RangeError("cannot replace an empty run");
    this.#find = l.find;
    this.#replace = l.replace;
  }

  *feed(chunk: Buffer): Generator<Buffer> {
    const data = this.#held.length === 0 ? chunk : Buffer.concat([this.#held, chunk]);
    const parts: Buffer[] = [];
    let size = 0;
    const add = (b: Buffer) => {
      if (b.length === 0) return;
      parts.push(b);
      size += b.length;
    };
    let pos = 0;
    for (;;) {
      const at = data.indexOf(this.#find, pos);
      if (at < 0) break;
      add(data.subarray(pos, at));
      add(this.#replace);
      pos = at + this.#find.length;
      if (size >= BATCH) {
        yield parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts);
        parts.length = 0;
        size = 0;
      }
    }
    // No match starts before `cut`; one may start in the last find.length − 1 bytes.
    const cut = Math.max(pos, data.length - (this.#find.length - 1));
    add(data.subarray(pos, cut));
    // A copy: a view would pin the whole chunk in memory.
    this.#held = cut < data.length ? Buffer.from(data.subarray(cut)) : EMPTY;
    if (size > 0) yield parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts);
  }

  *end(): Generator<Buffer> {
    const rest = this.#held;
    this.#held = EMPTY;
    if (rest.length > 0) yield rest;
  }

  get heldBytes(): number {
    return this.#held.length;
  }
}

/** The literals applied one after the other, streaming. */
export class ReplaceChain {
  readonly #stages: Stage[];

  constructor(literals: readonly Literal[]) {
    this.#stages = literals.map((l) => new Stage(l));
  }

  /** Bytes received and not yet passed on (for tests of the memory bound). */
  get heldBytes(): number {
    return this.#stages.reduce((n, s) => n + s.heldBytes, 0);
  }

  *#from(i: number, piece: Buffer): Generator<Buffer> {
    const stage = this.#stages[i];
    if (stage === undefined) {
      if (piece.length > 0) yield piece;
      return;
    }
    for (const p of stage.feed(piece)) yield* this.#from(i + 1, p);
  }

  *feed(chunk: Buffer): Generator<Buffer> {
    yield* this.#from(0, chunk);
  }

  /** Flushes every stage in order: what one holds back still passes through the ones after it. */
  *end(): Generator<Buffer> {
    for (let i = 0; i < this.#stages.length; i++) {
      for (const p of (this.#stages[i] as Stage).end()) yield* this.#from(i + 1, p);
    }
  }
}

/** The whole body rewritten, or undefined when the result would pass `maxBytes`. */
export function rewriteWhole(
  body: Buffer,
  literals: readonly Literal[],
  maxBytes: number,
): Buffer | undefined {
  const chain = new ReplaceChain(literals);
  const parts: Buffer[] = [];
  let size = 0;
  for (const gen of [chain.feed(body), chain.end()]) {
    for (const p of gen) {
      size += p.length;
      if (size > maxBytes) return undefined;
      parts.push(p);
    }
  }
  return Buffer.concat(parts, size);
}

/** A transform that applies the literals to a whole (non-SSE) body as it streams. */
export function bodyRewriter(literals: readonly Literal[]): Duplex {
  return Duplex.from(async function* (source: AsyncIterable<Buffer>) {
    const chain = new ReplaceChain(literals);
    for await (const chunk of source) yield* chain.feed(chunk);
    yield* chain.end();
  });
}

const DATA = Buffer.from("data:");
const LF = 0x0a;
const CR = 0x0d;

/**
 * Server-sent events, Matchlock's way: only the payload of each `data:` line is rewritten (after
 * `data:`, before the line's `\n` or `\r\n`); every other line passes untouched. Streams within a
 * line too: it holds back at most 5 bytes to tell whether a line starts with `data:`, one `\r`
 * that may precede a `\n`, and what the chain holds, so there is no line length limit and a long
 * line is rewritten like a short one. A line is complete downstream as soon as its `\n` arrives.
 */
export class SseRewriter {
  readonly #literals: readonly Literal[];
  #state: "start" | "data" | "other" = "start";
  /** The start of a line while it may still be `data:`. */
  #prefix: Buffer = EMPTY;
  #chain: ReplaceChain | undefined;
  /** A `\r` ended the last piece of a data line: it belongs to the payload unless `\n` follows. */
  #cr = false;

  constructor(literals: readonly Literal[]) {
    this.#literals = literals;
  }

  get heldBytes(): number {
    return this.#prefix.length + (this.#cr ? 1 : 0) + (this.#chain?.heldBytes ?? 0);
  }

  *feed(chunk: Buffer): Generator<Buffer> {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.#state === "start") {
        const nl = chunk.indexOf(LF, pos);
        const stop = nl < 0 ? chunk.length : nl;
        const need = DATA.length - this.#prefix.length;
        const take = chunk.subarray(pos, Math.min(stop, pos + need));
        const prefix = Buffer.concat([this.#prefix, take]);
        pos += take.length;
        if (prefix.length === DATA.length && prefix.equals(DATA)) {
          yield prefix;
          this.#prefix = EMPTY;
          this.#state = "data";
          this.#chain = new ReplaceChain(this.#literals);
        } else if (!DATA.subarray(0, prefix.length).equals(prefix) || pos === nl) {
          // Not a data line, or it ends before `data:` is complete.
          this.#prefix = EMPTY;
          this.#state = "other";
          if (prefix.length > 0) yield prefix;
        } else this.#prefix = prefix; // the chunk ended inside a possible `data:`
      } else if (this.#state === "other") {
        const nl = chunk.indexOf(LF, pos);
        const end = nl < 0 ? chunk.length : nl + 1;
        yield chunk.subarray(pos, end);
        pos = end;
        if (nl >= 0) this.#state = "start";
      } else {
        const chain = this.#chain as ReplaceChain;
        const nl = chunk.indexOf(LF, pos);
        let payload = chunk.subarray(pos, nl < 0 ? chunk.length : nl);
        let crlf = false;
        if (nl >= 0) {
          crlf = payload.length > 0 ? payload[payload.length - 1] === CR : this.#cr;
          if (payload.length > 0 && crlf) payload = payload.subarray(0, -1);
          else if (payload.length === 0 && crlf) this.#cr = false;
        }
        if (this.#cr) {
          this.#cr = false;
          yield* chain.feed(Buffer.from([CR]));
        }
        if (nl < 0 && payload.length > 0 && payload[payload.length - 1] === CR) {
          this.#cr = true;
          payload = payload.subarray(0, -1);
        }
        yield* chain.feed(payload);
        if (nl < 0) {
          pos = chunk.length;
          continue;
        }
        yield* chain.end();
        yield crlf ? Buffer.from("\r\n") : Buffer.from("\n");
        this.#chain = undefined;
        this.#state = "start";
        pos = nl + 1;
      }
    }
  }

  /** The stream ended, possibly mid-line: a lone `\r` is payload then, as in Matchlock. */
  *end(): Generator<Buffer> {
    if (this.#state === "start" && this.#prefix.length > 0) yield this.#prefix;
    if (this.#state === "data") {
      const chain = this.#chain as ReplaceChain;
      if (this.#cr) yield* chain.feed(Buffer.from([CR]));
      yield* chain.end();
    }
    this.#prefix = EMPTY;
    this.#cr = false;
    this.#chain = undefined;
    this.#state = "start";
  }
}

/** A transform for a `text/event-stream` body (see SseRewriter). */
export function sseRewriter(literals: readonly Literal[]): Duplex {
  return Duplex.from(async function* (source: AsyncIterable<Buffer>) {
    const sse = new SseRewriter(literals);
    for await (const chunk of source) yield* sse.feed(chunk);
    yield* sse.end();
  });
}
