import { spawn } from "node:child_process";
import { closeSync, createWriteStream, writeSync } from "node:fs";
import { join } from "node:path";
import {
  type ImageConfig,
  isValidHostname,
  parseSandboxConfig,
  type SandboxConfigInput,
} from "../api/config.ts";
import { InvalidArgumentError, MatchlockError, messageOf } from "../api/errors.ts";
import type { NetworkInterceptionInput } from "../api/network-hooks.ts";
import { paths } from "../api/paths.ts";
import {
  parseAddHost,
  parseDiskSpec,
  parseDnsServers,
  parsePortSpec,
  parsePrivateHost,
  parseSecretSpec,
  parseVolumeSpec,
  splitHosts,
  validateAddress,
} from "../api/specs.ts";
import { type ExecHandle, writeSink } from "../guest/agent-client.ts";
import {
  parseEnvFile,
  parseEnvSpec,
  readEnvFile,
  readFlagFile,
  resolveArgv,
  validateCommand,
  validateUser,
  validateWorkdir,
} from "../sandbox/command.ts";
import { RUN_LOG } from "../sandbox/entrypoint.ts";
import { DEFAULT_WORKSPACE } from "../sandbox/host-folders.ts";
import { type ExecOptions, execRequest, Sandbox } from "../sandbox/sandbox.ts";
import { volumePath } from "../sandbox/volumes.ts";
import { attach, SignalRelay, TerminalOutput, terminalSize } from "./attach.ts";
import { boolValue } from "./parse.ts";
import { pullProgress } from "./progress.ts";
import type { RunFlags } from "./run.ts";

/** What `matchlock run` does (its flags: run.ts). */

async function buildEnv(flags: RunFlags): Promise<Record<string, string>> {
  const env: Record<string, string> = {};
  for (const file of flags.envFile) {
    for (const [k, v] of parseEnvFile(await readEnvFile(file), file)) env[k] = v;
  }
  for (const spec of flags.env) {
    const [k, v] = parseEnvSpec(spec);
    env[k] = v;
  }
  return env;
}

/** `--secret` flags as the config's secrets map; a name given twice is a mistake, not a silent override. */
function secretsOf(specs: readonly string[]): Record<string, { value: string; hosts: string[] }> {
  const out: Record<string, { value: string; hosts: string[] }> = {};
  for (const spec of specs) {
    const { name, value, hosts } = parseSecretSpec(spec);
    if (Object.hasOwn(out, name)) throw new InvalidArgumentError(`--secret ${name} is given twice`);
    out[name] = { value, hosts };
  }
  return out;
}

/** `-v` and `--workspace` as the config's `vfs`; a guest path given twice is a mistake. */
function volumesOf(flags: RunFlags): NonNullable<SandboxConfigInput["vfs"]> {
  const workspace = flags.workspace ?? DEFAULT_WORKSPACE;
  const mounts: NonNullable<NonNullable<SandboxConfigInput["vfs"]>["mounts"]> = {};
  for (const spec of flags.volume) {
    const v = parseVolumeSpec(spec, workspace);
    if (Object.hasOwn(mounts, v.guestPath))
      throw new InvalidArgumentError(`-v: ${v.guestPath} is given twice`);
    mounts[v.guestPath] = v.mount;
  }
  return { workspace, mounts };
}

/** Rule files are small; a larger one is a mistake (or not a rule file). */
const MAX_RULES_FILE_BYTES = 4 * 1024 * 1024;

/**
 * `--network-rules FILE`: the JSON of `network.interception`, or a bare list of rules. The rules
 * are checked with the config (one error naming the rule and the field).
 */
async function readNetworkRules(file: string): Promise<NetworkInterceptionInput> {
  const text = await readFlagFile("--network-rules", file, MAX_RULES_FILE_BYTES);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new InvalidArgumentError(`--network-rules ${file}: not JSON: ${(e as Error).message}`);
  }
  if (Array.isArray(json)) return { rules: json as NonNullable<NetworkInterceptionInput["rules"]> };
  if (json === null || typeof json !== "object") {
    throw new InvalidArgumentError(
      `--network-rules ${file}: expected an object {"rules": [...]} or a list of rules`,
    );
  }
  return json as NetworkInterceptionInput;
}

function validateHostname(h: string): string {
  if (!isValidHostname(h)) throw new InvalidArgumentError(`invalid --hostname "${h}"`);
  return h;
}

/** Set in the background process that `run -d` starts: it owns the VM and reports on fd 3. */
const DETACHED_CHILD = "MATCHLOCK_DETACHED_CHILD";

/** The progress lines worth a user's attention in `run`: why this start takes longer, what it removed. */
function snapshotNotice(message: string): void {
  if (/^(building a snapshot|removed the least recently used snapshot)/.test(message) && process.stderr.isTTY)
    process.stderr.write(`matchlock: ${message}\n`);
}

