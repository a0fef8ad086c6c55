import { Transform, type TransformCallback } from "node:stream";

/**
 * Byte-exact streaming search-and-replace, for turning secret values that an upstream echoes back
 * into their placeholders before the guest sees them (NETWORK.md §6). Works on Buffers, so any
 * binary body passes through unchanged apart from the replaced runs.
 */

export interface Replacement {
  from: Buffer;
  to: Buffer;
}

const EMPTY = Buffer.alloc(0);
/** `next[k]` not searched yet in this buffer; -1 means "no occurrence left". */
const UNKNOWN = -2;

export class ScrubStream extends Transform {
  /** Longest first: at one position the longest `from` wins, as in a one-shot replace. */
  readonly #pairs: Replacement[];
  readonly #maxLen: number;
  /** The tail of the last chunk that may begin a match, at most maxLen − 1 bytes. */
  #held: Buffer = EMPTY;

  constructor(replacements: readonly Replacement[]) {
    super();
    if (replacements.some((r) => r.from.length === 0)) throw new RangeError("cannot replace an empty run");
    this.#pairs = [...replacements].sort((a, b) => b.from.length - a.from.length);
    this.#maxLen = this.#pairs[0]?.from.length ?? 1;
  }

  /** Bytes received and not yet passed on (for tests of the memory bound). */
  get heldBytes(): number {
    return this.#held.length;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    const data = this.#held.length === 0 ? chunk : Buffer.concat([this.#held, chunk]);
    this.#process(data, false);
    done();
  }

  override _flush(done: TransformCallback): void {
    this.#process(this.#held, true);
    done();
  }

  /**
   * Replaces every match that starts before `cut` and passes the bytes before `cut` on. A match that
   * could still be completed by the next chunk starts at or after data.length − (maxLen − 1), so
   * everything before that point is decided; at the end of the stream everything is.
   */
  #process(data: Buffer, final: boolean): void {
    const cut = final ? data.length : data.length - (this.#maxLen - 1);
    const next = this.#pairs.map(() => UNKNOWN);
    const out: Buffer[] = [];
    let pos = 0;
    for (;;) {
      let at = -1;
      let pair: Replacement | undefined;
      this.#pairs.forEach((p, k) => {
        let idx = next[k] as number;
        if (idx === UNKNOWN || (idx >= 0 && idx < pos)) idx = next[k] = data.indexOf(p.from, pos);
        if (idx >= 0 && (at < 0 || idx < at)) [at, pair] = [idx, p];
      });
      if (pair === undefined || at >= cut) break;
      out.push(data.subarray(pos, at), pair.to);
      pos = at + pair.from.length;
    }
    const keep = Math.max(pos, cut);
    out.push(data.subarray(pos, keep));
    // A copy: a view would pin the whole (possibly large) chunk in memory.
    this.#held = keep < data.length ? Buffer.from(data.subarray(keep)) : EMPTY;
    const bytes = out.length === 1 ? (out[0] as Buffer) : Buffer.concat(out);
    if (bytes.length > 0) this.push(bytes);
  }
}
