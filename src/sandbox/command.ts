import { open } from "node:fs/promises";
import { DEFAULT_PATH, type ImageConfig } from "../api/config.ts";
import { InvalidArgumentError } from "../api/errors.ts";
import { type ExecRequest, encodeExec } from "../guest/protocol.ts";

/** How a run's argv, env, workdir and user come from the image config and the flags (Docker's rules). */

export { DEFAULT_PATH };

/**
 * argv = entrypoint + cmd. `entrypoint` undefined keeps the image's; `[]` (from `--entrypoint ""`)
 * clears it. A new entrypoint drops the image's Cmd, as in Docker.
 */
export function resolveArgv(image: ImageConfig, cmd: string[], entrypoint?: string[]): string[] {
  const ep = entrypoint ?? image.entrypoint ?? [];
  const args = cmd.length > 0 ? cmd : entrypoint !== undefined ? [] : (image.cmd ?? []);
  const argv = [...ep, ...args];
  if (argv.length === 0) {
    throw new InvalidArgumentError(
      "no command to run: the image has no Entrypoint or Cmd",
      "give one after `--`",
    );
  }
  return argv;
}

/** Image env, then the sandbox env, then per-exec env; PATH defaulted. Returned as KEY=VALUE. */
export function mergeEnv(...layers: Array<Record<string, string> | undefined>): string[] {
  const env = new Map<string, string>();
  for (const layer of layers) for (const [k, v] of Object.entries(layer ?? {})) env.set(k, v);
  if (!env.has("PATH")) env.set("PATH", DEFAULT_PATH);
  return [...env].map(([k, v]) => `${k}=${v}`);
}

/** `KEY=VALUE` → [KEY, VALUE]; a bare `KEY` takes the host's value (error if unset), as `docker run -e`. */
export function parseEnvSpec(spec: string, hostEnv: NodeJS.ProcessEnv = process.env): [string, string] {
  const eq = spec.indexOf("=");
  const key = eq < 0 ? spec : spec.slice(0, eq);
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) {
    throw new InvalidArgumentError(`invalid environment variable name "${key}" in "${spec}"`);
  }
  if (eq >= 0) return [key, spec.slice(eq + 1)];
  // Own properties only: "constructor" or "toString" must not find Object.prototype's.
  const host = Object.hasOwn(hostEnv, key) ? hostEnv[key] : undefined;
  if (typeof host !== "string") throw new InvalidArgumentError(`-e ${key}: ${key} is not set on the host`);
  return [key, host];
}

/** An env file: `KEY=VALUE` or bare `KEY` lines; `#` comments and blank lines skipped. */
export function parseEnvFile(
  text: string,
  file: string,
  hostEnv: NodeJS.ProcessEnv = process.env,
): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    try {
      out.push(parseEnvSpec(line, hostEnv));
    } catch (e) {
      throw new InvalidArgumentError(`${file}:${i + 1}: ${(e as Error).message}`);
    }
  });
  return out;
}

/** The most an env file may hold: far more than any real one, and a bound on `--env-file /dev/zero`. */
export const MAX_ENV_FILE_BYTES = 1024 * 1024;

/** Why a file could not be read, in words (the errno code alone means little to most users). */
function describeFsError(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  switch (code) {
    case "ENOENT":
      return "no such file";
    case "EACCES":
    case "EPERM":
      return "permission denied";
    case "EISDIR":
      return "is a directory";
    case "ENOTDIR":
      return "a part of the path is not a directory";
    default:
      return code ?? (e as Error).message;
  }
}

/** Reads an env file, at most `limit` bytes (see readFlagFile). */
export function readEnvFile(file: string, limit = MAX_ENV_FILE_BYTES): Promise<string> {
  return readFlagFile("--env-file", file, limit);
}

/**
 * Reads a file a flag names, at most `limit` bytes, as UTF-8. Any readable file works (a pipe from
 * `<(…)` too), but one that holds more than the limit is refused rather than read into memory
 * without end. Errors name the flag and the file.
 */
export async function readFlagFile(flag: string, file: string, limit: number): Promise<string> {
  let fh: Awaited<ReturnType<typeof open>>;
  try {
    fh = await open(file, "r");
  } catch (e) {
    throw new InvalidArgumentError(`${flag} ${file}: ${describeFsError(e)}`);
  }
  try {
    const buf = Buffer.alloc(limit + 1);
    let n = 0;
    while (n < buf.length) {
      const { bytesRead } = await fh.read(buf, n, buf.length - n, null);
      if (bytesRead === 0) break;
      n += bytesRead;
    }
    if (n > limit) {
      throw new InvalidArgumentError(`${flag} ${file}: larger than ${limit / 1024 / 1024} MiB; refused`);
    }
    return buf.subarray(0, n).toString("utf8");
  } catch (e) {
    if (e instanceof InvalidArgumentError) throw e;
    throw new InvalidArgumentError(`${flag} ${file}: ${describeFsError(e)}`);
  } finally {
    await fh.close().catch(() => {});
  }
}

/**
 * A working directory must be absolute, as in Docker: a relative one has no base to resolve
 * against in a fresh VM, and silently running in `/relative` would surprise. Shared by run, exec,
 * RPC `working_dir` and Sandbox.exec.
 */
export function validateWorkdir(dir: string): string {
  if (!dir.startsWith("/")) {
    throw new InvalidArgumentError(
      `the working directory ${JSON.stringify(dir)} is invalid: it must be an absolute path`,
    );
  }
  return dir;
}

/**
 * Checks a command exactly as it will be sent to the guest: the EXEC encoder is the one definition
 * of the limits (argument and variable counts, total size, NUL bytes), so a front end calls this
 * before booting and an oversized command fails in milliseconds with one line, not after a boot.
 */
export function validateCommand(req: ExecRequest): void {
  validateWorkdir(req.cwd);
  encodeExec(req);
}

/** `-u` values the agent understands: uid, uid:gid, name, name:group. */
export function validateUser(user: string): string {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$/.test(user)) {
    throw new InvalidArgumentError(`invalid user "${user}" (use uid, uid:gid, name or name:group)`);
  }
  return user;
}
