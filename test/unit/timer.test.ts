import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { longTimeout, MAX_TIMER_MS } from "../../src/sandbox/sandbox.ts";

/** --timeout past 2^31-1 ms (24.8 days) overflowed setTimeout, which then fired at once (issue #8). */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("long timeouts", () => {
  test("a 30-day --timeout does not fire at once (a bare setTimeout would, after 1 ms)", async () => {
    let fired = false;
    const cancel = longTimeout(
      () => {
        fired = true;
      },
      30 * 24 * 3600 * 1000,
    );
    await sleep(100);
    assert.equal(fired, false);
    cancel();
    assert.ok(30 * 24 * 3600 * 1000 > MAX_TIMER_MS, "the case this test is about");
  });

  test("a delay longer than one timer can take fires on time, through chained timers", async () => {
    // The chunk is made small so the chaining is exercised in real time: 5 timers of 20 ms.
    const started = performance.now();
    const at = await new Promise<number>((resolve) => {
      longTimeout(() => resolve(performance.now()), 100, 20);
    });
    const elapsed = at - started;
    assert.ok(elapsed >= 100, `fired early, after ${elapsed} ms`);
    assert.ok(elapsed < 1000, `fired late, after ${elapsed} ms`);
  });

  test("cancel stops it between chained timers", async () => {
    let fired = false;
    const cancel = longTimeout(
      () => {
        fired = true;
      },
      60,
      10,
    );
    await sleep(25);
    cancel();
    await sleep(100);
    assert.equal(fired, false);
  });

  test("NaN is refused rather than becoming a 1 ms busy loop", () => {
    assert.throws(() => longTimeout(() => {}, Number.NaN), RangeError);
  });
});
