import assert from "node:assert/strict";
import { describe, test } from "node:test";
import fc from "fast-check";
import { AgentProtocolError, InvalidArgumentError } from "../../src/api/errors.ts";
import {
  decodeExec,
  type ExecRequest,
  encodeExec,
  encodeFrame,
  type Frame,
  FrameDecoder,
  GuestMsg,
  HEADER_SIZE,
  HostMsg,
  MAX_PAYLOAD,
  readDirEntries,
  readExit,
  readResult,
} from "../../src/guest/protocol.ts";
import { chunked, cutsArb, heapAfterGc, onlyThrows, runs } from "../helpers/property.ts";

/**
 * Property tests of the agent protocol codec (docs/agent-protocol.md): the guest is hostile, so every
 * byte it sends goes through these parsers. Attack rows of SECURITY.md: "guest agent sends oversized
 * or malformed frames".
 */

const guestTypes = Object.values(GuestMsg);
const hostTypes = Object.values(HostMsg);

const frameArb = (types: number[]) =>
  fc.record({
    type: fc.constantFrom(...types),
    stream: fc.nat({ max: 0xffffffff }),
    payload: fc.uint8Array({ maxLength: 600 }).map((a) => Buffer.from(a)),
  });

/** Frames a guest may send, with an occasional large payload so frames cross many chunks. */
const guestFramesArb = fc.array(
  fc.oneof(
    { weight: 9, arbitrary: frameArb(guestTypes) },
    {
      weight: 1,
      arbitrary: fc
        .record({ type: fc.constantFrom(...guestTypes), size: fc.integer({ min: 4096, max: 70_000 }) })
        .map(({ type, size }) => ({ type, stream: 7, payload: Buffer.alloc(size, type) })),
    },
  ),
  { maxLength: 12 },
);

const same = (got: Frame[], want: Frame[]) =>
  assert.deepEqual(
    got.map((f) => [f.type, f.stream, f.payload.toString("hex")]),
    want.map((f) => [f.type, f.stream, f.payload.toString("hex")]),
  );

/** Pushes every chunk; the frames it yields, or the typed error that stopped it. */
function decodeAll(d: FrameDecoder, chunks: Buffer[]): Frame[] {
  const out: Frame[] = [];
  for (const c of chunks) out.push(...d.push(c));
  return out;
}

/** Bytes the decoder holds: read through its private counter, the only view of what it buffers. */
const held = (d: FrameDecoder) => d.buffered;

describe("agent frames: property tests", () => {
  test("any split of a valid frame stream into chunks yields the same frames", () => {
    fc.assert(
      fc.property(guestFramesArb, cutsArb, (frames, cuts) => {
        const bytes = Buffer.concat(frames.map((f) => encodeFrame(f.type, f.stream, f.payload)));
        same(decodeAll(new FrameDecoder(), chunked(bytes, cuts)), frames);
      }),
      runs(500),
    );
  });

  test("host-to-guest frames decode the same way under any chunking (the exec relay's side)", () => {
    fc.assert(
      fc.property(fc.array(frameArb(hostTypes), { maxLength: 8 }), cutsArb, (frames, cuts) => {
        const bytes = Buffer.concat(frames.map((f) => encodeFrame(f.type, f.stream, f.payload)));
        same(decodeAll(new FrameDecoder("host"), chunked(bytes, cuts)), frames);
      }),
      runs(300),
    );
  });

  test("guest attack: arbitrary bytes only ever raise AgentProtocolError, and what is held stays under one frame", () => {
    // Valid frames with random bytes spliced in: the decoder must get past the valid prefix first.
    const noise = fc.uint8Array({ minLength: 1, maxLength: 64 }).map((a) => Buffer.from(a));
    const stream = fc
      .array(
        fc.oneof(
          frameArb(guestTypes).map((f) => encodeFrame(f.type, f.stream, f.payload)),
          noise,
        ),
        {
          maxLength: 8,
        },
      )
      .map((parts) => Buffer.concat(parts));
    fc.assert(
      fc.property(stream, cutsArb, (bytes, cuts) => {
        const d = new FrameDecoder();
        for (const c of chunked(bytes, cuts)) {
          const r = onlyThrows(AgentProtocolError, () => d.push(c));
          if (!r.ok) return;
          assert.ok(held(d) < HEADER_SIZE + MAX_PAYLOAD, `holds ${held(d)} bytes`);
          for (const f of r.value) assert.ok(f.payload.length <= MAX_PAYLOAD);
        }
      }),
      runs(1000),
    );
  });

  test("guest attack: a header claiming more than 1 MiB is refused when its ninth byte arrives, before any payload", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: MAX_PAYLOAD + 1, max: 0xffffffff }),
        fc.constantFrom(...guestTypes),
        fc.integer({ min: 1, max: HEADER_SIZE - 1 }),
        (len, type, cut) => {
          const h = Buffer.alloc(HEADER_SIZE);
          h.writeUInt32LE(len, 0);
          h.writeUInt8(type, 4);
          const d = new FrameDecoder();
          assert.deepEqual(d.push(h.subarray(0, cut)), []);
          assert.throws(() => d.push(h.subarray(cut)), AgentProtocolError);
        },
      ),
      runs(300),
    );
  });

  test("guest attack: a frame type the guest may not send is refused, whatever its length", () => {
    const bad = fc.integer({ min: 0, max: 255 }).filter((t) => !guestTypes.includes(t as never));
    fc.assert(
      fc.property(bad, fc.nat({ max: 0xffffffff }), (type, len) => {
        const h = Buffer.alloc(HEADER_SIZE);
        h.writeUInt32LE(len, 0);
        h.writeUInt8(type, 4);
        assert.throws(() => new FrameDecoder().push(h), AgentProtocolError);
      }),
      runs(300),
    );
  });

  test("guest attack: a frame trickled one byte per read costs the host no more heap than a few times its size", () => {
    const h = Buffer.alloc(HEADER_SIZE);
    h.writeUInt32LE(MAX_PAYLOAD, 0);
    h.writeUInt8(GuestMsg.STDOUT, 4);
    const d = new FrameDecoder();
    d.push(h);
    // A quarter of the frame is enough to see it (the whole MiB would take a second).
    const trickled = 256 * 1024;
    const before = heapAfterGc();
    for (let i = 0; i < trickled; i++) d.push(Buffer.from([i & 0xff]));
    const grown = heapAfterGc() - before;
    assert.ok(grown < 8 * trickled, `heap grew by ${(grown / 1048576).toFixed(0)} MiB for ${trickled} bytes`);
    assert.equal(d.push(Buffer.alloc(MAX_PAYLOAD - trickled)).length, 1);
  });
});

