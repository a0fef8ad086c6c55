import { Transform, type TransformCallback } from "node:stream";
import { MatchlockError } from "../api/errors.ts";

/**
 * Reads the raw bytes of pax extended-header xattrs (`SCHILY.xattr.NAME`) while passing the tar
 * stream through unchanged. tar-stream decodes pax values as UTF-8, which destroys binary values such
 * as `security.capability`; this scanner sees the same bytes first and keeps them, with the byte
 * offset of each entry's data, so the applier can check that tar-stream and the scanner read the same
 * entry (a layer whose headers can be read two ways is refused rather than guessed at).
 *
 * Layers are hostile: every loop here advances by at least one byte, a pax header is held only up to
 * MAX_PAX bytes, and a malformed one is a MalformedTarError (as Go's archive/tar, which Docker uses,
 * refuses it).
 */

export class MalformedTarError extends MatchlockError {
  constructor(message: string) {
    super("INVALID_ARGUMENT", message);
    this.name = "MalformedTarError";
  }
}

const BLOCK = 512;
const EMPTY = Buffer.alloc(0);
/** Larger pax headers are refused: real ones hold a path and a few xattrs (64 KiB each at most). */
export const MAX_PAX = 1024 * 1024;
/** A record length has at most this many digits (MAX_PAX has 7). */
const MAX_LEN_DIGITS = 8;
/** tar-stream's typeflags (header byte 156 minus '0'). */
const FLAG = { DIR: 5, PAX: 72, GLOBAL: 55, GNU_LONG_LINK: 27, GNU_LONG_NAME: 28, GNU_LONG_NAME_OLD: 30 };

export interface RawXattr {
  name: string;
  value: Buffer;
}

/** The records of one pax header that matter here: xattrs, and `size` (overrides the next header's). */
export interface PaxRecords {
  xattrs: RawXattr[];
  size?: number;
}

/** What the scanner saw of one entry. */
export interface ScannedEntry {
  /** Byte offset of the entry's data in the layer (tar-stream's `header.byteOffset`). */
  offset: number;
  xattrs: RawXattr[];
}

/**
 * Parses pax records as Go's archive/tar does: `<len> <key>=<value>\n`, where len counts the whole
 * record in decimal. Anything else is a MalformedTarError, so a hostile header costs one pass.
 */
export function parsePaxRecords(data: Buffer): PaxRecords {
  const xattrs = new Map<string, Buffer>();
  let size: number | undefined;
  for (let off = 0; off < data.length; ) {
    const { key, value, end } = paxRecord(data, off);
    if (key.startsWith("SCHILY.xattr.")) xattrs.set(key.slice("SCHILY.xattr.".length), Buffer.from(value));
    else if (key === "size") size = paxSize(value);
    off = end;
  }
  return {
    xattrs: [...xattrs].map(([name, value]) => ({ name, value })),
    ...(size === undefined ? {} : { size }),
  };
}

function paxRecord(data: Buffer, off: number): { key: string; value: Buffer; end: number } {
  const bad = (why: string) => new MalformedTarError(`pax header: record at byte ${off} ${why}`);
  let sp = off;
  while (sp < data.length && sp - off < MAX_LEN_DIGITS && isDigit(data[sp])) sp++;
  if (sp === off || data[sp] !== 0x20) throw bad("does not start with a decimal length and a space");
  const end = off + Number(data.toString("latin1", off, sp));
  if (end > data.length || end < sp + 2 || data[end - 1] !== 0x0a)
    throw bad("has a length that does not end at a newline inside the header");
  const rec = data.subarray(sp + 1, end - 1);
  const eq = rec.indexOf(0x3d);
  if (eq <= 0) throw bad("has no key=value");
  return { key: rec.toString("utf8", 0, eq), value: rec.subarray(eq + 1), end };
}

function paxSize(value: Buffer): number {
  const s = value.toString("latin1");
  const n = Number(s);
  if (!/^\d{1,16}$/.test(s) || !Number.isSafeInteger(n))
    throw new MalformedTarError(`pax header: size ${JSON.stringify(s.slice(0, 40))} is not a whole number`);
  return n;
}

const isDigit = (b: number | undefined) => b !== undefined && b >= 0x30 && b <= 0x39;
const pad = (n: number) => (BLOCK - (n % BLOCK)) % BLOCK;

/** A numeric header field, decoded exactly as tar-stream's decodeOct does (so both see the same sizes). */
function tarNumber(field: Buffer): number {
  const first = field[0] ?? 0;
  if (first & 0x80) {
    // base-256 (GNU): 0x80 positive, 0xff two's complement negative
    if (first !== 0x80 && first !== 0xff) return Number.NaN;
    let n = 0;
    for (let i = field.length - 1, m = 1; i > 0; i--, m *= 256)
      n += (first === 0x80 ? (field[i] ?? 0) : 0xff - (field[i] ?? 0)) * m;
    return first === 0x80 ? n : -n;
  }
  let start = 0;
  while (start < field.length && field[start] === 0x20) start++;
  let end = field.indexOf(0x20, start);
  if (end < 0) end = field.length;
  while (start < end && field[start] === 0) start++;
  return start === end ? 0 : Number.parseInt(field.toString("latin1", start, end), 8);
}

