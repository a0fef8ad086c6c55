import { FUSE_KERNEL_VERSION, IN_HEADER_SIZE, Op } from "../../src/vfs/fuse-abi.ts";
import type { FuseServer } from "../../src/vfs/server.ts";

/**
 * A fake guest kernel for unit tests: builds request messages byte by byte (as a hostile guest could)
 * and decodes the few reply fields the tests look at.
 */

export const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
};
export const u64 = (v: bigint | number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
};
export const cstr = (s: string | Buffer) => Buffer.concat([Buffer.from(s), Buffer.from([0])]);

export function message(opcode: number, nodeid: bigint, body: Buffer, unique = 1n, uid = 0, gid = 0): Buffer {
  const h = Buffer.alloc(IN_HEADER_SIZE);
  h.writeUInt32LE(IN_HEADER_SIZE + body.length, 0);
  h.writeUInt32LE(opcode, 4);
  h.writeBigUInt64LE(unique, 8);
  h.writeBigUInt64LE(nodeid, 16);
  h.writeUInt32LE(uid, 24);
  h.writeUInt32LE(gid, 28);
  h.writeUInt32LE(4242, 32);
  return Buffer.concat([h, body]);
}

export interface Reply {
  /** Negative errno, or 0. */
  error: number;
  body: Buffer;
}

export class FakeKernel {
  private unique = 10n;
  readonly server: FuseServer;
  constructor(server: FuseServer) {
    this.server = server;
  }

  async send(opcode: number, nodeid: bigint, body: Buffer = Buffer.alloc(0)): Promise<Reply | undefined> {
    const unique = this.unique++;
    const out = await this.server.handle(message(opcode, nodeid, body, unique));
    if (!out) return undefined;
    if (out.readUInt32LE(0) !== out.length) throw new Error("reply length mismatch");
    if (out.readBigUInt64LE(8) !== unique) throw new Error("reply unique mismatch");
    return { error: out.readInt32LE(4), body: out.subarray(16) };
  }

  async call(opcode: number, nodeid: bigint, body?: Buffer): Promise<Reply> {
    const r = await this.send(opcode, nodeid, body);
    if (!r) throw new Error(`no reply to opcode ${opcode}`);
    return r;
  }

  async init(minor = 38, flags = 0xffffffff): Promise<Reply> {
    return this.call(
      Op.INIT,
      0n,
      Buffer.concat([u32(FUSE_KERNEL_VERSION), u32(minor), u32(128 * 1024), u32(flags), Buffer.alloc(48)]),
    );
  }

  /** LOOKUP → nodeid (throws with the errno otherwise). */
  async lookup(
    parent: bigint,
    name: string,
  ): Promise<{ nodeid: bigint; mode: number; ino: bigint; nlink: number }> {
    const r = await this.call(Op.LOOKUP, parent, cstr(name));
    if (r.error) throw Object.assign(new Error(`lookup ${name}: ${r.error}`), { errno: -r.error });
    const e = entry(r.body);
    // nodeid 0: a negative entry, which the kernel reads as ENOENT.
    if (e.nodeid === 0n) throw Object.assign(new Error(`lookup ${name}: -2 (negative entry)`), { errno: 2 });
    return e;
  }

  async open(nodeid: bigint, flags: number): Promise<Reply & { fh: bigint }> {
    const r = await this.call(Op.OPEN, nodeid, Buffer.concat([u32(flags), u32(0)]));
    return { ...r, fh: r.error ? 0n : r.body.readBigUInt64LE(0) };
  }

  async create(parent: bigint, name: string, flags: number, mode: number): Promise<Reply & { fh: bigint }> {
    const r = await this.call(
      Op.CREATE,
      parent,
      Buffer.concat([u32(flags), u32(mode), u32(0), u32(0), cstr(name)]),
    );
    return { ...r, fh: r.error ? 0n : r.body.readBigUInt64LE(128) };
  }

  async read(fh: bigint, offset: number, size: number): Promise<Reply> {
    return this.call(
      Op.READ,
      0n,
      Buffer.concat([u64(fh), u64(offset), u32(size), u32(0), u64(0), u32(0), u32(0)]),
    );
  }

  async write(fh: bigint, offset: number, data: Buffer): Promise<Reply> {
    return this.call(
      Op.WRITE,
      0n,
      Buffer.concat([u64(fh), u64(offset), u32(data.length), u32(0), u64(0), u32(0), u32(0), data]),
    );
  }

  async release(fh: bigint): Promise<Reply> {
    return this.call(Op.RELEASE, 0n, Buffer.concat([u64(fh), u32(0), u32(0), u64(0)]));
  }

