import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import { isVmId, newVmId, parseVmId } from "../../src/api/ids.ts";
import { paths, vmDir } from "../../src/api/paths.ts";
import { runCli, tempHome } from "../helpers/cli.ts";

/** VM ids become paths (~/.matchlock/vms/<id>, its relay socket): only the exact id format gets through. */

const HOSTILE = [
  "../../evil",
  "../evil",
  "vm-../../x",
  "/etc/passwd",
  "vm-0a1b2c3d/../../x",
  "vm-0a1b2c3d/",
  "vm-0a1b2c3d\n",
  " vm-0a1b2c3d",
  "vm-0a1b\0c3d",
  "vm-0a1b2c3",
  "vm-0a1b2c3d0",
  "vm-0A1B2C3D",
  "VM-0a1b2c3d",
  "vm-0a1b2c3g",
  "",
];

function refusal(id: string): InvalidArgumentError {
  try {
    parseVmId(id);
  } catch (e) {
    assert.ok(e instanceof InvalidArgumentError, `not an InvalidArgumentError: ${String(e)}`);
    return e;
  }
  assert.fail(`${JSON.stringify(id)} was accepted`);
}

describe("VM ids", () => {
  test("parseVmId accepts every id newVmId makes, and returns it unchanged", () => {
    for (let i = 0; i < 2000; i++) {
      const id = newVmId();
      assert.equal(parseVmId(id), id);
      assert.ok(isVmId(id));
    }
    assert.equal(parseVmId("vm-0a1b2c3d"), "vm-0a1b2c3d");
  });

  test("path traversal, absolute paths, NUL, whitespace, wrong length or case: refused naming the id", () => {
    for (const id of HOSTILE) {
      const e = refusal(id);
      assert.equal(e.code, "INVALID_ARGUMENT");
      assert.match(e.message, /^invalid VM id ".*": a VM id is vm- followed by 8 hex digits/);
      assert.match(e.hint ?? "", /matchlock list/);
    }
    assert.match(refusal("../../evil").message, /"\.\.\/\.\.\/evil"/);
  });

  test("a hostile id echoed in the error cannot drive the terminal: control and bidi characters are escaped", () => {
    const msg = refusal("\x1b[2J\x1b]0;owned\x07vm-\r\n\u202e\u200b\x7f\x9b").message;
    assert.ok(!/[\p{Cc}\p{Cf}]/u.test(msg), `raw control or format characters in ${JSON.stringify(msg)}`);
    assert.ok(msg.includes("\\x1b[2J\\x1b]0;owned\\x07vm-\\x0d\\x0a\\u{202e}\\u{200b}\\x7f\\x9b"), msg);
    const long = refusal(`vm-${"a".repeat(5000)}`).message;
    assert.ok(long.length < 300, "a huge id is cut when echoed");
    assert.match(long, /…\(5003 characters\)/);
  });

  test("vmDir refuses a path-like id itself (the last line of defence)", () => {
    const p = paths({ MATCHLOCK_HOME: "/nonexistent/home" });
    assert.equal(vmDir("vm-0a1b2c3d", p), "/nonexistent/home/vms/vm-0a1b2c3d");
    for (const id of HOSTILE) assert.throws(() => vmDir(id, p), InvalidArgumentError);
  });
});

describe("every command that takes a VM id refuses one that is a path", () => {
  const h = tempHome();
  after(() => h.cleanup());

  /** A socket where `vms/../evil/relay.sock` points: what the attack would reach. */
  async function bait(): Promise<{ connections: () => number; close: () => void }> {
    const dir = join(h.home, "evil");
    mkdirSync(dir, { recursive: true });
    let n = 0;
    const server = createServer((c) => {
      n++;
      c.destroy();
    });
    await new Promise<void>((resolve) => server.listen(join(dir, "relay.sock"), resolve));
    return { connections: () => n, close: () => server.close() };
  }

  const commands: string[][] = [
    ["get", "../evil"],
    ["inspect", "../evil"],
    ["log", "../evil"],
    ["kill", "../evil"],
    ["rm", "../evil"],
    ["rm", "vm-0a1b2c3d", "../evil"],
    ["gc", "../evil"],
    ["port-forward", "../evil", "18080:80"],
    ["pause", "../evil"],
    ["resume", "../evil"],
    ["pause", "vm-0a1b2c3d", "../evil"],
  ];
  for (const args of commands) {
    test(`matchlock ${args.join(" ")}: one line naming the bad id, exit 1, the socket outside is never reached`, async () => {
      const b = await bait();
      try {
        const r = await runCli(args, { env: h.env });
        assert.equal(r.code, 1, r.stderr);
        const lines = r.stderr.trimEnd().split("\n");
        assert.equal(
          lines[0],
          'matchlock: invalid VM id "../evil": a VM id is vm- followed by 8 hex digits (like vm-0a1b2c3d)',
        );
        assert.ok(lines.length <= 2 && !/\n\s+at /.test(r.stderr), `a stack trace: ${r.stderr}`);
        assert.equal(b.connections(), 0, "connected to a socket outside ~/.matchlock");
      } finally {
        b.close();
      }
    });
  }

  test("matchlock exec ../evil -- true: refused before it connects to the socket outside", async () => {
    const b = await bait();
    try {
      const r = await runCli(["exec", "../evil", "--", "true"], { env: h.env });
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, /^matchlock: invalid VM id "\.\.\/evil"/);
      assert.equal(b.connections(), 0, "connected to a socket outside ~/.matchlock");
    } finally {
      b.close();
    }
  });
});
