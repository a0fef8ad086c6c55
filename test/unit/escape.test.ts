import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { escapeControls } from "../../src/cli/parse.ts";

/** Errors echo user input; printed raw, a hostile name could drive the terminal (issue #8). */

describe("error text is escaped before it reaches the terminal", () => {
  test("a VM name carrying ESC sequences (colour, retitle, clear screen) is shown inert", () => {
    const name = "\x1b[31mred\x1b]0;pwned\x07\x1b[2J";
    const out = escapeControls(`no VM ${name}`);
    assert.equal(out, "no VM \\x1b[31mred\\x1b]0;pwned\\x07\\x1b[2J");
    const controls = [...out].filter((c) => {
      const n = c.charCodeAt(0);
      return (n < 0x20 && c !== "\t") || (n >= 0x7f && n <= 0x9f);
    });
    assert.deepEqual(controls, []);
  });

  test("C1 controls (8-bit CSI), DEL, CR and bidi overrides are escaped; tab and text stay", () => {
    assert.equal(escapeControls("a\u009b2Jb"), "a\\u009b2Jb");
    assert.equal(escapeControls("x\x7fy\rz"), "x\\x7fy\\x0dz");
    assert.equal(escapeControls("file\u202etxt.exe"), "file\\u202etxt.exe");
    assert.equal(escapeControls("tab\there, ünïcödé ✓"), "tab\there, ünïcödé ✓");
  });

  test("a newline cannot forge a second line in a one-line message, but hints keep their lines", () => {
    assert.equal(escapeControls("bad\nmatchlock: fake"), "bad\\x0amatchlock: fake");
    assert.equal(escapeControls("l1\nl2\x1b[K", { keepNewlines: true }), "l1\nl2\\x1b[K");
  });
});
