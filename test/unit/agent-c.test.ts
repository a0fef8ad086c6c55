import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import { agentBinaryPath } from "../../src/guest/agent-build.ts";
import { REPO } from "../helpers/cli.ts";

/**
 * The guest agent's own protocol suite (guest/agent/test_agent.py) against the built agent in its
 * `--stdio` mode: exec, PTYs, signals, files, flow control both ways (output stalls at the window
 * until acknowledged), cancelled reads, failed writes leaving no file, TCP streams, bad frames.
 */
test("the guest agent passes its protocol suite (flow control, files, TCP, hostile frames)", () => {
  const agent = agentBinaryPath(paths());
  assert.ok(existsSync(agent), `no agent at ${agent}: run \`matchlock setup\` first`);
  const r = spawnSync("python3", [join(REPO, "guest/agent/test_agent.py"), agent], {
    encoding: "utf8",
    timeout: 300_000,
  });
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, /all passed/);
  assert.doesNotMatch(r.stdout, /skipped/, "a case was skipped");
});