describe("agent payload readers: property tests", () => {
  const bytes = fc.uint8Array({ maxLength: 400 }).map((a) => Buffer.from(a));

  test("guest attack: readExit, readResult, readDirEntries and decodeExec on arbitrary bytes raise only AgentProtocolError", () => {
    fc.assert(
      fc.property(bytes, (p) => {
        for (const read of [readExit, readResult, readDirEntries, decodeExec])
          onlyThrows(AgentProtocolError, () => read(p));
      }),
      runs(1000),
    );
  });

  test("guest attack: directory listings of arbitrary bytes give well-formed entries or AgentProtocolError", () => {
    // Records that are mostly well framed (24-byte head, a name, a NUL) so the parser gets deep.
    const record = fc
      .tuple(fc.uint8Array({ minLength: 24, maxLength: 24 }), fc.string({ maxLength: 20 }), fc.boolean())
      .map(([head, name, nul]) =>
        Buffer.concat([head, Buffer.from(name), nul ? Buffer.from([0]) : Buffer.alloc(0)]),
      );
    fc.assert(
      fc.property(fc.array(record, { maxLength: 6 }), (records) => {
        const r = onlyThrows(AgentProtocolError, () => readDirEntries(Buffer.concat(records)));
        if (!r.ok) return;
        for (const e of r.value) {
          assert.ok(!e.name.includes("\0"));
          assert.ok(Number.isInteger(e.mode) && e.mode >= 0);
          assert.equal(typeof e.size, "number");
          assert.ok(!Number.isNaN(e.mtimeMs));
          assert.equal(e.isDir, (e.mode & 0o170000) === 0o040000);
        }
      }),
      runs(500),
    );
  });

  test("guest attack: decodeExec of arbitrary bytes yields a request with at least one argument, or AgentProtocolError", () => {
    const head = fc
      .record({
        flags: fc.nat({ max: 0xffffffff }),
        argc: fc.nat({ max: 6 }),
        envc: fc.nat({ max: 6 }),
        tail: fc.uint8Array({ maxLength: 80 }),
      })
      .map(({ flags, argc, envc, tail }) => {
        const h = Buffer.alloc(12);
        h.writeUInt32LE(flags, 0);
        h.writeUInt16LE(argc, 8);
        h.writeUInt16LE(envc, 10);
        return Buffer.concat([h, tail]);
      });
    fc.assert(
      fc.property(head, (p) => {
        const r = onlyThrows(AgentProtocolError, () => decodeExec(p));
        if (!r.ok) return;
        assert.equal(r.value.argv.length, p.readUInt16LE(8));
        assert.equal(r.value.env.length, p.readUInt16LE(10));
        assert.ok(r.value.argv.length >= 1);
      }),
      runs(1000),
    );
  });
});