/** tar-stream reads a block whose checksum would be that of an all-zero block as no header at all. */
function isNullHeader(h: Buffer): boolean {
  let sum = 8 * 32;
  for (let i = 0; i < BLOCK; i++) if (i < 148 || i >= 156) sum += h[i] ?? 0;
  return sum === 8 * 32;
}

type State =
  | { kind: "header" }
  | { kind: "skip"; left: number }
  | { kind: "pax"; global: boolean; left: number; pad: number; parts: Buffer[] };

export class PaxXattrScanner extends Transform {
  private readonly entries = new Map<number, ScannedEntry>();
  private state: State = { kind: "header" };
  private header = EMPTY;
  /** Bytes scanned so far. */
  private pos = 0;
  private count = 0;
  /** As tar-stream: the last global header's records apply under every later local pax header. */
  private global: PaxRecords | undefined;
  private local: PaxRecords | undefined;

  /** What the scanner saw of entry `ordinal` (0-based, real entries only), handed out once. */
  scanned(ordinal: number): ScannedEntry | undefined {
    const e = this.entries.get(ordinal);
    this.entries.delete(ordinal);
    return e;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    try {
      this.scan(chunk);
    } catch (e) {
      cb(e as Error); // before passing the chunk on: tar-stream never sees a header we refused
      return;
    }
    cb(null, chunk);
  }

  private scan(chunk: Buffer): void {
    let off = 0;
    while (off < chunk.length) {
      const st = this.state;
      if (st.kind === "header") {
        off += this.fillHeader(chunk.subarray(off));
        continue;
      }
      const n = Math.min(st.left, chunk.length - off);
      if (st.kind === "pax") st.parts.push(chunk.subarray(off, off + n));
      st.left -= n;
      off += n;
      this.pos += n;
      if (st.left > 0) continue;
      this.state = { kind: "header" };
      if (st.kind === "pax") {
        this.skip(st.pad);
        this.onPax(st.global, Buffer.concat(st.parts));
      }
    }
  }

  /** Adds bytes to the header being read (it may span chunks); returns how many it took. */
  private fillHeader(bytes: Buffer): number {
    const n = Math.min(BLOCK - this.header.length, bytes.length);
    this.header = Buffer.concat([this.header, bytes.subarray(0, n)]);
    this.pos += n;
    if (this.header.length === BLOCK) {
      const h = this.header;
      this.header = EMPTY;
      this.onHeader(h);
    }
    return n;
  }

  private onHeader(h: Buffer): void {
    if (isNullHeader(h)) return;
    const flag = h[156] === 0 ? 0 : (h[156] as number) - 0x30;
    const size = tarNumber(h.subarray(124, 136));
    if (flag === FLAG.PAX || flag === FLAG.GLOBAL) {
      if (!(size >= 0) || size > MAX_PAX)
        throw new MalformedTarError(`pax header of ${size} bytes (limit ${MAX_PAX})`);
      // tar-stream ignores an empty pax header entirely.
      if (size > 0)
        this.state = { kind: "pax", global: flag === FLAG.GLOBAL, left: size, pad: pad(size), parts: [] };
      return;
    }
    if (flag === FLAG.GNU_LONG_LINK || flag === FLAG.GNU_LONG_NAME || flag === FLAG.GNU_LONG_NAME_OLD) {
      if (!(size >= 0)) throw new MalformedTarError("GNU long-name header with an invalid size");
      this.skip(size + pad(size)); // tar-stream reads the name; it does not change any size
      return;
    }
    this.onEntry(flag, this.local?.size ?? size);
  }

  private onEntry(flag: number, size: number): void {
    if (!(size >= 0) || !Number.isSafeInteger(size))
      throw new MalformedTarError(`entry ${this.count} has an invalid size`);
    this.entries.set(this.count++, { offset: this.pos, xattrs: this.local?.xattrs ?? [] });
    this.local = undefined;
    // tar-stream gives a directory (typeflag 5 only: it reads an old-style "name/" file as a file) no
    // data, whatever size its header claims.
    if (flag !== FLAG.DIR) this.skip(size + pad(size));
  }

  private onPax(global: boolean, data: Buffer): void {
    const recs = parsePaxRecords(data);
    if (global) {
      this.global = recs;
      return;
    }
    const merged = new Map((this.global?.xattrs ?? []).map((x) => [x.name, x.value]));
    for (const x of recs.xattrs) merged.set(x.name, x.value);
    const size = recs.size ?? this.global?.size;
    this.local = {
      xattrs: [...merged].map(([name, value]) => ({ name, value })),
      ...(size === undefined ? {} : { size }),
    };
  }

  private skip(n: number): void {
    if (n > 0) this.state = { kind: "skip", left: n };
  }
}
