import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { NODE_ENGINES, nodeSupported, unsupportedNodeMessage } from "../../src/api/node-support.ts";
import { REPO } from "../helpers/cli.ts";

/** Which Node.js versions matchlock runs on: one rule for package.json, the CLI, the SDK and diagnose. */

test("package.json's engines.node is the range the code checks", () => {
  const pkg = JSON.parse(readFileSync(join(REPO, "package.json"), "utf8")) as { engines: { node: string } };
  assert.equal(pkg.engines.node, NODE_ENGINES);
  const lock = JSON.parse(readFileSync(join(REPO, "package-lock.json"), "utf8")) as {
    packages: Record<string, { engines?: { node: string } }>;
  };
  assert.equal(lock.packages[""]?.engines?.node, NODE_ENGINES);
});

test("22.15 and later 22s, and 24 on, are supported; older, 23 and garbage are not", () => {
  for (const v of ["22.15.0", "v22.15.0", "22.15.1", "22.23.5", "24.0.0", "24.21.0", "25.2.1", "30.0.0"])
    assert.equal(nodeSupported(v), true, v);
  for (const v of [
    "22.14.0",
    "22.0.0",
    "20.20.2",
    "v20.20.2",
    "18.19.0",
    "23.11.1",
    "23.8.0",
    "4.0.0",
    "",
    "x.y",
  ])
    assert.equal(nodeSupported(v), false, v);
});

test("the refusal is one line naming the version found, the versions needed and where to get them", () => {
  assert.equal(unsupportedNodeMessage("24.21.0"), undefined);
  const m = unsupportedNodeMessage("20.20.2");
  assert.ok(m);
  assert.doesNotMatch(m, /\n/);
  assert.match(m, /^matchlock needs Node\.js 24, or 22\.15 or a later 22 \(this is v20\.20\.2\); /);
  assert.match(m, /https:\/\/nodejs\.org/);
});
