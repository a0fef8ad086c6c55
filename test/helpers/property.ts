import assert from "node:assert/strict";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import fc from "fast-check";

/**
 * Shared pieces of the property tests (test/unit/property-*.test.ts). Run counts are bounded so the
 * unit suite stays quick; fast-check prints the seed and the shrunk counterexample of a failure, and
 * `FC_SEED=<seed>` replays it. `FC_SCALE=50` multiplies every run count, for a deeper search by hand.
 */

const seed = process.env.FC_SEED === undefined ? undefined : Number(process.env.FC_SEED);
const scale = Number(process.env.FC_SCALE ?? 1) || 1;

export function runs(numRuns: number): fc.Parameters<unknown> {
  const n = Math.ceil(numRuns * scale);
  return seed === undefined ? { numRuns: n } : { numRuns: n, seed };
}

type ErrorClass = abstract new (...args: never[]) => Error;

/**
 * Calls `fn` and returns its result, or undefined if it threw an instance of `allowed`. Anything else
 * thrown (a TypeError, a RangeError…) fails the property with the offending error.
 */
export function onlyThrows<T>(allowed: ErrorClass, fn: () => T): { ok: true; value: T } | { ok: false } {
  try {
    return { ok: true, value: fn() };
  } catch (e) {
    if (e instanceof allowed) return { ok: false };
    assert.fail(
      `expected a result or ${allowed.name}, got ${e instanceof Error ? (e.stack ?? e) : String(e)}`,
    );
  }
}

/** The async form of onlyThrows. */
export async function onlyRejects<T>(
  allowed: ErrorClass,
  fn: () => Promise<T>,
): Promise<{ ok: true; value: T } | { ok: false; error: Error }> {
  try {
    return { ok: true, value: await fn() };
  } catch (e) {
    if (e instanceof allowed) return { ok: false, error: e };
    assert.fail(
      `expected a result or ${allowed.name}, got ${e instanceof Error ? (e.stack ?? e) : String(e)}`,
    );
  }
}

/** Splits `bytes` at arbitrary points: the chunking a socket may deliver. */
export function chunked(bytes: Buffer, cuts: number[]): Buffer[] {
  const at = [...new Set(cuts.map((c) => (bytes.length === 0 ? 0 : c % (bytes.length + 1))))].sort(
    (a, b) => a - b,
  );
  const out: Buffer[] = [];
  let prev = 0;
  for (const c of [...at, bytes.length]) {
    out.push(bytes.subarray(prev, c));
    prev = c;
  }
  return out;
}

/** Cut positions for `chunked`, including runs of one-byte chunks. */
export const cutsArb = fc.array(fc.nat(), { maxLength: 40 });

/**
 * Bytes of the V8 heap in use after a full collection: the one way to see what a parser keeps for
 * its buffers (Buffer objects live on the heap; their bytes do not), without knowing its internals.
 */
export function heapAfterGc(): number {
  setFlagsFromString("--expose-gc");
  (runInNewContext("gc") as () => void)();
  return process.memoryUsage().heapUsed;
}
