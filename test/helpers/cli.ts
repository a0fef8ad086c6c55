import { spawn } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** Runs the built CLI (`dist/cli/main.js`, what `npx matchlock` runs) as a user would. */

export const REPO = fileURLToPath(new URL("../../", import.meta.url));
export const CLI = join(REPO, "dist", "cli", "main.js");

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
  ms: number;
}

export interface CliOptions {
  input?: Buffer | string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
  cwd?: string;
}

/** A private MATCHLOCK_HOME per test file, so VM dirs of concurrent tests never mix. */
export function tempHome(): { home: string; env: NodeJS.ProcessEnv; cleanup(): void; vmDirs(): string[] } {
  const home = mkdtempSync(join(tmpdir(), "matchlock-test-"));
  return {
    home,
    env: { ...process.env, MATCHLOCK_HOME: home },
    cleanup: () => rmSync(home, { recursive: true, force: true }),
    vmDirs: () => {
      try {
        return readdirSync(join(home, "vms"));
      } catch {
        return [];
      }
    },
  };
}

/**
 * Runs `cmd args`, feeding `input` to its stdin and collecting its output; SIGKILLed after
 * `timeoutMs` (default 120 s). The one spawn-and-collect of the test helpers.
 */
export function spawnCollect(cmd: string, args: string[], opts: CliOptions = {}): Promise<CliResult> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? process.env,
      ...(opts.cwd ? { cwd: opts.cwd } : {}),
      stdio: ["pipe", "pipe", "pipe"],
    });
    const out: Buffer[] = [];
    let err = "";
    child.stdout.on("data", (d: Buffer) => out.push(d));
    child.stderr.on("data", (d: Buffer) => {
      err += d.toString();
    });
    const timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs ?? 120_000);
    child.on("error", reject);
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out), stderr: err, ms: Date.now() - started });
    });
    child.stdin.on("error", () => {});
    child.stdin.end(opts.input);
  });
}

export function runCli(args: string[], opts: CliOptions = {}): Promise<CliResult> {
  return spawnCollect(process.execPath, [CLI, ...args], opts);
}

/** QEMU processes whose command line mentions `needle` (a VM dir or id). */
export function qemuProcessesMentioning(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmd = readFileSync(`/proc/${entry}/cmdline`, "utf8").replaceAll("\0", " ");
      if (cmd.includes("qemu-system") && cmd.includes(needle)) pids.push(Number(entry));
    } catch {}
  }
  return pids;
}
