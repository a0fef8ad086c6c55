/**
 * Splits a byte stream into newline-terminated lines without ever holding more than `maxLine`
 * bytes of one line: a longer line is skipped to its newline and reported as too long.
 */

export type LineEvent = { kind: "line"; line: Buffer } | { kind: "too_long"; bytes: number };

export class LineSplitter {
  private parts: Buffer[] = [];
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
        this.parts = [];
        this.size = 0;
      } else if (piece.length > 0) {
        this.parts.push(piece);
        this.size += piece.length;
      }
      if (nl < 0) break;
      if (this.discarding) out.push({ kind: "too_long", bytes: this.discarded });
      else
        out.push({
          kind: "line",
          line: this.parts.length === 1 ? (this.parts[0] as Buffer) : Buffer.concat(this.parts),
        });
      this.parts = [];
      this.size = 0;
      this.discarding = false;
      this.discarded = 0;
      start = nl + 1;
    }
    // Keep our own copy of a partial line: the caller may reuse its buffer.
    if (!this.discarding && this.parts.length > 0 && start < chunk.length) {
      const last = this.parts.length - 1;
      this.parts[last] = Buffer.from(this.parts[last] as Buffer);
    }
    return out;
  }

  /** A last line without a newline at EOF. */
  end(): LineEvent[] {
    if (this.discarding) return [{ kind: "too_long", bytes: this.discarded }];
    if (this.size === 0) return [];
    return [{ kind: "line", line: Buffer.concat(this.parts) }];
  }
}
