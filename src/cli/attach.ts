import { MatchlockError } from "../api/errors.ts";
import { type ExecHandle, type ExecIO, type ExecResult, writeSink } from "../guest/agent-client.ts";
import { whenWritable } from "../host/drain.ts";

/**
 * Wiring a running command to this terminal: stdout/stderr, stdin with flow control, raw mode and
 * window size for -t, and signals (Ctrl-C/SIGTERM cancel the command gracefully, twice kills it).
 * Shared by `run` and `exec`.
 */

export interface AttachOptions {
  tty: boolean;
  interactive: boolean;
  /** SIGTERM, then SIGKILL after the grace period. */
  terminate: (handle: ExecHandle) => Promise<void>;
  signals: SignalRelay;
  /** Aborts the command (--timeout). */
  deadline?: AbortSignal;
  /** The command's output: the TerminalOutput whose `io` was given to exec. */
  output: TerminalOutput;
}

const SIGPIPE = 13;

/**
 * The command's stdout/stderr on ours, with back-pressure: a chunk is acknowledged to the guest only
 * once our stdout has room, so `matchlock run … | slow-reader` stalls the guest's writer. When our
 * stdout closes (`| head -1`), the command gets SIGPIPE as it would in a local pipeline; its output
 * is dropped from then on.
 */
export class TerminalOutput {
  readonly io: ExecIO;
  private broken = false;
  private onBroken: (() => void) | undefined;

  constructor() {
    guardStdio();
    const stdout = writeSink(process.stdout);
    const stderr = writeSink(process.stderr);
    this.io = {
      onStdout: (d) => (this.broken ? undefined : stdout(d)),
      onStderr: (d) => (process.stderr.destroyed ? undefined : stderr(d)),
    };
    const broke = () => {
      if (this.broken) return;
      this.broken = true;
      this.onBroken?.();
    };
    process.stdout.once("error", broke);
    if (process.stdout.destroyed) broke();
  }

  /** Our stdout closed: the handler runs once (at once if it already has). */
  whenBroken(handler: (() => void) | undefined): void {
    this.onBroken = handler;
    if (handler && this.broken) handler();
  }
}

/** A closed stdout or stderr must never crash us with EPIPE: errors on them are handled, not thrown. */
export function guardStdio(): void {
  for (const s of [process.stdout, process.stderr])
    if (s.listenerCount("error") === 0) s.on("error", () => {});
}

/** The rows/cols to start a PTY with. */
export function terminalSize(): { rows: number; cols: number } {
  const out = process.stdout;
  return out.isTTY && out.rows > 0 && out.columns > 0
    ? { rows: out.rows, cols: out.columns }
    : { rows: 24, cols: 80 };
}

/** Attaches to a started command until it ends; returns its exit code. */
export async function attach(handle: ExecHandle, opts: AttachOptions): Promise<number> {
  const stdout = process.stdout;
  const rawTty = opts.tty && opts.interactive && process.stdin.isTTY;
  const onResize = () => {
    const { rows, cols } = terminalSize();
    handle.resize(rows, cols);
  };
  if (opts.tty && stdout.isTTY) stdout.on("resize", onResize);
  if (rawTty) process.stdin.setRawMode(true);
  const pump = opts.interactive ? pumpStdin(handle) : undefined;

  let cancelledBy: string | undefined;
  const cancel = (why: string) => {
    if (cancelledBy) {
      handle.signal(9); // a second Ctrl-C: no more grace
      return;
    }
    cancelledBy = why;
    opts.terminate(handle).catch(() => {});
  };
  opts.signals.onSignal = (sig) => cancel(sig);
  let pipeTimer: NodeJS.Timeout | undefined;
  opts.output.whenBroken(() => {
    // As in a local pipeline: SIGPIPE ends most commands; one that ignores it is stopped after a grace.
    handle.signal(SIGPIPE);
    pipeTimer = setTimeout(() => cancel("stdout closed"), 1000);
  });
  opts.deadline?.addEventListener(
    "abort",
    () => cancel(String(opts.deadline?.reason?.message ?? "timeout")),
    {
      once: true,
    },
  );

  let result: ExecResult;
  try {
    result = await handle.done;
  } finally {
    opts.signals.onSignal = undefined;
    opts.output.whenBroken(undefined);
    clearTimeout(pipeTimer);
    if (rawTty) process.stdin.setRawMode(false);
    stdout.off("resize", onResize);
    pump?.stop();
  }
  // Everything the command wrote is out before we return (and the VM goes).
  if (stdout.writableNeedDrain && !stdout.destroyed) await whenWritable(stdout);
  if (result.startError !== undefined) process.stderr.write(`matchlock: ${result.startError}\n`);
  if (opts.deadline?.aborted && cancelledBy && !cancelledBy.startsWith("SIG")) {
    process.stderr.write(`matchlock: command stopped: ${cancelledBy}\n`);
  }
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

/**
 * Owns SIGINT/SIGTERM/SIGHUP for the life of a run: while booting they abort the boot; while a
 * command runs they are handed to `onSignal`; with --rm=false they end the wait.
 */
export class SignalRelay {
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

  /**
   * Resolves with `work`, or rejects when a signal arrives first; then lets `work` settle and hands
   * its result to `undo` (closing a half-booted VM), so nothing is left behind.
   */
  async during<T>(work: Promise<T>, undo: (v: T) => Promise<void> = async () => {}): Promise<T> {
    const interrupted = new Promise<never>((_, reject) => {
      this.waiters.push(() => reject(new MatchlockError("CANCELLED", `interrupted by ${this.received}`)));
    });
    const result = await Promise.race([work, interrupted]).catch(async (e: unknown) => {
      // Let the boot settle and close what it produced, so no VM is left behind.
      const settled = await work.then(
        (v) => ({ ok: true as const, v }),
        () => ({ ok: false as const }),
      );
      if (settled.ok) await undo(settled.v).catch(() => {});
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
