import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { GENERATED_FILES, REPO_ROOT, staleFiles } from "../../scripts/gen-agent-protocol.ts";
import * as codec from "../../src/guest/protocol.ts";
import {
  BOOT_PARAMS,
  Constants,
  EXEC_FLAGS,
  ExecFlags,
  GUEST_MESSAGES,
  GuestMsg,
  HOST_MESSAGES,
  HostMsg,
} from "../../src/guest/protocol-spec.ts";

/**
 * The agent protocol is declared once (src/guest/protocol-spec.ts); the C header, the Python
 * constants and the docs' tables are generated from it. These tests keep the four in step.
 */

const AGENT_DIR = join(REPO_ROOT, "guest/agent");
const agentC = (): { file: string; text: string }[] =>
  readdirSync(AGENT_DIR)
    .filter((f) => f.endsWith(".c") || f === "agent.h")
    .map((file) => ({ file, text: readFileSync(join(AGENT_DIR, file), "utf8") }));

describe("agent protocol: one definition", () => {
  test("the generated files are up to date (npm run gen:protocol)", () => {
    assert.deepEqual(GENERATED_FILES.map((f) => f.path).sort(), [
      "docs/agent-protocol.md",
      "guest/agent/protocol.h",
      "guest/agent/protocol_consts.py",
    ]);
    assert.deepEqual(staleFiles(), [], "stale: run `node scripts/gen-agent-protocol.ts` and commit");
  });

  /**
   * Snapshot of everything on the wire. A change here changes the protocol between a host and the
   * agents already built into initramfs images: make it on purpose, here and in the spec.
   */
  test("snapshot: the wire codes and numbers", () => {
    assert.deepEqual(
      { HostMsg, GuestMsg, ExecFlags, Constants },
      {
        HostMsg: {
          EXEC: 0x01,
          STDIN: 0x02,
          RESIZE: 0x03,
          SIGNAL: 0x04,
          WRITE_FILE: 0x05,
          FILE_DATA: 0x06,
          READ_FILE: 0x07,
          LIST_DIR: 0x08,
          PING: 0x09,
          SHUTDOWN: 0x0a,
          TCP_CONNECT: 0x0b,
          TCP_DATA: 0x0c,
          CLOSE: 0x0d,
          ACK: 0x0e,
          ALLOW_LIST: 0x0f,
          PAUSE: 0x10,
          SET_IDENTITY: 0x11,
        },
        GuestMsg: {
          READY: 0x80,
          STDOUT: 0x81,
          STDERR: 0x82,
          EXIT: 0x83,
          ERROR: 0x84,
          STARTED: 0x85,
          STDIN_ACK: 0x86,
          DATA: 0x87,
          RESULT: 0x88,
          PONG: 0x89,
          LOG: 0x8a,
          TCP_CONNECTED: 0x8b,
          TCP_DATA: 0x8c,
          TCP_CLOSED: 0x8d,
        },
        ExecFlags: { TTY: 1, STDIN: 2, MKDIR_CWD: 4 },
        Constants: {
          HEADER_SIZE: 9,
          MAX_PAYLOAD: 1048576,
          WINDOW: 262144,
          CHUNK: 65536,
          DRAIN_MAX: 4194304,
          WRITE_REPLACE_LINK: 0x10000,
          AGENT_VERSION: "matchlock-agent 1",
          VFS_MAX_MESSAGE: 1048576,
        },
      },
    );
    assert.deepEqual(Object.keys(BOOT_PARAMS), [
      "matchlock.hostname",
      "matchlock.time",
      "matchlock.rootfstype",
      "matchlock.net",
      "matchlock.probe",
      "matchlock.rng",
      "matchlock.disk",
      "matchlock.fuse",
      "matchlock.vfs",
    ]);
  });

  test("codes are unique, one byte, and each direction keeps its range", () => {
    const all = [...Object.values(HostMsg), ...Object.values(GuestMsg)];
    assert.equal(new Set(all).size, all.length);
    for (const c of Object.values(HostMsg)) assert.ok(c >= 0x01 && c < 0x80, `host code ${c}`);
    for (const c of Object.values(GuestMsg)) assert.ok(c >= 0x80 && c <= 0xff, `guest code ${c}`);
    const flags = Object.values(ExecFlags);
    for (const f of flags) assert.equal(f & (f - 1), 0, `flag ${f} is one bit`);
    assert.equal(Object.keys(EXEC_FLAGS).length, flags.length);
  });

  test("the TS codec uses the spec's numbers", () => {
    assert.equal(codec.HostMsg, HostMsg);
    assert.equal(codec.GuestMsg, GuestMsg);
    assert.equal(codec.ExecFlags, ExecFlags);
    assert.equal(codec.HEADER_SIZE, Constants.HEADER_SIZE);
    assert.equal(codec.MAX_PAYLOAD, Constants.MAX_PAYLOAD);
    assert.equal(codec.WINDOW, Constants.WINDOW);
    assert.equal(codec.CHUNK, Constants.CHUNK);
    assert.equal(codec.WRITE_REPLACE_LINK, Constants.WRITE_REPLACE_LINK);
    assert.equal(codec.encodeFrame(HostMsg.PING, 1).length, Constants.HEADER_SIZE);
  });

  test("the C agent takes its numbers from protocol.h only", () => {
    for (const { file, text } of agentC()) {
      assert.doesNotMatch(text, /\bT_[A-Z_]+\b/, `${file}: an old T_ frame type name`);
      assert.doesNotMatch(text, /#define\s+(WINDOW|MAX_PAYLOAD|CHUNK|HDR|HEADER_SIZE|DRAIN_MAX)\b/, file);
      assert.doesNotMatch(text, /0x10000\b/, `${file}: WRITE_REPLACE_LINK spelled as a number`);
    }
    const c = agentC()
      .map((f) => f.text)
      .join("\n");
    // the agent serves every host message but the relay's, and may send every guest message
    for (const [name, m] of Object.entries(HOST_MESSAGES)) {
      const handled = new RegExp(`case H_${name}:`).test(c);
      assert.equal(handled, !("relayOnly" in m && m.relayOnly), `H_${name} handled by the agent: ${handled}`);
    }
    for (const name of Object.keys(GUEST_MESSAGES))
      assert.match(c, new RegExp(`\\bG_${name}\\b`), `G_${name}`);
  });

  test("the boot parameters the agent reads are the documented ones", () => {
    const init = readFileSync(join(AGENT_DIR, "init.c"), "utf8");
    const read = [...init.matchAll(/"(matchlock\.[a-z]+)=/g)].map((m) => m[1]);
    assert.deepEqual([...new Set(read)].sort(), Object.keys(BOOT_PARAMS).sort());
  });

  test("test_agent.py takes its numbers from the generated module", () => {
    const py = readFileSync(join(AGENT_DIR, "test_agent.py"), "utf8");
    assert.match(py, /^from protocol_consts import .*\bGuestMsg\b.*\bHostMsg\b/m);
    assert.doesNotMatch(py, /= range\(0x80|= range\(1, 0x|TCP_RDATA/, "frame types defined again");
  });

  test("the docs name the relay greeting the relay sends", () => {
    const relay = readFileSync(join(REPO_ROOT, "src/sandbox/relay.ts"), "utf8");
    const version = /RELAY_VERSION = "([^"]+)"/.exec(relay)?.[1];
    assert.ok(version, "RELAY_VERSION in src/sandbox/relay.ts");
    assert.ok(HOST_MESSAGES.ALLOW_LIST.meaning.includes(`\`${version}\``), HOST_MESSAGES.ALLOW_LIST.meaning);
  });
});