export async function runCommandInVm(command: string[], flags: RunFlags): Promise<number> {
  const detachedChild = process.env[DETACHED_CHILD] === "1";
  const keep = !boolValue(flags.rm) || flags.detach === true || detachedChild;
  const tty = flags.tty === true;
  const interactive = flags.interactive === true;
  if (flags.detach && (tty || interactive))
    throw new InvalidArgumentError("-d/--detach cannot be used with -t or -i");
  if (tty && interactive && !process.stdin.isTTY) {
    throw new InvalidArgumentError("the input device is not a TTY", "drop -t, or run from a terminal");
  }
  if (flags.user !== undefined) validateUser(flags.user);
  if (flags.workdir) validateWorkdir(flags.workdir);
  if (flags.image !== undefined && flags.image.trim() === "") {
    throw new InvalidArgumentError(
      "--image: the image reference is empty",
      "omit --image for the default image",
    );
  }
  const input: SandboxConfigInput = {
    resources: {
      cpus: flags.cpus,
      memory_mb: flags.memory,
      disk_size_mb: flags.diskSize,
      ...(flags.timeout === undefined ? {} : { lifetime_seconds: flags.timeout }),
    },
    network: {
      no_network: !flags.network,
      add_hosts: flags.addHost.map(parseAddHost),
      dns_servers: parseDnsServers(flags.dnsServers),
      allow_private_hosts: flags.allowPrivateHost.map(parsePrivateHost),
      ...(flags.allowHost.length > 0 ? { allowed_hosts: splitHosts(flags.allowHost) } : {}),
      ...(flags.secret.length > 0 ? { secrets: secretsOf(flags.secret) } : {}),
      ...(flags.networkIntercept ? { intercept: true } : {}),
      ...(flags.networkRules === undefined
        ? {}
        : { interception: await readNetworkRules(flags.networkRules) }),
      ...(flags.mtu === undefined ? {} : { mtu: flags.mtu }),
      ...(flags.hostname ? { hostname: validateHostname(flags.hostname) } : {}),
    },
    env: await buildEnv(flags),
  };
  if (flags.volume.length > 0 || flags.workspace !== undefined) input.vfs = volumesOf(flags);
  if (flags.disk.length > 0)
    input.extra_disks = flags.disk.map((d) => parseDiskSpec(d, (name) => volumePath(name, paths())));
  if (flags.image !== undefined) input.image = flags.image;
  const config = parseSandboxConfig(input);
  const entrypoint =
    flags.entrypoint === undefined ? undefined : flags.entrypoint === "" ? [] : [flags.entrypoint];
  const forwards = flags.publish.map(parsePortSpec);
  const addresses = flags.address.length > 0 ? flags.address.map(validateAddress) : ["127.0.0.1"];
  const runsCommand = command.length > 0 || entrypoint !== undefined || !keep;
  /** The first exec's options once the image is known: checked before boot, used after it. */
  const firstExec = (image: ImageConfig): ExecOptions => ({
    argv: resolveArgv(image, command, entrypoint),
    ...(flags.workdir ? { cwd: flags.workdir } : {}),
    ...(flags.user ? { user: flags.user } : {}),
    tty,
    stdin: interactive,
  });
  // What the flags alone make of the command is checked now, before any pull or boot: too large a
  // command stays too large whatever the image adds (Sandbox.create checks the final one).
  if (command.length > 0 || entrypoint !== undefined) {
    const hostname = config.network.hostname || "vm-00000000"; // the id is not drawn yet; same length
    validateCommand(execRequest(firstExec({}), { hostname, imageConfig: {}, config, networkEnv: {} }));
  }
  if (flags.detach && !detachedChild) return startDetached();

  // Signals that arrive while booting end the boot; afterwards they cancel the command gracefully.
  const signals = new SignalRelay();
  try {
    let sandbox: Sandbox;
    try {
      const progress = pullProgress();
      sandbox = await signals
        .during(
          Sandbox.create({
            config,
            ...(flags.accel ? { accel: flags.accel } : {}),
            ...(flags.pull ? { pull: true } : {}),
            ...(flags.cold ? { cold: true } : {}),
            onPullProgress: progress.onProgress,
            onProgress: snapshotNotice,
            ...(runsCommand ? { firstCommand: firstExec } : {}),
          }),
          (sb) => sb.close(),
        )
        .finally(() => progress.stop());
    } catch (e) {
      if (detachedChild) announce(`error ${(e as Error).message}`);
      throw e;
    }
    try {
      if (forwards.length > 0) {
        try {
          for (const b of await sandbox.portForward(forwards, addresses)) {
            const line = `matchlock: forwarding ${b.address}:${b.localPort} → guest port ${b.remotePort}\n`;
            if (!detachedChild) process.stderr.write(line);
          }
        } catch (e) {
          if (detachedChild) announce(`error ${(e as Error).message}`);
          throw e;
        }
      }
      if (detachedChild) announce(`ok ${sandbox.id}`);
      let status = 0;
      // With --rm=false and no command, the VM just stays up to be used with `matchlock exec`.
      if (runsCommand) {
        const argv = resolveArgv(sandbox.imageConfig, command, entrypoint);
        // A signal (or --timeout) ends the run: a paused VM runs again so its command ends gracefully.
        const terminate = async (h: Parameters<typeof sandbox.terminate>[0]) => {
          await sandbox.resume().catch(() => {});
          await sandbox.terminate(h, flags.gracefulShutdown);
        };
        if (detachedChild) status = await runToLog(sandbox, argv, terminate, flags, signals);
        else {
          const size = terminalSize();
          const output = new TerminalOutput();
          const handle = sandbox.exec(
            {
              argv,
              ...(flags.workdir ? { cwd: flags.workdir } : {}),
              ...(flags.user ? { user: flags.user } : {}),
              tty,
              stdin: interactive,
              ...size,
            },
            output.io,
          );
          status = await attach(handle, {
            tty,
            interactive,
            terminate,
            signals,
            deadline: sandbox.deadline,
            output,
          });
        }
      }
      if (keep && !signals.received && !sandbox.deadline.aborted) {
        if (!detachedChild) {
          process.stderr.write(
            `matchlock: VM ${sandbox.id} is running. Connect: matchlock exec ${sandbox.id} -- sh\n` +
              `           Stop: Ctrl-C here, or matchlock kill ${sandbox.id}\n`,
          );
        }
        await Promise.race([
          signals.next(),
          new Promise((r) => sandbox.deadline.addEventListener("abort", r, { once: true })),
        ]);
      }
      if (sandbox.died !== undefined) throw sandbox.deathError(sandbox.died);
      return status;
    } finally {
      await sandbox.close({ remove: !keep });
    }
  } finally {
    signals.dispose();
  }
}

