import { createWriteStream } from "node:fs";
import { join } from "node:path";
import { MatchlockError } from "../api/errors.ts";
import { type ExecHandle, type OutputSink, writeSink } from "../guest/agent-client.ts";
import type { Sandbox } from "./sandbox.ts";

/**
 * Matchlock's `launch_entrypoint` (its SDKs' `launch()` always asks for it): the image's ENTRYPOINT +
 * CMD started detached when the sandbox is created, stdin empty, its output appended to a log in the
 * VM dir (RPC `log` / `log_stream` include it). If it fails within ENTRYPOINT_SETTLE_MS, create
 * fails with its exit and the end of its output, as in Matchlock. An image with neither ENTRYPOINT
 * nor CMD launches nothing (a line in the log says so) rather than failing every `launch()`.
 */

export const ENTRYPOINT_LOG = "entrypoint.log";
/** A detached `run`'s command output, in the VM dir. */
export const RUN_LOG = "run.log";
/**
 * A VM's logs in the order they are shown (`matchlock log`, RPC `log` / `log_stream`): the console,
 * a detached run's output, the launched entrypoint's output.
 */
export const VM_LOG_FILES = ["console.log", RUN_LOG, ENTRYPOINT_LOG] as const;
/** A launched entrypoint that ends non-zero sooner than this fails the create (Matchlock's 500 ms). */
export const ENTRYPOINT_SETTLE_MS = 500;
/** How much of its output an early failure quotes. */
const TAIL_BYTES = 2048;

export async function launchEntrypoint(sb: Sandbox): Promise<ExecHandle | undefined> {
  const log = createWriteStream(join(sb.dir, ENTRYPOINT_LOG), { flags: "a" });
  log.on("error", () => {}); // a full disk must not take the owner down; the guest then just waits
  const argv = [...(sb.imageConfig.entrypoint ?? []), ...(sb.imageConfig.cmd ?? [])];
  if (argv.length === 0) {
    log.end("matchlock: the image has no Entrypoint or Cmd: nothing launched\n");
    return undefined;
  }
  let tail = Buffer.alloc(0);
  const file = writeSink(log);
  const sink: OutputSink = (d) => {
    tail = Buffer.concat([tail, d]).subarray(-TAIL_BYTES);
    return file(d);
  };
  const handle = sb.exec({ argv, tty: false, stdin: false }, { onStdout: sink, onStderr: sink });
  handle.done.then(
    () => log.end(),
    () => log.end(),
  );
  let timer: NodeJS.Timeout | undefined;
  const settled = await Promise.race([
    handle.done.then(
      (r) => r,
      (e: unknown) => ({ exitCode: -1, signal: 0, startError: e instanceof Error ? e.message : String(e) }),
    ),
    new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), ENTRYPOINT_SETTLE_MS);
    }),
  ]);
  clearTimeout(timer);
  if (settled === undefined || (settled.exitCode === 0 && settled.startError === undefined)) return handle;
  const why =
    settled.startError ??
    (settled.signal ? `was killed by signal ${settled.signal}` : `exited with code ${settled.exitCode}`);
  const output = tail.toString("utf8").trim();
  throw new MatchlockError(
    "VM_FAILED",
    `the image's entrypoint ${JSON.stringify(argv)} ${why} within ${ENTRYPOINT_SETTLE_MS} ms${output ? `: ${output}` : ""}`,
  );
}
