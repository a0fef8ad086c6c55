import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  encodeExec,
  encodeFrame,
  FrameDecoder,
  GuestMsg,
  HEADER_SIZE,
  MAX_PAYLOAD,
  readDirEntries,
  readExit,
} from "../../src/guest/protocol.ts";

function guestFrame(type: number, stream: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(HEADER_SIZE);
  h.writeUInt32LE(payload.length, 0);
  h.writeUInt8(type, 4);
  h.writeUInt32LE(stream, 5);
  return Buffer.concat([h, payload]);
}

describe("agent protocol codec", () => {
  test("frames split at every byte boundary decode to the same frames", () => {
    const bytes = Buffer.concat([
      guestFrame(GuestMsg.STDOUT, 3, Buffer.from("hello")),
      guestFrame(GuestMsg.EXIT, 3, Buffer.from([7, 0, 0, 0, 0, 0, 0, 0])),
      guestFrame(GuestMsg.READY, 0, Buffer.alloc(0)),
    ]);
    for (let cut = 0; cut <= bytes.length; cut++) {
      const d = new FrameDecoder();
      const frames = [...d.push(bytes.subarray(0, cut)), ...d.push(bytes.subarray(cut))];
      assert.equal(frames.length, 3);
      assert.equal(frames[0]?.payload.toString(), "hello");
      assert.equal(frames[0]?.stream, 3);
      assert.deepEqual(readExit(frames[1]?.payload as Buffer), { exitCode: 7, signal: 0 });
      assert.equal(frames[2]?.type, GuestMsg.READY);
    }
  });

  test("byte-at-a-time delivery of a large frame", () => {
    const payload = Buffer.alloc(70_000, 0xab);
    const bytes = guestFrame(GuestMsg.STDERR, 9, payload);
    const d = new FrameDecoder();
    const frames = [];
    for (let i = 0; i < bytes.length; i += 997) frames.push(...d.push(bytes.subarray(i, i + 997)));
    assert.equal(frames.length, 1);
    assert.ok(frames[0]?.payload.equals(payload));
  });

  test("guest attack: a frame claiming more than 1 MiB is rejected before buffering it", () => {
    const h = Buffer.alloc(HEADER_SIZE);
    h.writeUInt32LE(MAX_PAYLOAD + 1, 0);
    h.writeUInt8(GuestMsg.STDOUT, 4);
    assert.throws(() => new FrameDecoder().push(h), /limit/);
  });

  test("guest attack: an unknown frame type is rejected", () => {
    assert.throws(() => new FrameDecoder().push(guestFrame(0x42, 1, Buffer.alloc(0))), /unknown frame type/);
    // host-to-guest types are not valid from the guest either
    assert.throws(() => new FrameDecoder().push(guestFrame(0x01, 1, Buffer.alloc(0))), /unknown frame type/);
  });

  test("guest attack: malformed EXIT and directory payloads are rejected", () => {
    assert.throws(() => readExit(Buffer.alloc(3)), /EXIT frame/);
    assert.throws(() => readDirEntries(Buffer.alloc(10)), /truncated/);
    const noNul = Buffer.alloc(30, 0x41);
    assert.throws(() => readDirEntries(noNul), /without NUL|truncated/);
  });

  test("EXEC payload layout matches docs/agent-protocol.md", () => {
    const p = encodeExec({
      argv: ["sh", "-c", "x"],
      env: ["A=1"],
      cwd: "/tmp",
      user: "1000",
      tty: true,
      stdin: true,
      mkdirCwd: false,
      rows: 40,
      cols: 120,
    });
    assert.equal(p.readUInt32LE(0), 3);
    assert.equal(p.readUInt16LE(4), 40);
    assert.equal(p.readUInt16LE(6), 120);
    assert.equal(p.readUInt16LE(8), 3);
    assert.equal(p.readUInt16LE(10), 1);
    assert.deepEqual(p.subarray(12).toString().split("\0"), ["1000", "/tmp", "sh", "-c", "x", "A=1", ""]);
  });

  test("NUL bytes in arguments are refused instead of silently truncating them", () => {
    assert.throws(() =>
      encodeExec({ argv: ["a\0b"], env: [], cwd: "", user: "", tty: false, stdin: false, mkdirCwd: false }),
    );
  });

  test("encodeFrame refuses payloads over the limit", () => {
    assert.throws(() => encodeFrame(1, 1, Buffer.alloc(MAX_PAYLOAD + 1)));
  });

  test("directory entries parse", () => {
    const e = Buffer.alloc(24);
    e.writeUInt32LE(0o040755, 0);
    e.writeBigUInt64LE(4096n, 4);
    e.writeBigInt64LE(1700000000n, 12);
    e.writeUInt32LE(500_000_000, 20);
    const buf = Buffer.concat([e, Buffer.from("dir\0")]);
    assert.deepEqual(readDirEntries(buf), [
      { name: "dir", mode: 0o040755, size: 4096, mtimeMs: 1700000000500, isDir: true },
    ]);
  });
});

test("list_files modes are Go's os.FileMode bits, as Matchlock sends them", async () => {
  const { goFileMode } = await import("../../src/api/rpc.ts");
  assert.equal(goFileMode(0o100644), 0o644);
  assert.equal(goFileMode(0o040755), 2 ** 31 + 0o755);
  assert.equal(goFileMode(0o120777), 2 ** 27 + 0o777);
  assert.equal(goFileMode(0o041777), 2 ** 31 + 2 ** 20 + 0o777); // /tmp: dir + sticky
  assert.equal(goFileMode(0o104755), 2 ** 23 + 0o755); // setuid
  assert.equal(goFileMode(0o020666), 2 ** 26 + 2 ** 21 + 0o666); // char device
  assert.equal(goFileMode(0o010644), 2 ** 25 + 0o644); // fifo
});