/** In the detached owner: the command's output goes to run.log in the VM dir. */
async function runToLog(
  sandbox: Sandbox,
  argv: string[],
  terminate: (h: ExecHandle) => Promise<void>,
  flags: RunFlags,
  signals: SignalRelay,
): Promise<number> {
  const log = createWriteStream(join(sandbox.dir, RUN_LOG), { flags: "a", mode: 0o600 });
  const handle = sandbox.exec(
    {
      argv,
      ...(flags.workdir ? { cwd: flags.workdir } : {}),
      ...(flags.user ? { user: flags.user } : {}),
    },
    { onStdout: writeSink(log), onStderr: writeSink(log) },
  );
  signals.onSignal = () => {
    terminate(handle).catch(() => {});
  };
  // --timeout: the lifetime ends the command here as Ctrl-C would (the foreground run's attach does
  // the same); the VM is closed after it. A VM that died aborts the deadline too: done says how.
  const onDeadline = () => {
    if (sandbox.died === undefined) log.write(`matchlock: ${messageOf(sandbox.deadline.reason)}\n`);
    terminate(handle).catch(() => {});
  };
  sandbox.deadline.addEventListener("abort", onDeadline, { once: true });
  const r = await handle.done
    .catch(async (e: unknown): Promise<never> => {
      // The VM died under the command, say: the log is where a detached run's user looks.
      log.write(`matchlock: ${(e as Error).message}\n`);
      await new Promise((resolve) => log.end(resolve));
      throw e;
    })
    .finally(() => {
      signals.onSignal = undefined;
      sandbox.deadline.removeEventListener("abort", onDeadline);
    });
  if (r.startError) log.write(`matchlock: ${r.startError}\n`);
  log.write(`matchlock: command exited with ${r.exitCode}\n`);
  await new Promise((resolve) => log.end(resolve));
  return r.exitCode;
}

function announce(line: string): void {
  try {
    writeSync(3, `${line}\n`);
    closeSync(3);
  } catch {}
}

/**
 * `run -d`: start this same command as a background owner process (its own session, no terminal),
 * wait until it reports the VM running on fd 3, print the id and return.
 */
async function startDetached(): Promise<number> {
  const argv = process.argv.slice(2);
  const sep = argv.indexOf("--");
  const before = (sep < 0 ? argv : argv.slice(0, sep)).filter((a) => a !== "-d" && a !== "--detach");
  const args = [...before, ...(sep < 0 ? [] : argv.slice(sep))];
  // `--` before the script: Node scans its whole argv for --env-file (even after the script name)
  // and would load the user's env file into this host process (NODE_OPTIONS=--require=… runs code).
  const child = spawn(process.execPath, ["--", process.argv[1] as string, ...args], {
    detached: true,
    stdio: ["ignore", "ignore", "ignore", "pipe"],
    env: { ...process.env, [DETACHED_CHILD]: "1" },
  });
  const channel = child.stdio[3] as NodeJS.ReadableStream;
  let text = "";
  channel.setEncoding("utf8");
  channel.on("data", (d: string) => {
    text += d;
  });
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  await new Promise<void>((resolve) => {
    channel.on("end", () => resolve());
    channel.on("error", () => resolve());
  });
  const line = text.trim();
  if (line.startsWith("ok ")) {
    child.unref();
    process.stdout.write(`${line.slice(3)}\n`);
    return 0;
  }
  const code = await exited;
  throw new MatchlockError(
    "VM_BOOT_FAILED",
    line.startsWith("error ")
      ? line.slice(6)
      : `the background owner exited (code ${code}) before the VM was running`,
  );
}
