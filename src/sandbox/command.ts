import { DEFAULT_PATH, type ImageConfig } from "../api/config.ts";
import { InvalidArgumentError } from "../api/errors.ts";

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
  const host = hostEnv[key];
  if (host === undefined) throw new InvalidArgumentError(`-e ${key}: ${key} is not set on the host`);
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

/** `-u` values the agent understands: uid, uid:gid, name, name:group. */
export function validateUser(user: string): string {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$/.test(user)) {
    throw new InvalidArgumentError(`invalid user "${user}" (use uid, uid:gid, name or name:group)`);
  }
  return user;
}
