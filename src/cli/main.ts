#!/usr/bin/env -S node --
import { Command, CommanderError } from "commander";
import { isMatchlockError } from "../api/errors.ts";
import { guardStdio } from "./attach.ts";
import { registerChangeCommands } from "./changes.ts";
import { registerDiagnose } from "./diagnose.ts";
import { registerExec } from "./exec.ts";
import { registerImage } from "./image.ts";
import { registerNetworkCommands } from "./network.ts";
import { escapeControls } from "./parse.ts";
import { registerPauseCommands } from "./pause.ts";
import { registerPortForward } from "./port-forward.ts";
import { registerPull } from "./pull.ts";
import { registerRpc } from "./rpc.ts";
import { registerRun } from "./run.ts";
import { registerSetup } from "./setup.ts";
import { registerSnapshotCommands } from "./snapshot.ts";
import { registerVersion, VERSION } from "./version.ts";
import { registerVmCommands } from "./vms.ts";
import { registerVolumeCommands } from "./volume.ts";

/**
 * The CLI edge: every command registers itself; every error becomes one clear line and exit 1,
 * with control characters escaped (errors echo user input: it must not drive the terminal).
 *
 * The shebang's `--` keeps Node from reading `--env-file` out of our arguments (it scans all of
 * argv, even after the script name) and loading it into this process; bin/matchlock does the same.
 */

const program = new Command("matchlock")
  .description("Run untrusted code in disposable micro-VMs")
  .version(VERSION, "-V, --version", "print the version")
  .enablePositionalOptions()
  .showHelpAfterError("(run with --help for usage)")
  // Set before the subcommands register: they inherit it.
  .configureOutput({ outputError: (text, write) => write(escapeControls(text, { keepNewlines: true })) })
  .exitOverride();

// `matchlock list | head -1`: a reader that goes away is no crash (run and exec also stop the command).
guardStdio();

registerRun(program);
registerExec(program);
registerVmCommands(program);
registerPauseCommands(program);
registerChangeCommands(program);
registerVolumeCommands(program);
registerSnapshotCommands(program);
registerImage(program);
registerPull(program);
registerRpc(program);
registerPortForward(program);
registerNetworkCommands(program);
registerSetup(program);
registerDiagnose(program);
registerVersion(program);
reflowHelp(program);

/**
 * Help texts are written as short source lines; commander wraps to the terminal itself, and a hard
 * break inside its wrapping prints ragged. So single line breaks become spaces (paragraph breaks and
 * indented example lines stay).
 */
function reflowHelp(cmd: Command): void {
  const flow = (t: string) => t.replace(/([^\n])\n(?=[^\s])/g, "$1 ");
  cmd.description(flow(cmd.description()));
  for (const o of cmd.options) o.description = flow(o.description);
  for (const sub of cmd.commands) reflowHelp(sub);
}

export function reportError(e: unknown): number {
  if (e instanceof CommanderError) return e.exitCode; // commander already printed it
  const multiline = (t: string) => escapeControls(t, { keepNewlines: true });
  if (isMatchlockError(e)) {
    process.stderr.write(`matchlock: ${escapeControls(e.message)}\n`);
    if (e.hint) process.stderr.write(`${multiline(e.hint).replace(/^/gm, "  ")}\n`);
    if (process.env.MATCHLOCK_DEBUG && e.cause)
      process.stderr.write(`cause: ${multiline(String(e.cause))}\n`);
    return 1;
  }
  // Not ours: a bug. Show the stack so it can be reported.
  process.stderr.write(
    `matchlock: internal error: ${multiline(e instanceof Error ? (e.stack ?? e.message) : String(e))}\n`,
  );
  return 1;
}

try {
  await program.parseAsync(process.argv);
} catch (e) {
  process.exitCode = reportError(e);
}
