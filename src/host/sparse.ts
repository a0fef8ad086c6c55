import { open } from "node:fs/promises";
import { loadLibc } from "./libc.ts";

/**
 * Copies of sparse disk images that stay sparse. A VM's upper disk is a 5 GB file holding a few MB:
 * a plain copy (or copy_file_range, which ext4 fills in) would write all of it. The data extents
 * come from lseek(SEEK_DATA/SEEK_HOLE), which Node does not expose (libc.ts); only those ranges are
 * copied.
 */

export interface Extent {
  offset: number;
  length: number;
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;

type Lseek = (fd: number, offset: bigint | number, whence: number) => bigint | number;
let lseek: Lseek | undefined;

function lib(): { lseek: Lseek; errno: () => number } {
  const libc = loadLibc();
  lseek ??= libc.func("int64_t lseek(int, int64_t, int)") as Lseek;
  return { lseek, errno: libc.errno };
}

/** The data extents of an open file, in order. A file system without SEEK_DATA gives one extent. */
export function dataExtents(fd: number, size: number): Extent[] {
  const { lseek, errno } = lib();
  const out: Extent[] = [];
  let pos = 0;
  while (pos < size) {
    const start = Number(lseek(fd, pos, SEEK_DATA));
    if (start < 0) {
      if (errno() === ENXIO) break; // only a hole from here to the end
      return [{ offset: 0, length: size }];
    }
    const end = Math.min(size, Number(lseek(fd, start, SEEK_HOLE)));
    if (end <= start) return [{ offset: 0, length: size }];
    out.push({ offset: start, length: end - start });
    pos = end;
  }
  return out;
}

const CHUNK = 1024 * 1024;

/** Copies `src` to a new file `dst` (mode 0600, must not exist), holes kept as holes. */
export async function copySparse(src: string, dst: string): Promise<void> {
  const from = await open(src, "r");
  try {
    const { size } = await from.stat();
    const to = await open(dst, "wx", 0o600);
    try {
      await to.truncate(size);
      const buf = Buffer.allocUnsafe(CHUNK);
      for (const e of dataExtents(from.fd, size)) {
        for (let off = e.offset; off < e.offset + e.length; ) {
          const want = Math.min(CHUNK, e.offset + e.length - off);
          const { bytesRead } = await from.read(buf, 0, want, off);
          if (bytesRead === 0) break;
          await to.write(buf, 0, bytesRead, off);
          off += bytesRead;
        }
      }
    } finally {
      await to.close();
    }
  } finally {
    await from.close();
  }
}
