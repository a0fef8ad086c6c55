import { existsSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { type Command, Option } from "commander";
import { InvalidArgumentError, MatchlockError, VmPausedError } from "../api/errors.ts";
import { vmDir } from "../api/paths.ts";
import { AgentClient, DEFAULT_GRACE_MS, type ExecHandle, terminateExec } from "../guest/agent-client.ts";
import { readRuntimeFile } from "../state/runtime-file.ts";
import { attach, SignalRelay, TerminalOutput, terminalSize } from "./attach.ts";
import { collect, durationMs } from "./parse.ts";

/** `matchlock exec ID -- CMD`: runs a command in a VM owned by another process, through its relay. */

interface ExecFlags {
  tty?: boolean;
  interactive?: boolean;
  workdir?: string;
  user?: string;
  env: string[];
  gracefulShutdown: number;
}

export function registerExec(program: Command): void {
  program
    .command("exec")
    .summary("run a command in a running VM")
    .description(
      "Run a command in a VM started by another matchlock process (`run -d` or `run --rm=false`), through\n" +
        "the exec relay socket in its VM dir. The exit code is the command's. Ctrl-C cancels the command\n" +
        "(SIGTERM, then SIGKILL after the grace period); the VM keeps running. A paused VM refuses it\n" +
        "(`matchlock resume` it first).",
    )
    .usage("[options] ID [--] command...")
    .argument("<id>", "VM id (see `matchlock list`)")
    .argument("<command...>", "command and arguments")
    .option("-t, --tty", "allocate a pseudo-terminal")
    .option("-i, --interactive", "pass stdin to the command")
    .option("-w, --workdir <dir>", "working directory (default: the image's)")
    .option("-u, --user <user>", "uid, uid:gid, name or name:group (default: the image's)")
    .option("-e, --env <KEY=VALUE|KEY>", "set an environment variable", collect, [])
    .addOption(
      new Option("--graceful-shutdown <duration>", "grace between SIGTERM and SIGKILL on cancel")
        .default(DEFAULT_GRACE_MS, "3s")
        .argParser(durationMs),
    )
    .passThroughOptions()
    .action(async (id: string, command: string[], flags: ExecFlags) => {
      // Options end at the id, so a `--` after it arrives as an argument.
      const argv = command[0] === "--" ? command.slice(1) : command;
      if (argv.length === 0)
        throw new InvalidArgumentError("no command given", "usage: matchlock exec ID -- command");
      process.exitCode = await execInVm(id, argv, flags);
    });
}

export async function connectRelay(id: string): Promise<AgentClient> {
  const dir = vmDir(id); // refuses anything but a VM id: ids become paths
  const socket = readRuntimeFile(dir)?.relay_socket ?? join(dir, "relay.sock");
  if (!existsSync(socket)) {
    throw new MatchlockError("INVALID_ARGUMENT", `VM ${id} is not running (no exec relay at ${socket})`, {
      hint: "`matchlock list --running` shows the VMs you can exec into",
    });
  }
  const sock = connect(socket);
  await new Promise<void>((resolve, reject) => {
    sock.once("connect", () => resolve());
    sock.once("error", (e) =>
      reject(
        new MatchlockError("VM_FAILED", `cannot reach VM ${id}: ${e.message}`, {
          hint: "is it still running?",
        }),
      ),
    );
  });
  const client = new AgentClient(sock, (line) => process.stderr.write(`matchlock: ${line}\n`));
  // A stopped (SIGSTOP) or wedged owner still accepts the connection but never answers.
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      client.ready,
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new MatchlockError("VM_FAILED", `VM ${id} did not answer within ${RELAY_READY_MS / 1000} s`, {
                hint: "its owning process may be stopped or hung: see `matchlock list`, `matchlock kill`",
              }),
            ),
          RELAY_READY_MS,
        );
      }),
    ]);
  } catch (e) {
    client.close("no answer");
    throw e;
  } finally {
    clearTimeout(timer);
  }
  return client;
}

/** The first relay protocol with the PAUSE frame; an older owner cannot pause (and is never paused). */
export const PAUSE_RELAY = 4;

/** The relay's protocol number from its greeting (`matchlock-relay N`), 0 if it has none. */
export function relayVersion(greeting: string): number {
  const m = /^matchlock-relay (\d+)$/.exec(greeting);
  return m ? Number(m[1]) : 0;
}

/**
 * `exec`, `port-forward` and the like call this on their relay connection before touching the
 * guest: one clear error for a paused VM, instead of a command that waits until someone resumes it.
 * (The owner refuses guest operations on a paused VM too; this adds the hint and the exit code 1.)
 */
export async function refuseIfPaused(client: AgentClient, id: string): Promise<void> {
  if (relayVersion(await client.ready) < PAUSE_RELAY) return;
  if ((await client.pauseVm("status")).paused) throw new VmPausedError(id);
}

/** How long the VM's owner has to greet an exec client. */
const RELAY_READY_MS = 10_000;

async function execInVm(id: string, command: string[], flags: ExecFlags): Promise<number> {
  const tty = flags.tty === true;
  const interactive = flags.interactive === true;
  if (tty && interactive && !process.stdin.isTTY) {
    throw new InvalidArgumentError("the input device is not a TTY", "drop -t, or run from a terminal");
  }
  // With valibot: loaded when a command is to run, not for --help (exec.ts is loaded for that).
  const { parseEnvSpec, validateUser, validateWorkdir } = await import("../sandbox/command.ts");
  if (flags.user !== undefined) validateUser(flags.user);
  if (flags.workdir !== undefined) validateWorkdir(flags.workdir);
  const env = flags.env.map((spec) => parseEnvSpec(spec).join("="));
  const client = await connectRelay(id);
  try {
    await refuseIfPaused(client, id);
  } catch (e) {
    client.close("paused");
    throw e;
  }
  const signals = new SignalRelay();
  const output = new TerminalOutput();
  try {
    const handle: ExecHandle = client.exec(
      {
        argv: command,
        env,
        cwd: flags.workdir ?? "",
        user: flags.user ?? "",
        tty,
        stdin: interactive,
        mkdirCwd: true,
        ...terminalSize(),
      },
      output.io,
    );
    const terminate = (h: ExecHandle) => terminateExec(h, flags.gracefulShutdown);
    return await attach(handle, { tty, interactive, terminate, signals, output });
  } finally {
    signals.dispose();
    client.close("exec finished");
  }
}
