import { readFile } from "node:fs/promises";
import { type Command, Option } from "commander";
import { parseSandboxConfig, type SandboxConfigInput } from "../api/config.ts";
import { InvalidArgumentError, MatchlockError } from "../api/errors.ts";
import type { ExecHandle, ExecResult } from "../guest/agent-client.ts";
import { parseEnvFile, parseEnvSpec, resolveArgv, validateUser } from "../sandbox/command.ts";
import { DEFAULT_GRACE_MS, Sandbox } from "../sandbox/sandbox.ts";
import { boolValue, collect, durationMs, positiveInt, positiveNumber } from "./parse.ts";

interface RunFlags {
  image?: string;
  env: string[];
  envFile: string[];
  workdir?: string;
  user?: string;
  entrypoint?: string;
  tty?: boolean;
  interactive?: boolean;
  rm: boolean | string;
  cpus: number;
  memory: number;
  diskSize: number;
  timeout?: number;
  hostname?: string;
  network: boolean;
  accel?: string;
  gracefulShutdown: number;
}

export function registerRun(program: Command): void {
  program
    .command("run")
    .summary("run a command in a new micro-VM")
    .description(
      "Boot a micro-VM from an image, run a command in it and remove the VM when the command ends.\n" +
        "The exit code is the command's. Ctrl-C or SIGTERM sends SIGTERM to the command, then SIGKILL after\n" +
        "the grace period (--graceful-shutdown), and stops the VM.\n\n" +
        "Networking is not built yet: every VM has no network interface (as with --no-network).",
    )
    .usage("[options] [--] [command...]")
    .argument("[command...]", "command and arguments (default: the image's Entrypoint + Cmd)")
    .option("--image <ref>", "image to boot (default: matchlock/default:latest, built by `matchlock setup`)")
    .option(
      "-e, --env <KEY=VALUE|KEY>",
      "set an environment variable; a bare KEY copies the host's value",
      collect,
      [],
    )
    .option("--env-file <file>", "read KEY=VALUE lines from a file (applied before -e)", collect, [])
    .option("-w, --workdir <dir>", "working directory in the guest (created if missing)")
    .option("-u, --user <user>", "uid, uid:gid, name or name:group from the image's /etc/passwd")
    .option("--entrypoint <cmd>", 'override the image\'s Entrypoint ("" clears it)')
    .option("-t, --tty", "allocate a pseudo-terminal")
    .option("-i, --interactive", "pass stdin to the command")
    .addOption(
      new Option("--rm [bool]", "remove the VM when the command ends; --rm=false keeps it until Ctrl-C")
        .default(true)
        .argParser(boolValue),
    )
    .option("--cpus <n>", "virtual CPUs (fractions round up)", positiveNumber, 1)
    .option("--memory <MB>", "guest memory in MB", positiveInt, 512)
    .option("--disk-size <MB>", "size of the VM's writable disk in MB (sparse)", positiveInt, 5120)
    .option("--timeout <seconds>", "stop the command and the VM after this many seconds", positiveNumber)
    .option("--hostname <name>", "guest hostname (default: the VM id)")
    .option("--no-network", "no network interface (currently always the case)")
    .addOption(
      new Option("--accel <kind>", "accelerator (default: probed; env MATCHLOCK_ACCEL)").choices([
        "kvm",
        "tcg",
      ]),
    )
    .addOption(
      new Option("--graceful-shutdown <duration>", "grace between SIGTERM and SIGKILL on cancel (e.g. 3s)")
        .default(DEFAULT_GRACE_MS, "3s")
        .argParser(durationMs),
    )
    .action(async (command: string[], flags: RunFlags) => {
      process.exitCode = await runCommandInVm(command, flags);
    });
}

async function buildEnv(flags: RunFlags): Promise<Record<string, string>> {
  const env: Record<string, string> = {};
  for (const file of flags.envFile) {
    let text: string;
    try {
      text = await readFile(file, "utf8");
    } catch (e) {
      throw new InvalidArgumentError(
        `--env-file ${file}: ${(e as NodeJS.ErrnoException).code ?? "unreadable"}`,
      );
    }
    for (const [k, v] of parseEnvFile(text, file)) env[k] = v;
  }
  for (const spec of flags.env) {
    const [k, v] = parseEnvSpec(spec);
    env[k] = v;
  }
  return env;
}

function validateHostname(h: string): string {
  if (
    !/^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/.test(
      h,
    ) ||
    h.length > 253
  ) {
    throw new InvalidArgumentError(`invalid hostname "${h}"`);
  }
  return h;
}

