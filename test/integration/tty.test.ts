import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { CLI, tempHome } from "../helpers/cli.ts";

/**
 * `run -t -i` in a real terminal: tmux gives matchlock a PTY, types into it and reads the screen,
 * as a person at a terminal would.
 */

const h = tempHome();
const session = `matchlock-test-${process.pid}`;
after(() => {
  spawnSync("tmux", ["kill-session", "-t", session]);
  h.cleanup();
});

function tmux(...args: string[]): string {
  return execFileSync("tmux", args, { encoding: "utf8" });
}

function screen(): string {
  return tmux("capture-pane", "-p", "-t", session);
}

async function waitFor(pred: (s: string) => boolean, what: string, ms = 90_000): Promise<string> {
  const end = Date.now() + ms;
  let s = "";
  while (Date.now() < end) {
    s = screen();
    if (pred(s)) return s;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}; screen:\n${s}`);
}

describe("interactive PTY", () => {
  test("a shell on a PTY: tty, window size, resize, Ctrl-C, exit code", async () => {
    const rcFile = join(h.home, "rc");
    const env = Object.entries({ MATCHLOCK_HOME: h.home, PATH: process.env.PATH ?? "" })
      .map(([k, v]) => `${k}='${v}'`)
      .join(" ");
    const cmd = `env ${env} '${process.execPath}' '${CLI}' run -t -i -- sh; echo "rc=$?" > '${rcFile}'`;
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd);

    // Typed before the guest shell is up: the bytes wait in the PTY and reach it in order.
    tmux("send-keys", "-t", session, "tty; stty size; echo MARK-$((40+2))", "Enter");
    let s = await waitFor((x) => x.includes("MARK-42"), "the shell to answer");
    assert.match(s, /\/dev\/pts\/\d+/);
    assert.match(s, /^30 100\s*$/m);

    tmux("resize-window", "-t", session, "-x", "120", "-y", "40");
    await new Promise((r) => setTimeout(r, 300));
    tmux("send-keys", "-t", session, "clear; stty size; echo MARK-$((40+3))", "Enter");
    s = await waitFor((x) => x.includes("MARK-43"), "the size after resize");
    assert.match(s, /^40 120\s*$/m);

    // Ctrl-C interrupts the foreground job in the guest, not matchlock.
    tmux("send-keys", "-t", session, "sleep 1000", "Enter");
    await new Promise((r) => setTimeout(r, 500));
    tmux("send-keys", "-t", session, "C-c");
    tmux("send-keys", "-t", session, "echo MARK-$((40+4))", "Enter");
    await waitFor((x) => x.includes("MARK-44"), "the shell after Ctrl-C");

    tmux("send-keys", "-t", session, "exit 3", "Enter");
    const end = Date.now() + 30_000;
    while (!existsSync(rcFile) && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
    assert.equal(readFileSync(rcFile, "utf8").trim(), "rc=3");
    assert.deepEqual(h.vmDirs(), []);
  });
});
