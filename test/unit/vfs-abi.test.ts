import assert from "node:assert/strict";
import { describe, test } from "node:test";
import fc from "fast-check";
import {
  checkName,
  FUSE_MAX_MINOR,
  FuseDecodeError,
  Init,
  Op,
  Reader,
  readInHeader,
} from "../../src/vfs/fuse-abi.ts";
import { MemoryProvider } from "../../src/vfs/memory.ts";
import { FuseServer } from "../../src/vfs/server.ts";
import { cstr, FakeKernel, message, u32, u64 } from "../helpers/fuse-client.ts";
import { runs } from "../helpers/property.ts";

/** The wire decoding: bounds-checked, never a throw past the server, answers well-formed. */

const quiet = () => {};

function newServer(): FuseServer {
  return new FuseServer({ provider: new MemoryProvider(), log: quiet });
}

/** A reply is either nothing or a well-formed out message for that request. */
function checkReply(msg: Buffer, out: Buffer | undefined): void {
  if (!out) return;
  assert.equal(out.readUInt32LE(0), out.length);
  assert.ok(out.length >= 16);
  const err = out.readInt32LE(4);
  assert.ok(err <= 0 && err > -4096, `error ${err}`);
  if (msg.length >= 16) assert.equal(out.readBigUInt64LE(8), msg.readBigUInt64LE(8));
}

describe("FUSE ABI", () => {
  test("Reader refuses to read past the end", () => {
    const r = new Reader(Buffer.from([1, 2, 3]));
    assert.throws(() => r.u32(), FuseDecodeError);
    assert.throws(() => new Reader(Buffer.from("abc")).cbytes(10), FuseDecodeError);
    assert.throws(() => new Reader(Buffer.from("abcdef\0")).cbytes(3), FuseDecodeError);
  });

  test("a header whose length disagrees with the message is refused", () => {
    const m = message(Op.GETATTR, 1n, Buffer.alloc(16));
    m.writeUInt32LE(m.length + 1, 0);
    assert.throws(() => readInHeader(m), FuseDecodeError);
  });

  test("names: '.', '..', '/', empty, too long and non-UTF-8 are refused", () => {
    for (const bad of [".", "..", "a/b", ""]) assert.ok("errno" in checkName(Buffer.from(bad)), bad);
    assert.deepEqual(checkName(Buffer.alloc(256, 0x61)), { errno: "ENAMETOOLONG" });
    assert.deepEqual(checkName(Buffer.from([0xff, 0xfe])), { errno: "EINVAL" });
    assert.deepEqual(checkName(Buffer.from("ok")), { name: "ok" });
  });

  test("INIT answers the kernel's minor capped at ours, with only flags the kernel offered", async () => {
    const k = new FakeKernel(newServer());
    const r = await k.init(40, Init.ASYNC_READ | Init.BIG_WRITES | Init.WRITEBACK_CACHE | Init.POSIX_LOCKS);
    assert.equal(r.error, 0);
    assert.equal(r.body.readUInt32LE(0), 7);
    assert.equal(r.body.readUInt32LE(4), FUSE_MAX_MINOR);
    const flags = r.body.readUInt32LE(12);
    assert.equal(flags, Init.ASYNC_READ | Init.BIG_WRITES, "no writeback cache, no posix locks");
    assert.equal(r.body.readUInt32LE(20), 128 * 1024, "max_write");
    const older = await new FakeKernel(newServer()).init(26, 0);
    assert.equal(older.body.readUInt32LE(4), 26);
    assert.equal((await new FakeKernel(newServer()).init(5, 0)).error, -71, "EPROTO below 7.12");
  });

  test("requests before INIT get EIO; unknown opcodes ENOSYS", async () => {
    const k = new FakeKernel(newServer());
    assert.equal((await k.call(Op.GETATTR, 1n, Buffer.alloc(16))).error, -5);
    await k.init();
    assert.equal((await k.call(9999, 1n)).error, -38);
    assert.equal((await k.call(Op.GETLK, 1n, Buffer.alloc(48))).error, -38);
    assert.equal((await k.call(Op.GETATTR, 1n, Buffer.alloc(16))).error, 0);
  });

  test("truncated bodies of every opcode get an error reply, never a throw", async () => {
    const k = new FakeKernel(newServer());
    await k.init();
    for (const op of Object.values(Op)) {
      if (op === Op.INIT || op === Op.DESTROY) continue;
      const r = await k.send(op, 1n, Buffer.from([1, 2, 3]));
      if (op === Op.FORGET || op === Op.BATCH_FORGET || op === Op.INTERRUPT) {
        assert.equal(r, undefined);
        continue;
      }
      assert.ok(r, `opcode ${op}`);
      // These take no body (or ignore it): they may succeed.
      if (op === Op.STATFS || op === Op.FSYNCDIR || op === Op.SYNCFS) continue;
      assert.ok(r.error < 0, `opcode ${op} → ${r.error}`);
    }
  });

  test("property: random messages never throw and always get a well-formed answer", async () => {
    const server = newServer();
    await new FakeKernel(server).init();
    const ops = fc.constantFrom(...Object.values(Op).filter((o) => o !== Op.DESTROY && o !== Op.INIT));
    await fc.assert(
      fc.asyncProperty(
        ops,
        fc.bigInt({ min: 0n, max: 20n }),
        fc.uint8Array({ maxLength: 300 }),
        fc.integer({ min: -8, max: 8 }),
        async (op, nodeid, body, lenDelta) => {
          const m = message(op, nodeid, Buffer.from(body));
          if (lenDelta !== 0) m.writeUInt32LE(Math.max(0, m.length + lenDelta), 0);
          checkReply(m, await server.handle(m));
        },
      ),
      runs(2000),
    );
  });

  test("property: any prefix of a valid request is answered or dropped, never a throw", async () => {
    const server = newServer();
    const k = new FakeKernel(server);
    await k.init();
    await k.create(1n, "f", 2, 0o644);
    const valid = [
      message(Op.LOOKUP, 1n, cstr("f")),
      message(Op.MKDIR, 1n, Buffer.concat([u32(0o755), u32(0), cstr("d")])),
      message(Op.RENAME2, 1n, Buffer.concat([u64(1), u32(0), u32(0), cstr("f"), cstr("g")])),
      message(Op.SETXATTR, 1n, Buffer.concat([u32(3), u32(0), cstr("user.a"), Buffer.from("abc")])),
      message(
        Op.WRITE,
        1n,
        Buffer.concat([u64(1), u64(0), u32(5), u32(0), u64(0), u32(0), u32(0), Buffer.from("hello")]),
      ),
      message(Op.BATCH_FORGET, 0n, Buffer.concat([u32(2), u32(0), u64(2), u64(1)])),
    ];
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...valid), fc.nat(), fc.boolean(), async (m, cut, fixLen) => {
        const t = Buffer.from(m.subarray(0, cut % (m.length + 1)));
        if (fixLen && t.length >= 4) t.writeUInt32LE(t.length, 0);
        checkReply(t, await server.handle(t));
      }),
      runs(2000),
    );
  });

  test("an oversized message is refused without being parsed", async () => {
    const server = newServer();
    await new FakeKernel(server).init();
    const big = message(Op.WRITE, 1n, Buffer.alloc(server.maxMessageSize));
    const out = await server.handle(big);
    assert.ok(out);
    assert.equal(out.readInt32LE(4), -5);
  });
});
