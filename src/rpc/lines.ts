/**
 * Splits a byte stream into newline-terminated lines without ever holding more than `maxLine`
 * bytes of one line: a longer line is skipped to its newline and reported as too long.
 */

export type LineEvent = { kind: "line"; line: Buffer } | { kind: "too_long"; bytes: number };

const EMPTY = Buffer.alloc(0);

export class LineSplitter {
  /**
   * The partial line, copied into one growing buffer (capacity doubles, capped at maxLine). One
   * buffer rather than a list of the chunks: a peer trickling a byte per write would otherwise cost
   * a Buffer object (~100 bytes of heap) per byte it sends.
   */
  private acc: Buffer = EMPTY;
  private size = 0;
  private discarding = false;
  private discarded = 0;
  private readonly maxLine: number;

  constructor(maxLine: number) {
    this.maxLine = maxLine;
  }

  push(chunk: Buffer): LineEvent[] {
    const out: LineEvent[] = [];
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(10, start);
      const piece = chunk.subarray(start, nl < 0 ? chunk.length : nl);
      if (this.discarding) this.discarded += piece.length;
      else if (this.size + piece.length > this.maxLine) {
        this.discarding = true;
        this.discarded = this.size + piece.length;
        this.reset();
      } else if (nl < 0) this.append(piece); // our own copy: the caller may reuse its buffer
      if (nl < 0) break;
      out.push(this.complete(piece));
      start = nl + 1;
    }
    return out;
  }

  /** A last line without a newline at EOF. */
  end(): LineEvent[] {
    if (this.discarding) return [{ kind: "too_long", bytes: this.discarded }];
    if (this.size === 0) return [];
    const line = this.acc.subarray(0, this.size);
    this.reset();
    return [{ kind: "line", line }];
  }

  /** The event for a line whose newline just arrived; `piece` is its part in the current chunk. */
  private complete(piece: Buffer): LineEvent {
    let ev: LineEvent;
    if (this.discarding) ev = { kind: "too_long", bytes: this.discarded };
    else if (this.size === 0)
      ev = { kind: "line", line: piece }; // the common case: no copy
    else {
      this.append(piece);
      ev = { kind: "line", line: this.acc.subarray(0, this.size) };
    }
    this.discarding = false;
    this.discarded = 0;
    this.reset(); // the emitted line may be a view of acc: never write to it again
    return ev;
  }

  private append(piece: Buffer): void {
    if (piece.length === 0) return;
    const need = this.size + piece.length;
    if (need > this.acc.length) {
      const grown = Buffer.allocUnsafe(Math.min(this.maxLine, Math.max(need, 2 * this.acc.length, 256)));
      this.acc.copy(grown, 0, 0, this.size);
      this.acc = grown;
    }
    piece.copy(this.acc, this.size);
    this.size = need;
  }

  private reset(): void {
    this.acc = EMPTY;
    this.size = 0;
  }
}
