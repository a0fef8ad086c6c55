#!/usr/bin/env -S node --
import { unsupportedNodeMessage } from "../api/node-support.ts";

/**
 * What bin/matchlock runs: checks the Node version before any of the CLI loads, so an unsupported
 * Node stops with one line (what is needed, how to get it) instead of a link error, a stack trace
 * or better-sqlite3's segfault. Then main.ts runs as if it had been started itself (same argv).
 * Kept to syntax that any Node with ES modules parses: no top-level await, no `?.`/`??`.
 */

const refusal = unsupportedNodeMessage(process.versions.node);
if (refusal === undefined) {
  import("./main.ts").catch((e: unknown) => {
    // main.ts reports its own errors; this is only a module that failed to load.
    process.stderr.write(`matchlock: internal error: ${e instanceof Error ? e.stack : String(e)}\n`);
    process.exitCode = 1;
  });
} else {
  process.stderr.write(`${refusal}\n`);
  process.exitCode = 1;
}
