import assert from "node:assert/strict";
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { RPC_CODES } from "../../src/sdk/index.ts";
import { CLI, qemuProcessesMentioning, REPO, runCli, tempHome } from "../helpers/cli.ts";

/**
 * Issue #8: hostile or malformed input to `run` and `rpc` — an env file that would load code into
 * the host Node process, oversized commands, relative working dirs, empty images, unknown config
 * keys, escape sequences in errors — and a VM that dies on its own. Real processes, real VMs.
 */

const h = tempHome();
const work = mkdtempSync(join(tmpdir(), "matchlock-hardening-"));
after(() => {
  h.cleanup();
  rmSync(work, { recursive: true, force: true });
});

const BIN = join(REPO, "bin", "matchlock");
/** The Node 24 of node_modules first on PATH, as `npm` scripts and a user's shell after `npm ci`. */
const env: NodeJS.ProcessEnv = {
  ...h.env,
  PATH: `${join(REPO, "node_modules", ".bin")}:${process.env.PATH}`,
};

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs any program (the launchers under test, not only `node main.js`) and collects its output. */
function runProgram(
  cmd: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<Result> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: opts.env ?? env, cwd: REPO, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs ?? 180_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, ms: Date.now() - started });
    });
  });
}

/**
 * The attack: an env file whose NODE_OPTIONS makes Node `--require` a script that writes a marker.
 * `tail` lines follow it (a bad line makes matchlock's own parser stop, proving it read the file).
 */
function hostileEnvFile(name: string, tail: string[]): { file: string; marker: string } {
  const marker = join(work, `${name}.marker`);
  const payload = join(work, `${name}.cjs`);
  writeFileSync(payload, `require("node:fs").writeFileSync(${JSON.stringify(marker)}, "host code ran");\n`);
  const file = join(work, `${name}.env`);
  writeFileSync(file, [`NODE_OPTIONS=--require=${payload}`, ...tail, ""].join("\n"));
  return { file, marker };
}

const oneLine = (r: Result) => r.stderr.trim().split("\n");

describe("--env-file never loads code into the host process", () => {
  test("bin/matchlock: an env file with NODE_OPTIONS=--require never runs its code on the host", async () => {
    const { file, marker } = hostileEnvFile("bin", ["1BAD=x"]);
    const r = await runProgram(BIN, ["run", "--env-file", file, "--", "true"]);
    assert.equal(existsSync(marker), false, "the payload ran in the host matchlock process");
    assert.equal(r.code, 1);
    // matchlock's own parser read the file (and stopped at line 2), not Node's.
    assert.deepEqual(oneLine(r), [
      `matchlock: ${file}:2: invalid environment variable name "1BAD" in "1BAD=x"`,
    ]);
  });

  // npx is itself a Node program: in `npx matchlock run --env-file F` it is npm's own Node that finds
  // --env-file in its argv and loads F, before any matchlock code exists; no launcher of ours can
  // stop that. `npx -- matchlock …` (the form to document) ends npx's options, and Node's scan with
  // them; from there bin/matchlock keeps matchlock's own Node immune.
  test("npx -- matchlock: an env file with NODE_OPTIONS=--require never runs its code on the host", async () => {
    const { file, marker } = hostileEnvFile("npx", ["1BAD=x"]);
    const r = await runProgram("npx", [
      "--offline",
      "--",
      "matchlock",
      "run",
      "--env-file",
      file,
      "--",
      "true",
    ]);
    assert.equal(existsSync(marker), false, "the payload ran in a host Node process");
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /invalid environment variable name "1BAD"/);
  });

  test("dist/cli/main.js run directly (its shebang): an env file with NODE_OPTIONS never runs on the host", async () => {
    assert.match(readFileSync(CLI, "utf8").split("\n")[0] ?? "", /^#!\/usr\/bin\/env -S node --$/);
    const { file, marker } = hostileEnvFile("shebang", ["1BAD=x"]);
    const r = await runProgram(CLI, ["run", `--env-file=${file}`, "--", "true"]);
    assert.equal(existsSync(marker), false, "the payload ran in the host matchlock process");
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /invalid environment variable name "1BAD"/);
  });

  test("run -d: the background owner it re-spawns never loads the env file into its Node", async () => {
    const { file, marker } = hostileEnvFile("detach", ["FOO=bar"]);
    // A bad MATCHLOCK_BOOT_TIMEOUT makes the background owner stop before booting a VM; the error it
    // reports back proves it started (and so had every chance to load the env file).
    const r = await runProgram(BIN, ["run", "-d", "--env-file", file, "--", "true"], {
      env: { ...env, MATCHLOCK_BOOT_TIMEOUT: "soon" },
    });
    assert.equal(existsSync(marker), false, "the payload ran in the background owner");
    assert.equal(r.code, 1);
    assert.match(r.stderr, /MATCHLOCK_BOOT_TIMEOUT=soon is not a number of seconds/);
  });

  test("--env-file /nonexistent is matchlock's one-line error naming the file, not Node's", async () => {
    const r = await runProgram(BIN, ["run", "--env-file", "/nonexistent", "--", "true"]);
    assert.equal(r.code, 1);
    assert.deepEqual(oneLine(r), ["matchlock: --env-file /nonexistent: no such file"]);
  });

  test("--env-file /dev/zero is refused at the size bound instead of growing without limit", async () => {
    const r = await runProgram(BIN, ["run", "--env-file", "/dev/zero", "--", "true"]);
    assert.equal(r.code, 1);
    assert.deepEqual(oneLine(r), ["matchlock: --env-file /dev/zero: larger than 1 MiB; refused"]);
  });

  test("the env file's variables still reach the guest command while NODE_OPTIONS never runs on the host", async () => {
    const { file, marker } = hostileEnvFile("guest", ["FOO=from-the-env-file"]);
    const r = await runProgram(BIN, ["run", "--env-file", file, "--", "sh", "-c", 'echo "$FOO"']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "from-the-env-file\n");
    assert.equal(existsSync(marker), false, "the payload ran in the host matchlock process");
  });
});