  async getattr(nodeid: bigint): Promise<Reply & { mode: number; size: number }> {
    const r = await this.call(Op.GETATTR, nodeid, Buffer.concat([u32(0), u32(0), u64(0)]));
    return {
      ...r,
      mode: r.error ? 0 : r.body.readUInt32LE(16 + 60),
      size: r.error ? 0 : Number(r.body.readBigUInt64LE(24)),
    };
  }

  /** SETATTR with the given valid bits and fields. */
  async setattr(
    nodeid: bigint,
    valid: number,
    f: {
      size?: number;
      mode?: number;
      uid?: number;
      gid?: number;
      atime?: number;
      mtime?: number;
      fh?: bigint;
    },
  ): Promise<Reply> {
    const b = Buffer.alloc(88);
    b.writeUInt32LE(valid, 0);
    b.writeBigUInt64LE(f.fh ?? 0n, 8);
    b.writeBigUInt64LE(BigInt(f.size ?? 0), 16);
    b.writeBigUInt64LE(BigInt(f.atime ?? 0), 32);
    b.writeBigUInt64LE(BigInt(f.mtime ?? 0), 40);
    b.writeUInt32LE(f.mode ?? 0, 68);
    b.writeUInt32LE(f.uid ?? 0, 76);
    b.writeUInt32LE(f.gid ?? 0, 80);
    return this.call(Op.SETATTR, nodeid, b);
  }

  async mkdir(parent: bigint, name: string, mode = 0o755): Promise<Reply> {
    return this.call(Op.MKDIR, parent, Buffer.concat([u32(mode), u32(0), cstr(name)]));
  }

  async symlink(parent: bigint, name: string, target: string): Promise<Reply> {
    return this.call(Op.SYMLINK, parent, Buffer.concat([cstr(name), cstr(target)]));
  }

  async link(oldNode: bigint, newParent: bigint, name: string): Promise<Reply> {
    return this.call(Op.LINK, newParent, Buffer.concat([u64(oldNode), cstr(name)]));
  }

  async unlink(parent: bigint, name: string): Promise<Reply> {
    return this.call(Op.UNLINK, parent, cstr(name));
  }

  async rename(parent: bigint, name: string, newParent: bigint, newName: string, flags = 0): Promise<Reply> {
    return this.call(
      Op.RENAME2,
      parent,
      Buffer.concat([u64(newParent), u32(flags), u32(0), cstr(name), cstr(newName)]),
    );
  }

  async setxattr(nodeid: bigint, name: string, value: Buffer): Promise<Reply> {
    return this.call(Op.SETXATTR, nodeid, Buffer.concat([u32(value.length), u32(0), cstr(name), value]));
  }

  async forget(nodeid: bigint, n: number): Promise<void> {
    await this.send(Op.FORGET, nodeid, u64(n));
  }

  async opendir(nodeid: bigint): Promise<bigint> {
    const r = await this.call(Op.OPENDIR, nodeid, Buffer.concat([u32(0), u32(0)]));
    if (r.error) throw new Error(`opendir: ${r.error}`);
    return r.body.readBigUInt64LE(0);
  }

  /** All names of a directory through READDIR (plus = READDIRPLUS), in pages of `size` bytes. */
  async list(nodeid: bigint, plus = false, size = 4096): Promise<{ name: string; nodeid: bigint }[]> {
    const fh = await this.opendir(nodeid);
    const out: { name: string; nodeid: bigint }[] = [];
    let offset = 0n;
    for (;;) {
      const r = await this.call(
        plus ? Op.READDIRPLUS : Op.READDIR,
        nodeid,
        Buffer.concat([u64(fh), u64(offset), u32(size), u32(0), u64(0), u32(0), u32(0)]),
      );
      if (r.error) throw new Error(`readdir: ${r.error}`);
      if (r.body.length === 0) break;
      let at = 0;
      while (at < r.body.length) {
        const id = plus ? r.body.readBigUInt64LE(at) : 0n;
        if (plus) at += 128;
        const namelen = r.body.readUInt32LE(at + 16);
        offset = r.body.readBigUInt64LE(at + 8);
        out.push({ name: r.body.subarray(at + 24, at + 24 + namelen).toString(), nodeid: id });
        at += (24 + namelen + 7) & ~7;
      }
    }
    await this.call(Op.RELEASEDIR, nodeid, Buffer.concat([u64(fh), u32(0), u32(0), u64(0)]));
    return out;
  }
}

export function entry(body: Buffer): { nodeid: bigint; mode: number; ino: bigint; nlink: number } {
  return {
    nodeid: body.readBigUInt64LE(0),
    ino: body.readBigUInt64LE(40),
    mode: body.readUInt32LE(40 + 60),
    nlink: body.readUInt32LE(40 + 64),
  };
}
