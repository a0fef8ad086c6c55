#!/usr/bin/env -S node --
import * as nodeModule from "node:module";
import { homedir } from "node:os";
import { join } from "node:path";
import { unsupportedNodeMessage } from "../api/node-support.ts";

/**
 * What bin/matchlock runs: checks the Node version before any of the CLI loads, so an unsupported
 * Node stops with one line (what is needed, how to get it) instead of a link error, a stack trace
 * or better-sqlite3's segfault. Then main.ts runs as if it had been started itself (same argv).
 * Kept to syntax that any Node with ES modules parses: no top-level await, no `?.`/`??`.
 */

/**
 * Node's on-disk compile cache for the CLI's modules (V8 code cache, checked against each source):
 * later starts skip parsing and compiling them. In the cache dir (as api/paths.ts finds it), under
 * node-compile-cache. Only a time saver: a dir that cannot be made or written leaves it off (Node
 * reports that instead of throwing; a throw is caught all the same), NODE_COMPILE_CACHE set by the
 * user wins, and NODE_DISABLE_COMPILE_CACHE=1 turns it off.
 */
function enableCompileCache(): void {
  const enable = (nodeModule as { enableCompileCache?: (dir: string) => unknown }).enableCompileCache;
  if (typeof enable !== "function") return;
  try {
    const cache = process.env.MATCHLOCK_CACHE || join(homedir(), ".cache", "matchlock");
    enable(join(cache, "node-compile-cache"));
  } catch {}
}

const refusal = unsupportedNodeMessage(process.versions.node);
if (refusal === undefined) {
  enableCompileCache();
  import("./main.ts").catch((e: unknown) => {
    // main.ts reports its own errors; this is only a module that failed to load.
    process.stderr.write(`matchlock: internal error: ${e instanceof Error ? e.stack : String(e)}\n`);
    process.exitCode = 1;
  });
} else {
  process.stderr.write(`${refusal}\n`);
  process.exitCode = 1;
}
