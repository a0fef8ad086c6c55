import * as tar from "tar-stream";

/**
 * A byte-level tar writer for tests that need headers no tar library writes: binary pax values,
 * global pax headers, empty pax headers, old-style slash directories, GNU long names, sizes that lie.
 */

export const BLOCK = 512;

export interface RawHeader {
  name: string;
  /** The typeflag character: "0" file, "5" dir, "2" symlink, "x" pax, "g" global pax, "L" GNU long name… */
  flag: string;
  size: number;
  linkname?: string;
  /** Raw bytes for the 12-byte size field, overriding `size` there (the data written still uses `size`). */
  sizeField?: Buffer;
  mode?: number;
}

const octal = (n: number, width: number) => `${n.toString(8).padStart(width - 1, "0")}\0`;

export function header(h: RawHeader): Buffer {
  const b = Buffer.alloc(BLOCK);
  b.write(h.name, 0, 100, "utf8");
  b.write(octal(h.mode ?? 0o644, 8), 100, "latin1");
  b.write(octal(0, 8), 108, "latin1");
  b.write(octal(0, 8), 116, "latin1");
  if (h.sizeField) h.sizeField.copy(b, 124, 0, 12);
  else b.write(octal(h.size, 12), 124, "latin1");
  b.write(octal(1_700_000_000, 12), 136, "latin1");
  b.write(h.flag, 156, 1, "latin1");
  if (h.linkname) b.write(h.linkname, 157, 100, "utf8");
  b.write("ustar\0" + "00", 257, "latin1");
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const x of b) sum += x;
  b.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "latin1");
  return b;
}

export const padding = (n: number) => Buffer.alloc((BLOCK - (n % BLOCK)) % BLOCK);

/** Pax records `<len> <key>=<value>\n`, the length counting itself. */
export function paxRecords(records: Array<[string, Buffer | string]>): Buffer {
  return Buffer.concat(
    records.map(([k, v]) => {
      const body = Buffer.concat([Buffer.from(` ${k}=`), Buffer.from(v), Buffer.from("\n")]);
      let len = body.length + 1;
      while (String(len).length + body.length !== len) len = String(len).length + body.length;
      return Buffer.concat([Buffer.from(String(len)), body]);
    }),
  );
}

/** One member: a header and its data (padded). */
export function member(h: RawHeader, data: Buffer = Buffer.alloc(h.size)): Buffer {
  return Buffer.concat([header({ ...h, size: data.length }), data, padding(data.length)]);
}

export const END = Buffer.alloc(2 * BLOCK);

export interface Extracted {
  entries: Array<{ name: string; offset: number; pax: Record<string, string> | null }>;
  error?: Error;
}

/** What tar-stream makes of `bytes`: each entry's name, data offset and pax records, and its error if any. */
export async function extractAll(bytes: Buffer): Promise<Extracted> {
  const ex = tar.extract();
  const entries: Extracted["entries"] = [];
  const done = (async () => {
    for await (const e of ex) {
      const h = e.header as tar.Header & { byteOffset: number };
      entries.push({
        name: h.name,
        offset: h.byteOffset,
        pax: (h.pax ?? null) as Record<string, string> | null,
      });
      e.resume();
    }
  })();
  ex.end(bytes);
  try {
    await done;
    return { entries };
  } catch (error) {
    return { entries, error: error as Error };
  }
}
