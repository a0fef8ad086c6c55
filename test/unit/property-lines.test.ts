import assert from "node:assert/strict";
import { describe, test } from "node:test";
import fc from "fast-check";
import { type LineEvent, LineSplitter } from "../../src/rpc/lines.ts";
import { chunked, cutsArb, heapAfterGc, runs } from "../helpers/property.ts";

/**
 * Property tests of the JSON-RPC line splitter (`matchlock rpc` reads its requests through it). The
 * SECURITY.md row: "RPC: … huge line … → JSON-RPC error, server keeps serving".
 */

type Seen = ["line", string] | ["too_long", number];

/** The specification: split on \n; a line longer than max is reported by its length; no empty tail. */
function model(bytes: Buffer, max: number): Seen[] {
  const lines = bytes.toString("latin1").split("\n");
  const tail = lines.pop() as string;
  const out: Seen[] = lines.map((l) => (l.length > max ? ["too_long", l.length] : ["line", l]));
  if (tail.length > max) out.push(["too_long", tail.length]);
  else if (tail.length > 0) out.push(["line", tail]);
  return out;
}

const seen = (evs: LineEvent[]): Seen[] =>
  evs.map((e) => (e.kind === "line" ? ["line", e.line.toString("latin1")] : ["too_long", e.bytes]));

/** Lines of assorted lengths around the limit, some empty, joined by newlines (a last one maybe open). */
const streamArb = fc.integer({ min: 0, max: 40 }).chain((max) =>
  fc.record({
    max: fc.constant(max),
    bytes: fc
      .array(
        fc.oneof(
          fc.string({ unit: "binary-ascii", maxLength: max + 2 }),
          fc.string({ unit: "binary-ascii", minLength: max, maxLength: max * 3 + 3 }),
          fc.constant(""),
        ),
        { maxLength: 10 },
      )
      .chain((lines) =>
        fc.boolean().map((open) => Buffer.from(lines.join("\n") + (open ? "" : "\n"), "latin1")),
      ),
  }),
);

/** Bytes of the line the splitter is holding: read through its private counter. */
const held = (s: LineSplitter) => (s as unknown as { size: number }).size;

describe("RPC line splitter: property tests", () => {
  test("any chunking gives the lines and too-long reports of the whole stream, in order; lines after a too-long one still parse", () => {
    fc.assert(
      fc.property(streamArb, cutsArb, ({ max, bytes }, cuts) => {
        const s = new LineSplitter(max);
        const evs: Seen[] = [];
        for (const c of chunked(bytes, cuts)) evs.push(...seen(s.push(c)));
        evs.push(...seen(s.end()));
        assert.deepEqual(evs, model(bytes, max));
      }),
      runs(1000),
    );
  });

  test("rpc attack: a line over the limit is never held beyond the limit, whatever the chunking", () => {
    fc.assert(
      fc.property(streamArb, cutsArb, ({ max, bytes }, cuts) => {
        const s = new LineSplitter(max);
        for (const c of chunked(bytes, cuts)) {
          s.push(c);
          assert.ok(held(s) <= max, `holds ${held(s)} bytes of a line, limit ${max}`);
        }
      }),
      runs(1000),
    );
  });

  test("the caller may reuse its read buffer: lines are the same when every chunk is overwritten after use", () => {
    fc.assert(
      fc.property(streamArb, cutsArb, ({ max, bytes }, cuts) => {
        const s = new LineSplitter(max);
        const scratch = Buffer.alloc(bytes.length + 1);
        const evs: Seen[] = [];
        for (const c of chunked(bytes, cuts)) {
          c.copy(scratch);
          evs.push(...seen(s.push(scratch.subarray(0, c.length))));
          scratch.fill(0x5a); // the next read lands in the same memory
        }
        evs.push(...seen(s.end()));
        assert.deepEqual(evs, model(bytes, max));
      }),
      runs(500),
    );
  });

  test("rpc attack: a long line trickled one byte per read costs no more heap than a few times its size", () => {
    const max = 1024 * 1024;
    const s = new LineSplitter(max);
    const trickled = 256 * 1024;
    const before = heapAfterGc();
    for (let i = 0; i < trickled; i++) assert.deepEqual(s.push(Buffer.from([0x41])), []);
    const grown = heapAfterGc() - before;
    assert.ok(grown < 8 * trickled, `heap grew by ${(grown / 1048576).toFixed(0)} MiB for ${trickled} bytes`);
    const [ev] = s.push(Buffer.from("\n"));
    assert.equal(ev?.kind === "line" && ev.line.length, trickled);
  });
});
