import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { appendFileSync, cpSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import {
  AGENT_CFLAGS,
  AGENT_SOURCE_DIR,
  agentBinaryPath,
  agentSourceHash,
  buildAgent,
} from "../../src/guest/agent-build.ts";
import { REPO } from "../helpers/cli.ts";

/**
 * The guest agent built from the sources in this checkout (as `matchlock setup` builds it, into a
 * scratch dir: no setup needed, no VM), then its own protocol suite (guest/agent/test_agent.py)
 * against it in `--stdio` mode.
 */

let scratch = "";
let agent = "";

before(async () => {
  scratch = mkdtempSync(join(tmpdir(), "matchlock-agent-c-"));
  const p = { ...paths(), guest: scratch };
  assert.equal(await buildAgent(p, () => {}), "built");
  agent = agentBinaryPath(p);
});

after(() => rmSync(scratch, { recursive: true, force: true }));

test("the agent compiles without a warning (-Werror) into one small static binary", () => {
  const sources = readdirSync(AGENT_SOURCE_DIR).filter((f) => f.endsWith(".c"));
  assert.ok(sources.length >= 7, `agent split by concern: ${sources.join(", ")}`);
  const r = spawnSync(
    process.env.CC ?? "cc",
    [...AGENT_CFLAGS, "-Werror", "-o", join(scratch, "werror"), ...sources],
    { cwd: AGENT_SOURCE_DIR, encoding: "utf8" },
  );
  assert.equal(r.status, 0, r.stderr);
  const elf = readFileSync(agent);
  assert.equal(elf.subarray(0, 4).toString("latin1"), "\x7fELF");
  const phoff = Number(elf.readBigUInt64LE(32));
  const types = Array.from({ length: elf.readUInt16LE(56) }, (_, i) =>
    elf.readUInt32LE(phoff + i * elf.readUInt16LE(54)),
  );
  assert.ok(!types.includes(3), "no PT_INTERP: statically linked, it runs as /init with no loader");
  const size = elf.length;
  assert.ok(size < 1024 * 1024, `agent of ${size} bytes`);
});

test("the build cache key changes with every agent source file (.c and .h)", async () => {
  const copy = join(scratch, "src");
  cpSync(AGENT_SOURCE_DIR, copy, { recursive: true });
  const base = await agentSourceHash(copy);
  assert.equal(base.hash, (await agentSourceHash()).hash);
  assert.ok(base.sources.includes("protocol.h") && base.sources.includes("agent.h"), base.sources.join());
  for (const f of base.sources) {
    cpSync(AGENT_SOURCE_DIR, copy, { recursive: true });
    appendFileSync(join(copy, f), "\n");
    assert.notEqual((await agentSourceHash(copy)).hash, base.hash, `${f} is not in the cache key`);
  }
});

/**
 * guest/agent/test_agent.py: exec, PTYs, signals, files, flow control both ways (output stalls at
 * the window until acknowledged), cancelled reads, failed writes leaving no file, TCP streams, bad
 * frames. Its numbers come from the generated guest/agent/protocol_consts.py.
 */
test("the guest agent passes its protocol suite (flow control, files, TCP, hostile frames)", () => {
  const r = spawnSync("python3", [join(REPO, "guest/agent/test_agent.py"), agent], {
    encoding: "utf8",
    timeout: 300_000,
  });
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, /all passed/);
  assert.doesNotMatch(r.stdout, /skipped/, "a case was skipped");
});
