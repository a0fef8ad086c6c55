import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { describe, test } from "node:test";
import { buildCpio } from "../../src/guest/cpio.ts";

describe("newc cpio writer", () => {
  test("GNU cpio lists what we wrote, device nodes included", () => {
    const archive = buildCpio([
      { path: "dev", type: "dir", mode: 0o755 },
      { path: "dev/console", type: "char", mode: 0o600, major: 5, minor: 1 },
      { path: "init", type: "file", mode: 0o755, data: Buffer.from("#!/bin/sh\necho hi\n") },
      { path: "lib/odd", type: "file", mode: 0o644, data: Buffer.from("x") },
    ]);
    assert.equal(archive.length % 512, 0);
    const r = spawnSync("cpio", ["-itv", "--quiet"], { input: archive });
    assert.equal(r.status, 0, r.stderr.toString());
    const out = r.stdout.toString();
    assert.match(out, /^drwxr-xr-x .* dev$/m);
    assert.match(out, /^crw------- .* 5,\s+1 .* dev\/console$/m);
    assert.match(out, /^-rwxr-xr-x .* 18 .* init$/m);
  });

  test("output is reproducible", () => {
    const e = [{ path: "a", type: "file" as const, mode: 0o644, data: Buffer.from("x") }];
    assert.ok(buildCpio(e).equals(buildCpio(e)));
  });
});