describe("bad commands are refused before anything boots", () => {
  const run = (args: string[]) => runCli(["run", ...args], { env: h.env });

  test("run -- true $(seq 1 70000): one clear line and exit 1 in well under a second, no VM dir", async () => {
    // Starting the CLI at all costs ~0.3 s (more on a loaded host): time the refusal beyond that.
    const startup = await runCli(["--version"], { env: h.env });
    const r = await run(["--", "true", ...Array.from({ length: 70_000 }, (_, i) => String(i + 1))]);
    assert.equal(r.code, 1);
    assert.deepEqual(r.stderr.trim().split("\n"), [
      "matchlock: 70001 arguments: at most 65535 fit in one command",
    ]);
    assert.ok(r.ms - startup.ms < 1000, `took ${r.ms} ms (the CLI starts in ${startup.ms} ms)`);
    // Nothing was created: no VM dir, no record, no QEMU.
    assert.deepEqual(h.vmDirs(), []);
    assert.equal((await runCli(["list"], { env: h.env })).stdout.toString().trim().split("\n").length, 1);
    assert.deepEqual(qemuProcessesMentioning(h.home), []);
  });

  test("over 1 MiB of arguments is refused before boot, with a hint", async () => {
    const big = "x".repeat(100_000);
    const r = await run(["--", "echo", ...Array.from({ length: 12 }, () => big)]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^matchlock: the command line and environment take \d+ bytes; at most \d+ fit/);
    assert.deepEqual(h.vmDirs(), []);
  });

  test("-w relative is refused like Docker, naming it, instead of running in /relative", async () => {
    const r = await run(["-w", "relative", "--", "pwd"]);
    assert.equal(r.code, 1);
    assert.deepEqual(r.stderr.trim().split("\n"), [
      'matchlock: the working directory "relative" is invalid: it must be an absolute path',
    ]);
    assert.deepEqual(h.vmDirs(), []);
  });

  test("--image '' is refused instead of running the default image", async () => {
    const r = await run(["--image", "", "--", "true"]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^matchlock: --image: the image reference is empty\n/);
    assert.deepEqual(h.vmDirs(), []);
  });

  test("an error echoing a hostile VM id prints its escape sequences inert", async () => {
    const r = await runCli(["inspect", "\x1b]0;pwned\x07\x1b[2J"], { env: h.env });
    assert.equal(r.code, 1);
    assert.equal(r.stderr.includes("\x1b"), false, "a raw ESC reached the terminal");
    assert.equal(r.stderr.includes("\x07"), false, "a raw BEL reached the terminal");
    // Refused as an id before any lookup (parseVmId), the id shown with its escapes inert.
    assert.match(r.stderr, /^matchlock: invalid VM id "\\x1b\]0;pwned\\x07\\x1b\[2J"/);
  });

  test("commander's own errors are escaped too", async () => {
    const r = await runCli(["run", "--cpus", "\x1b[2J"], { env: h.env });
    assert.equal(r.code, 1);
    assert.equal(r.stderr.includes("\x1b"), false);
    assert.match(r.stderr, /'\\x1b\[2J' is invalid/);
  });
});

