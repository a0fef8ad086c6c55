import assert from "node:assert/strict";
import { test } from "node:test";
import { PhaseTimer } from "../../src/sandbox/phase-timer.ts";

test("PhaseTimer: each phase from the end of the previous one; the total; phases under 1 ms left out", async () => {
  const t = new PhaseTimer();
  await new Promise((r) => setTimeout(r, 30));
  t.mark("slow");
  t.mark("instant");
  await new Promise((r) => setTimeout(r, 15));
  t.mark("then");
  const m = /^(\d+) ms: slow (\d+), then (\d+)$/.exec(t.summary());
  assert.ok(m, t.summary());
  const [total, slow, then] = [Number(m[1]), Number(m[2]), Number(m[3])];
  assert.ok(slow >= 29 && then >= 14, t.summary());
  assert.ok(Math.abs(total - slow - then) <= 2, t.summary());
});