describe("EXEC encoding: property tests", () => {
  // Any Unicode code point but NUL (lone surrogates cannot be UTF-8 and are not valid arguments).
  const text = fc.string({ unit: "binary", maxLength: 24 }).map((s) => s.replaceAll("\0", ""));
  const validReq: fc.Arbitrary<ExecRequest> = fc.record(
    {
      argv: fc.array(text, { minLength: 1, maxLength: 8 }),
      env: fc.array(text, { maxLength: 8 }),
      cwd: text,
      user: text,
      tty: fc.boolean(),
      stdin: fc.boolean(),
      mkdirCwd: fc.boolean(),
      rows: fc.integer({ min: 1, max: 0xffff }),
      cols: fc.integer({ min: 1, max: 0xffff }),
    },
    { noNullPrototype: true },
  );

  test("encodeExec → decodeExec round-trips every valid request", () => {
    fc.assert(
      fc.property(validReq, (req) => {
        assert.deepEqual(decodeExec(encodeExec(req)), req);
      }),
      runs(1000),
    );
  });

  /** What encodeExec must decide for `r`: refuse (and why) or encode in exactly `size` bytes. */
  function expected(r: ExecRequest): { refuse: boolean; size: number } {
    const strings = [r.user, r.cwd, ...r.argv, ...r.env];
    const size = 12 + strings.reduce((n, s) => n + Buffer.byteLength(s) + 1, 0);
    const refuse =
      r.argv.length === 0 ||
      r.argv.length > 0xffff ||
      r.env.length > 0xffff ||
      strings.some((s) => s.includes("\0")) ||
      size > MAX_PAYLOAD;
    return { refuse, size };
  }

  function checkEncode(r: ExecRequest) {
    const want = expected(r);
    const out = onlyThrows(InvalidArgumentError, () => encodeExec(r));
    assert.equal(!out.ok, want.refuse, `size ${want.size}, argc ${r.argv.length}, envc ${r.env.length}`);
    if (out.ok) assert.equal(out.value.length, want.size);
  }

  const flags = { tty: fc.boolean(), stdin: fc.boolean(), mkdirCwd: fc.boolean() };

  test("encodeExec refuses NULs anywhere, an empty argv and more than 65535 strings with InvalidArgumentError only", () => {
    const str = fc.oneof(
      { weight: 12, arbitrary: fc.string({ maxLength: 12 }) },
      { weight: 1, arbitrary: fc.constantFrom("\0", "a\0b", "x\0") },
    );
    const many = fc.oneof(
      { weight: 40, arbitrary: fc.array(str, { maxLength: 5 }) },
      // Rare: encoding 65535 strings takes ~0.1 s.
      { weight: 1, arbitrary: fc.constantFrom(65_535, 65_536).map((n) => Array<string>(n).fill("a")) },
    );
    fc.assert(
      fc.property(fc.record({ argv: many, env: many, cwd: str, user: str, ...flags }), checkEncode),
      runs(300),
    );
  });

  test("encodeExec takes a command of up to 1 MiB to the byte and refuses one byte more with InvalidArgumentError", () => {
    // One big argument sized around the limit, plus a few small strings: the boundary, cheaply.
    const big = "y".repeat(MAX_PAYLOAD);
    const req = fc
      .record({
        slack: fc.integer({ min: -3, max: 3 }),
        argv: fc.array(
          fc.string({ maxLength: 8 }).map((s) => s.replaceAll("\0", "")),
          { maxLength: 3 },
        ),
        env: fc.array(
          fc.string({ maxLength: 8 }).map((s) => s.replaceAll("\0", "")),
          { maxLength: 3 },
        ),
        ...flags,
      })
      .map(({ slack, argv, env, ...f }) => {
        const small = { argv, env, cwd: "/", user: "0", ...f };
        const room = MAX_PAYLOAD - expected({ ...small, argv: [...argv, ""] }).size;
        return { ...small, argv: [big.slice(0, Math.max(0, room + slack)), ...argv] };
      });
    fc.assert(fc.property(req, checkEncode), runs(40));
  });

  test("encodeExec sends a terminal size the guest can use (1-65535), whatever number it is given", () => {
    fc.assert(
      fc.property(fc.double(), fc.double(), (rows, cols) => {
        const base = { argv: ["sh"], env: [], cwd: "/", user: "0", tty: true, stdin: true, mkdirCwd: false };
        const got = decodeExec(encodeExec({ ...base, rows, cols }));
        for (const n of [got.rows, got.cols]) assert.ok(n !== undefined && n >= 1 && n <= 0xffff, `got ${n}`);
      }),
      runs(300),
    );
  });
});
