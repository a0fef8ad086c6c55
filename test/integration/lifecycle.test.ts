import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import { CLI, qemuProcessesMentioning, runCli, tempHome } from "../helpers/cli.ts";

/** Signals, boot failures and setup: the edges of a VM's life, checked for leftovers. */

const h = tempHome();
after(() => h.cleanup());

/** Starts `run`, waits until the guest command printed `ready`, sends `signal`, returns the result. */
async function runAndSignal(signal: NodeJS.Signals, script: string, grace = "2s") {
  const child = spawn(
    process.execPath,
    [CLI, "run", "--graceful-shutdown", grace, "--", "sh", "-c", script],
    {
      env: h.env,
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let out = "";
  let err = "";
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const closed = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes("ready")) resolve();
    });
    child.on("close", () => reject(new Error(`exited before ready: ${err}`)));
  });
  const sentAt = Date.now();
  child.kill(signal);
  const code = await closed;
  return { code, out, err, ms: Date.now() - sentAt };
}

describe("signals stop the command gracefully and remove the VM", () => {
  test("SIGINT (Ctrl-C): the guest command gets SIGTERM and run exits with its status", async () => {
    const r = await runAndSignal(
      "SIGINT",
      "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.1; done",
    );
    assert.equal(r.code, 42, r.err);
    assert.match(r.out, /got-term/);
    assert.deepEqual(h.vmDirs(), []);
    assert.deepEqual(qemuProcessesMentioning(h.home), []);
  });

  test("SIGTERM to a command that ignores it: SIGKILL after the grace period, nothing left", async () => {
    const r = await runAndSignal("SIGTERM", "trap '' TERM; echo ready; sleep 1000", "1s");
    assert.equal(r.code, 137, r.err);
    assert.ok(r.ms >= 900, `exited after ${r.ms} ms, before the grace period`);
    assert.ok(r.ms < 20_000, `took ${r.ms} ms`);
    assert.deepEqual(h.vmDirs(), []);
    assert.deepEqual(qemuProcessesMentioning(h.home), []);
  });
});

describe("a VM that cannot boot", () => {
  test("a kernel path that does not exist is a clear error and leaves nothing behind", async () => {
    const r = await runCli(["run", "--", "true"], {
      env: { ...h.env, MATCHLOCK_KERNEL: "/no/such/vmlinux" },
    });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /MATCHLOCK_KERNEL=\/no\/such\/vmlinux: no such file/);
    assert.deepEqual(h.vmDirs(), []);
  });

  test("a file that is not a kernel: QEMU refuses it, the message says so, nothing is left", async () => {
    const bogus = join(h.home, "not-a-kernel");
    writeFileSync(bogus, "this is not a kernel\n");
    const r = await runCli(["run", "--", "true"], { env: { ...h.env, MATCHLOCK_KERNEL: bogus } });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /QEMU exited|VM .*before its agent was ready/);
    assert.match(r.stderr, /kernel/i);
    assert.doesNotMatch(r.stderr, /^\s+at /m);
    assert.deepEqual(h.vmDirs(), []);
    assert.deepEqual(qemuProcessesMentioning(h.home), []);
  });

  test("a guest that is not ready by the deadline is killed, with a clear message", async () => {
    // 0.05 s: less than a restore from a snapshot takes here (~0.3 s), so the deadline ends the
    // restore too, and then the cold boot it falls back to.
    const r = await runCli(["run", "--", "true"], { env: { ...h.env, MATCHLOCK_BOOT_TIMEOUT: "0.05" } });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /did not boot within 0\.05 s/);
    assert.match(r.stderr, /MATCHLOCK_BOOT_TIMEOUT/);
    assert.ok(r.ms < 15_000, `took ${r.ms} ms`);
    assert.deepEqual(h.vmDirs(), []);
    assert.deepEqual(qemuProcessesMentioning(h.home), []);
  });
});

describe("setup and diagnose", () => {
  test("setup a second time is a no-op: every step ok, no file in the cache changes", async () => {
    const cache = paths().cache;
    const before = snapshot(cache);
    const r = await runCli(["setup"], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, r.stderr);
    for (const stepName of ["packages", "kernel", "guest agent", "initramfs", "default image"]) {
      assert.match(r.stderr, new RegExp(`✓ ${stepName}\\s.*ok`), `${stepName} was redone:\n${r.stderr}`);
    }
    assert.deepEqual(snapshot(cache), before);
    assert.ok(r.ms < 30_000, `second setup took ${r.ms} ms`);
  });

  test("diagnose passes on a set-up host and lists each check with a mark", async () => {
    const r = await runCli(["diagnose"], { env: h.env });
    assert.equal(r.code, 0, r.stdout.toString());
    const out = r.stdout.toString();
    for (const name of ["platform", "qemu", "kvm", "kernel", "guest agent", "default image"]) {
      assert.match(out, new RegExp(`^[✓⚠] ${name}:`, "m"));
    }
    const json = await runCli(["diagnose", "--json"], { env: h.env });
    const parsed = JSON.parse(json.stdout.toString()) as { checks: Array<{ name: string; status: string }> };
    assert.ok(parsed.checks.every((c) => ["ok", "warn", "fail"].includes(c.status)));
  });

  test("diagnose fails with a fix line when the setup is missing", async () => {
    const empty = tempHome();
    try {
      const r = await runCli(["diagnose"], {
        env: { ...empty.env, MATCHLOCK_CACHE: join(empty.home, "cache") },
      });
      assert.equal(r.code, 1);
      assert.match(r.stdout.toString(), /✗ kernel: .*\n\s+fix: matchlock setup/);
    } finally {
      empty.cleanup();
    }
  });

  test("run before setup names the missing piece and the fix", async () => {
    const empty = tempHome();
    try {
      const r = await runCli(["run", "--", "true"], {
        env: { ...empty.env, MATCHLOCK_CACHE: join(empty.home, "cache") },
      });
      assert.equal(r.code, 1);
      assert.match(r.stderr, /not (built|installed)/);
      assert.match(r.stderr, /matchlock setup/);
    } finally {
      empty.cleanup();
    }
  });
});

function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const full = join(d, e.name);
      if (e.isDirectory()) walk(full);
      else {
        const s = statSync(full);
        out[full] = `${s.size}:${s.mtimeMs}`;
      }
    }
  };
  walk(dir);
  return out;
}