/** A raw JSON-RPC session with `matchlock rpc`. */
class Wire {
  readonly child: ChildProcessWithoutNullStreams;
  private buf = "";
  private readonly msgs: Array<Record<string, unknown>> = [];
  private waiters: Array<() => void> = [];
  constructor() {
    this.child = spawn(process.execPath, [CLI, "rpc"], { env: h.env });
    this.child.stdout.setEncoding("utf8");
    this.child.stdout.on("data", (d: string) => {
      this.buf += d;
      for (let nl = this.buf.indexOf("\n"); nl >= 0; nl = this.buf.indexOf("\n")) {
        this.msgs.push(JSON.parse(this.buf.slice(0, nl)));
        this.buf = this.buf.slice(nl + 1);
      }
      for (const w of this.waiters.splice(0)) w();
    });
    this.child.stderr.resume();
  }
  request(id: number, method: string, params?: unknown): void {
    this.child.stdin.write(`${JSON.stringify({ jsonrpc: "2.0", id, method, params })}\n`);
  }
  async response(
    id: number,
    timeoutMs = 120_000,
  ): Promise<{ code?: number; message?: string; result?: unknown }> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const i = this.msgs.findIndex((m) => m.id === id);
      if (i >= 0) {
        const m = this.msgs.splice(i, 1)[0] as {
          error?: { code: number; message: string };
          result?: unknown;
        };
        return m.error ? { code: m.error.code, message: m.error.message } : { result: m.result };
      }
      if (Date.now() > end) throw new Error(`no response for id ${id}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 200);
      });
    }
  }
  async end(): Promise<number | null> {
    this.child.stdin.end();
    return new Promise((r) => this.child.on("close", (code) => r(code)));
  }
}

describe("rpc and exec refuse what they would otherwise ignore", () => {
  test("create with unknown keys (secrets, mounts, resources.memory) is -32602 naming each; nothing boots", async () => {
    const w = new Wire();
    try {
      // Each refusal names the key, says it is unknown (or why it is refused) and points to the fix.
      const cases: Array<[unknown, RegExp[]]> = [
        [
          { secrets: { K: { value: "v", hosts: ["a.com"] } } },
          [/\bsecrets\b/, /unknown key/, /network\.secrets/],
        ],
        [{ mounts: { "/w": { type: "memory" } } }, [/\bmounts\b/, /unknown key/, /vfs\.mounts/]],
        [{ resources: { memory: 4096 } }, [/resources\.memory\b/, /unknown key/, /memory_mb/]],
        [{ image: "" }, [/image/, /empty/]],
        [{ privileged: true }, [/not supported by this version of matchlock: privileged/]],
      ];
      let id = 0;
      for (const [params, messages] of cases) {
        w.request(++id, "create", params);
        const r = await w.response(id);
        assert.equal(r.code, RPC_CODES.INVALID_PARAMS, JSON.stringify(params));
        for (const m of messages) assert.match(r.message ?? "", m);
      }
      w.request(++id, "exec", { command: "true", env: { A: "1" } });
      const ex = await w.response(id);
      assert.equal(ex.code, RPC_CODES.INVALID_PARAMS);
      assert.match(ex.message ?? "", /\benv\b/);
      assert.match(ex.message ?? "", /unknown key/);
    } finally {
      assert.equal(await w.end(), 0);
    }
    assert.deepEqual(h.vmDirs(), []);
  });

  test("exec with a relative working_dir is -32602 naming it, not run in /rel", async () => {
    const w = new Wire();
    try {
      for (const [id, method] of ["exec", "exec_stream", "exec_pipe", "exec_tty"].entries()) {
        w.request(id + 1, method, { command: "pwd", working_dir: "rel" });
        const r = await w.response(id + 1);
        assert.equal(r.code, RPC_CODES.INVALID_PARAMS, method);
        assert.match(r.message ?? "", /"rel" is invalid: it must be an absolute path/);
      }
    } finally {
      assert.equal(await w.end(), 0);
    }
  });

  test("matchlock exec -w relative on a running VM is refused naming it (Sandbox.exec, the edge every exec passes)", async () => {
    const started = await runProgram(BIN, ["run", "-d"]);
    assert.equal(started.code, 0, started.stderr);
    const id = started.stdout.trim();
    try {
      const bad = await runProgram(BIN, ["exec", "-w", "rel", id, "--", "pwd"]);
      assert.equal(bad.code, 1);
      assert.equal(bad.stdout, "");
      assert.match(bad.stderr, /the working directory "rel" is invalid: it must be an absolute path/);
      const ok = await runProgram(BIN, ["exec", "-w", "/tmp", id, "--", "pwd"]);
      assert.equal(ok.stdout, "/tmp\n", ok.stderr);
    } finally {
      await runCli(["kill", id], { env: h.env });
      await runCli(["rm", id], { env: h.env });
    }
  });
});

describe("a VM that dies on its own is not a normal stop", () => {
  const inspect = async (id: string) => {
    const r = await runCli(["inspect", id], { env: h.env });
    assert.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout.toString()) as {
      vm: { status: string };
      lifecycle: { phase: string; last_error: string; resources: { qemu?: { pid?: number } } };
      history: Array<{ phase: string; last_error: string }>;
    };
  };

  test("QEMU killed by SIGKILL under run -d: inspect records the death, list says crashed, run.log says why", async () => {
    const started = await runProgram(BIN, ["run", "-d", "--", "sleep", "600"]);
    assert.equal(started.code, 0, started.stderr);
    const id = started.stdout.trim();
    try {
      const qemu = (await inspect(id)).lifecycle.resources.qemu?.pid;
      assert.ok(
        qemu && qemuProcessesMentioning(id).includes(qemu),
        "the recorded QEMU pid is this VM's QEMU",
      );
      process.kill(qemu, "SIGKILL");
      let v = await inspect(id);
      for (let i = 0; i < 100 && v.lifecycle.phase !== "cleaned"; i++) {
        await new Promise((r) => setTimeout(r, 300));
        v = await inspect(id);
      }
      const failed = v.history.find((e) => e.phase === "stop_failed");
      assert.ok(failed, `no stop_failed in ${JSON.stringify(v.history.map((e) => e.phase))}`);
      assert.equal(failed.last_error, "the VM died: QEMU was killed by SIGKILL");
      // Cleaned up, and the cause stays on the current record.
      assert.equal(v.lifecycle.last_error, "the VM died: QEMU was killed by SIGKILL");
      assert.equal(
        v.history.some((e) => e.phase === "stopped"),
        false,
        "recorded as a normal stop",
      );
      assert.equal(v.vm.status, "crashed");
      const log = readFileSync(join(h.home, "vms", id, "run.log"), "utf8");
      assert.match(log, new RegExp(`matchlock: VM ${id} died: QEMU was killed by SIGKILL`));
    } finally {
      await runCli(["rm", id], { env: h.env });
    }
  });

  test("QEMU killed under a foreground run: run prints one line saying so and exits 1", async () => {
    const child = spawn(BIN, ["run", "--", "sh", "-c", "echo ready; exec sleep 600"], { env, cwd: REPO });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((r) => child.on("close", (code) => r(code)));
    // The command is running (the VM is up) once it says so: only then is this a death under work.
    await new Promise<void>((resolve) =>
      child.stdout.on("data", (d: Buffer) => d.includes("ready") && resolve()),
    );
    const pids = qemuProcessesMentioning(h.home);
    assert.equal(pids.length, 1);
    process.kill(pids[0] as number, "SIGKILL");
    assert.equal(await exited, 1);
    assert.match(stderr, /^matchlock: VM vm-[0-9a-f]{8} died: QEMU was killed by SIGKILL\n$/);
  });

  test("a guest kernel panic is reported as one, not as a normal exit", async () => {
    const r = await runProgram(BIN, ["run", "--", "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 30"]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /^matchlock: VM vm-[0-9a-f]{8} died: the guest kernel panicked \(sysrq triggered crash\)\n$/,
    );
  });

  test("nothing is left behind", () => {
    assert.deepEqual(h.vmDirs(), []);
    assert.deepEqual(qemuProcessesMentioning(h.home), []);
  });
});
