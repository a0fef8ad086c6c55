import { Transform, type TransformCallback } from "node:stream";

/**
 * Reads the raw bytes of pax extended-header xattrs (`SCHILY.xattr.NAME`) while passing the tar
 * stream through unchanged. tar-stream decodes pax values as UTF-8, which destroys binary values such
 * as `security.capability`; this scanner sees the same bytes first and keeps them, keyed by the
 * ordinal of the entry they belong to (tar-stream emits entries in the same order).
 */

const BLOCK = 512;
/** A pax header larger than this is passed through without collecting xattrs from it. */
const MAX_PAX = 1024 * 1024;

export interface RawXattr {
  name: string;
  value: Buffer;
}

type State =
  | { kind: "header" }
  | { kind: "skip"; left: number }
  | { kind: "pax"; left: number; pad: number; parts: Buffer[]; size: number };

function tarSize(h: Buffer): number {
  const field = h.subarray(124, 136);
  if ((field[0] ?? 0) & 0x80) {
    // base-256 (GNU) for sizes over 8 GiB
    let n = 0;
    for (let i = 1; i < field.length; i++) n = n * 256 + (field[i] ?? 0);
    return n;
  }
  const s = field.toString("latin1").replace(/\0.*$/s, "").trim();
  return s === "" ? 0 : Number.parseInt(s, 8);
}

const pad = (n: number) => (BLOCK - (n % BLOCK)) % BLOCK;

/** The xattrs of a pax header, and its `size` record (which overrides the next header's size). */
export function parsePaxRecords(data: Buffer): RawXattr[] & { size?: number } {
  const out: RawXattr[] & { size?: number } = [];
  let off = 0;
  while (off < data.length) {
    const sp = data.indexOf(0x20, off);
    if (sp < 0) break;
    const len = Number.parseInt(data.subarray(off, sp).toString("latin1"), 10);
    if (!Number.isInteger(len) || len <= 0 || off + len > data.length) break;
    const rec = data.subarray(sp + 1, off + len - 1); // without the trailing newline
    const eq = rec.indexOf(0x3d);
    if (eq > 0) {
      const key = rec.subarray(0, eq).toString("utf8");
      if (key.startsWith("SCHILY.xattr.")) {
        out.push({ name: key.slice("SCHILY.xattr.".length), value: Buffer.from(rec.subarray(eq + 1)) });
      } else if (key === "size") {
        const n = Number(rec.subarray(eq + 1).toString("latin1"));
        if (Number.isInteger(n) && n >= 0) out.size = n;
      }
    }
    off += len;
  }
  return out;
}

export class PaxXattrScanner extends Transform {
  /** Entry ordinal (0-based, real entries only) → its raw xattrs. */
  readonly xattrs = new Map<number, RawXattr[]>();
  private state: State = { kind: "header" };
  private header = Buffer.alloc(0);
  private entries = 0;
  private pending: RawXattr[] | undefined;
  private sizeOverride: number | undefined;

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.scan(chunk);
    cb(null, chunk);
  }

  private scan(chunk: Buffer): void {
    let off = 0;
    while (off < chunk.length) {
      const st = this.state;
      if (st.kind === "skip") {
        const n = Math.min(st.left, chunk.length - off);
        st.left -= n;
        off += n;
        if (st.left === 0) this.state = { kind: "header" };
        continue;
      }
      if (st.kind === "pax") {
        const n = Math.min(st.left, chunk.length - off);
        if (st.size <= MAX_PAX) st.parts.push(chunk.subarray(off, off + n));
        st.left -= n;
        off += n;
        if (st.left === 0) {
          if (st.size <= MAX_PAX) {
            const found = parsePaxRecords(Buffer.concat(st.parts));
            if (found.length > 0) this.pending = [...found];
            if (found.size !== undefined) this.sizeOverride = found.size;
          }
          this.state = st.pad > 0 ? { kind: "skip", left: st.pad } : { kind: "header" };
        }
        continue;
      }
      const need = BLOCK - this.header.length;
      const take = chunk.subarray(off, off + need);
      this.header = this.header.length === 0 ? Buffer.from(take) : Buffer.concat([this.header, take]);
      off += take.length;
      if (this.header.length < BLOCK) continue;
      const h = this.header;
      this.header = Buffer.alloc(0);
      if (h.every((b) => b === 0)) continue; // end-of-archive blocks
      let size = tarSize(h);
      const type = String.fromCharCode(h[156] ?? 0);
      if (type === "x") {
        this.state =
          size > 0 ? { kind: "pax", left: size, pad: pad(size), parts: [], size } : { kind: "header" };
        continue;
      }
      if (type !== "g" && type !== "L" && type !== "K") {
        if (this.pending) this.xattrs.set(this.entries, this.pending);
        if (this.sizeOverride !== undefined) size = this.sizeOverride;
        this.pending = undefined;
        this.sizeOverride = undefined;
        this.entries++;
      }
      const skip = size + pad(size);
      // As tar-stream does: every entry but a directory is followed by `size` bytes of data.
      this.state = type !== "5" && skip > 0 ? { kind: "skip", left: skip } : { kind: "header" };
    }
  }
}
