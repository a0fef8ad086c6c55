/**
 * A writer for the `newc` cpio format the kernel unpacks as an initramfs. Hand-written (40 lines)
 * because it lets us emit device nodes and fixed owners/mtimes without root and without a shell
 * pipeline, and the output is byte-for-byte reproducible.
 */

export interface CpioEntry {
  path: string; // without leading "/"
  type: "file" | "dir" | "char" | "symlink";
  mode: number; // permission bits
  data?: Buffer; // file contents or symlink target
  major?: number;
  minor?: number;
}

const TYPE_BITS = { file: 0o100000, dir: 0o040000, char: 0o020000, symlink: 0o120000 } as const;

function hex8(n: number): string {
  return (n >>> 0).toString(16).padStart(8, "0");
}

function pad4(n: number): Buffer {
  return Buffer.alloc((4 - (n % 4)) % 4);
}

function record(ino: number, e: CpioEntry): Buffer[] {
  const name = Buffer.from(`${e.path}\0`);
  const data = e.data ?? Buffer.alloc(0);
  const fields = [
    ino,
    TYPE_BITS[e.type] | (e.mode & 0o7777),
    0, // uid
    0, // gid
    e.type === "dir" ? 2 : 1, // nlink
    0, // mtime: fixed, for reproducible output
    data.length,
    0, // dev major
    0, // dev minor
    e.major ?? 0,
    e.minor ?? 0,
    name.length,
    0, // check
  ];
  const header = Buffer.from(`070701${fields.map(hex8).join("")}`, "latin1");
  return [header, name, pad4(header.length + name.length), data, pad4(data.length)];
}

export function buildCpio(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  entries.forEach((e, i) => {
    parts.push(...record(i + 1, e));
  });
  parts.push(...record(0, { path: "TRAILER!!!", type: "file", mode: 0 }));
  const out = Buffer.concat(parts);
  return Buffer.concat([out, Buffer.alloc((512 - (out.length % 512)) % 512)]);
}
