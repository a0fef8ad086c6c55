import { createRequire } from "node:module";
import type cliProgressTypes from "cli-progress";
import type { PullProgress } from "../image/registry.ts";

/**
 * Pull progress: one bar per blob on a terminal (stderr, so stdout stays clean), nothing otherwise.
 * Gated on a real width: progress code spinning on a 0-column pty is a known trap.
 */
export function pullProgress(): { onProgress: (p: PullProgress) => void; stop: () => void } {
  const err = process.stderr;
  if (!err.isTTY || !(err.columns > 0)) return { onProgress: () => {}, stop: () => {} };
  // Loaded only when bars are shown: every `run` calls this, few need it.
  const cliProgress = createRequire(import.meta.url)("cli-progress") as typeof cliProgressTypes;
  const multi = new cliProgress.MultiBar(
    {
      stream: err,
      format: " {digest} [{bar}] {percentage}% {value_mb}/{total_mb} MB {state}",
      barsize: 24,
      hideCursor: true,
      clearOnComplete: false,
    },
    cliProgress.Presets.shades_classic,
  );
  const bars = new Map<string, cliProgressTypes.SingleBar>();
  const mb = (n: number) => (n / 1e6).toFixed(1);
  return {
    onProgress: (p) => {
      if (p.phase === "manifest") return;
      let bar = bars.get(p.digest);
      const payload = {
        digest: p.digest.slice(7, 19),
        value_mb: mb(p.done),
        total_mb: mb(p.total),
        state: "",
      };
      if (!bar) {
        bar = multi.create(Math.max(1, p.total), 0, payload);
        bars.set(p.digest, bar);
      }
      const state = p.phase === "exists" ? "already here" : p.phase === "verified" ? "verified" : "";
      bar.setTotal(Math.max(1, p.total));
      bar.update(p.phase === "exists" || p.phase === "verified" ? Math.max(1, p.total) : p.done, {
        ...payload,
        state,
      });
    },
    stop: () => multi.stop(),
  };
}