async function runCommandInVm(command: string[], flags: RunFlags): Promise<number> {
  const keep = !boolValue(flags.rm);
  const tty = flags.tty === true;
  const interactive = flags.interactive === true;
  if (tty && interactive && !process.stdin.isTTY) {
    throw new InvalidArgumentError("the input device is not a TTY", "drop -t, or run from a terminal");
  }
  if (flags.user !== undefined) validateUser(flags.user);
  const input: SandboxConfigInput = {
    resources: {
      cpus: flags.cpus,
      memory_mb: flags.memory,
      disk_size_mb: flags.diskSize,
      ...(flags.timeout === undefined ? {} : { timeout_seconds: flags.timeout }),
    },
    network: { no_network: true, ...(flags.hostname ? { hostname: validateHostname(flags.hostname) } : {}) },
    env: await buildEnv(flags),
  };
  if (flags.image !== undefined) input.image = flags.image;
  const config = parseSandboxConfig(input);
  const entrypoint =
    flags.entrypoint === undefined ? undefined : flags.entrypoint === "" ? [] : [flags.entrypoint];

  // Signals that arrive while booting end the boot; afterwards they cancel the command gracefully.
  const signals = new SignalRelay();
  try {
    const sandbox = await signals.during(
      Sandbox.create({ config, ...(flags.accel ? { accel: flags.accel } : {}) }),
    );
    try {
      const argv = resolveArgv(sandbox.imageConfig, command, entrypoint);
      const status = await runInSandbox(sandbox, argv, flags, { tty, interactive }, signals);
      if (keep && !signals.received) {
        process.stderr.write(
          `matchlock: VM ${sandbox.id} keeps running; press Ctrl-C (or send SIGTERM) to stop it\n`,
        );
        await signals.next();
      }
      return status;
    } finally {
      await sandbox.close();
    }
  } finally {
    signals.dispose();
  }
}

async function runInSandbox(
  sandbox: Sandbox,
  argv: string[],
  flags: RunFlags,
  mode: { tty: boolean; interactive: boolean },
  signals: SignalRelay,
): Promise<number> {
  const stdout = process.stdout;
  const rawTty = mode.tty && mode.interactive && process.stdin.isTTY;
  const handle: ExecHandle = sandbox.exec(
    {
      argv,
      ...(flags.workdir ? { cwd: flags.workdir } : {}),
      ...(flags.user ? { user: flags.user } : {}),
      tty: mode.tty,
      stdin: mode.interactive,
      rows: stdout.isTTY ? stdout.rows : 24,
      cols: stdout.isTTY ? stdout.columns : 80,
    },
    {
      onStdout: (d) => stdout.write(d),
      onStderr: (d) => process.stderr.write(d),
    },
  );
  const onResize = () => handle.resize(stdout.rows, stdout.columns);
  if (mode.tty && stdout.isTTY) stdout.on("resize", onResize);
  if (rawTty) process.stdin.setRawMode(true);
  const pump = mode.interactive ? pumpStdin(handle) : undefined;

  let cancelledBy: string | undefined;
  const cancel = (why: string) => {
    if (cancelledBy) {
      handle.signal(9); // a second Ctrl-C: no more grace
      return;
    }
    cancelledBy = why;
    sandbox.terminate(handle, flags.gracefulShutdown).catch(() => {});
  };
  signals.onSignal = (sig) => cancel(sig);
  sandbox.deadline.addEventListener("abort", () => cancel(`timeout (${flags.timeout} s)`), { once: true });

  let result: ExecResult;
  try {
    result = await handle.done;
  } finally {
    signals.onSignal = undefined;
    if (rawTty) process.stdin.setRawMode(false);
    stdout.off("resize", onResize);
    pump?.stop();
  }
  await drain(stdout);
  if (result.startError !== undefined) process.stderr.write(`matchlock: ${result.startError}\n`);
  if (cancelledBy?.startsWith("timeout"))
    process.stderr.write(`matchlock: command stopped: ${cancelledBy}\n`);
  return result.exitCode;
}

/** Copies our stdin to the command's, respecting the agent's flow-control window. */
function pumpStdin(handle: ExecHandle): { stop(): void } {
  const stdin = process.stdin;
  let stopped = false;
  const onData = (chunk: Buffer) => {
    stdin.pause();
    handle.writeStdin(chunk).then(
      () => {
        if (!stopped) stdin.resume();
      },
      () => {},
    );
  };
  const onEnd = () => {
    if (!stopped) handle.endStdin();
  };
  stdin.on("data", onData);
  stdin.once("end", onEnd);
  stdin.resume();
  return {
    stop() {
      stopped = true;
      stdin.off("data", onData);
      stdin.off("end", onEnd);
      stdin.pause();
      stdin.unref?.();
    },
  };
}

function drain(stream: NodeJS.WriteStream): Promise<void> {
  return new Promise((resolve) => {
    if (!stream.writableNeedDrain) resolve();
    else stream.once("drain", () => resolve());
  });
}

/**
 * Owns SIGINT/SIGTERM/SIGHUP for the life of a run: while booting they abort the boot; while a
 * command runs they are handed to `onSignal`; with --rm=false they end the wait.
 */
class SignalRelay {
  received: string | undefined;
  onSignal: ((sig: string) => void) | undefined;
  private waiters: Array<() => void> = [];
  private readonly handler = (sig: NodeJS.Signals) => {
    this.received = sig;
    if (this.onSignal) this.onSignal(sig);
    for (const w of this.waiters.splice(0)) w();
  };

  constructor() {
    for (const s of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(s, this.handler);
  }

  /** Resolves with `work`, or rejects when a signal arrives first (the work is left to clean up). */
  async during<T>(work: Promise<T>): Promise<T> {
    const interrupted = new Promise<never>((_, reject) => {
      this.waiters.push(() => reject(new MatchlockError("CANCELLED", `interrupted by ${this.received}`)));
    });
    const result = await Promise.race([work, interrupted]).catch(async (e: unknown) => {
      // Let the boot settle and close what it produced, so no VM is left behind.
      const v = await work.catch(() => undefined);
      if (v instanceof Sandbox) await v.close().catch(() => {});
      throw e;
    });
    return result;
  }

  next(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  dispose(): void {
    for (const s of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.off(s, this.handler);
  }
}
