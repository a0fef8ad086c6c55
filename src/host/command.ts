import { spawn } from "node:child_process";
import { type ErrorCode, MatchlockError } from "../api/errors.ts";

export interface CommandResult {
  stdout: Buffer;
  stderr: string;
  code: number;
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  input?: Buffer | string;
  /** Error code of the MatchlockError thrown on a non-zero exit. */
  errorCode?: ErrorCode;
  /** Do not throw on a non-zero exit. */
  allowFailure?: boolean;
}

/**
 * Runs a host tool (apt-get, mkfs.ext4, cc…) without a shell, collecting its output. A failure
 * becomes a MatchlockError naming the command and the last lines it printed.
 */
export function runCommand(cmd: string, args: string[], opts: RunOptions = {}): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: ["pipe", "pipe", "pipe"],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (d: Buffer) => out.push(d));
    child.stderr.on("data", (d: Buffer) => err.push(d));
    child.on("error", (e: NodeJS.ErrnoException) => {
      const what =
        e.code === "ENOENT" ? `${cmd} is not installed (not found on PATH)` : `${cmd}: ${e.message}`;
      reject(new MatchlockError(opts.errorCode ?? "SETUP_FAILED", what, { cause: e }));
    });
    child.on("close", (code, signal) => {
      const stderr = Buffer.concat(err).toString("utf8");
      const result = { stdout: Buffer.concat(out), stderr, code: code ?? 128 };
      if ((code === 0 && signal === null) || opts.allowFailure) {
        resolve(result);
        return;
      }
      const tail = stderr.trim().split("\n").slice(-5).join("\n  ");
      const how = signal ? `was killed by ${signal}` : `exited with ${code}`;
      reject(
        new MatchlockError(
          opts.errorCode ?? "SETUP_FAILED",
          `${cmd} ${args.join(" ")} ${how}${tail ? `:\n  ${tail}` : ""}`,
        ),
      );
    });
    child.stdin.on("error", () => {}); // the tool may exit before reading all input
    child.stdin.end(opts.input);
  });
}

/** True if `cmd` is on PATH. */
export async function hasCommand(cmd: string): Promise<boolean> {
  const r = await runCommand("sh", ["-c", `command -v "$1"`, "sh", cmd], { allowFailure: true });
  return r.code === 0;
}
