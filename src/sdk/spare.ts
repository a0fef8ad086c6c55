import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { Socket } from "node:net";

/**
 * Warm spare `matchlock rpc` children for the SDK. Starting Node and loading the CLI costs each
 * `new Client().create()` ~300 ms; a long-lived program pays it once if, after a create, one child
 * is started in the background for the next Client with the same spawn spec to take.
 *
 * A spare never keeps the program alive: while idle its process and pipes are unref'd, so the
 * program exits as if it were not there; its stdin then closes and `matchlock rpc` exits on EOF
 * (with nothing created, it leaves nothing behind). Idle spares are also sent SIGTERM on exit,
 * for binaries (MATCHLOCK_BIN) that might not exit on EOF.
 */

/** What a Client would spawn; children are interchangeable only when all of it is equal. */
export interface SpawnSpec {
  readonly cmd: string;
  readonly args: readonly string[];
  readonly env: NodeJS.ProcessEnv;
  /**
   * Relative host paths in a config are resolved against the child's cwd. Undefined when this
   * process's cwd is gone: the child inherits it as before.
   */
  readonly cwd: string | undefined;
}

/** A spare handed to a Client: referenced again, its listeners gone, with what it printed so far. */
export interface AdoptedChild {
  readonly child: ChildProcessWithoutNullStreams;
  readonly stderrTail: string;
}

export interface SparePoolOptions {
  /** At most this many idle children in all (one per spec); the oldest goes first. */
  readonly max: number;
  /** How much of an idle child's stderr is kept for the Client that takes it. */
  readonly stderrTail: number;
}

/** This process's cwd; undefined if it was removed (process.cwd() throws then). */
export function currentDir(): string | undefined {
  try {
    return process.cwd();
  } catch {
    return undefined;
  }
}

export function spawnKey(spec: SpawnSpec): string {
  const env = Object.entries(spec.env)
    .filter((e): e is [string, string] => e[1] !== undefined)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return JSON.stringify([spec.cmd, spec.args, spec.cwd ?? null, env]);
}

/** Starts a child as Client does (same stdio), in the spec's cwd. */
export function spawnRpc(spec: SpawnSpec): ChildProcessWithoutNullStreams {
  return spawn(spec.cmd, [...spec.args], {
    stdio: ["pipe", "pipe", "pipe"],
    env: spec.env,
    ...(spec.cwd === undefined ? {} : { cwd: spec.cwd }),
  });
}

/** The three pipes: net.Sockets at run time, though typed as plain streams. */
function pipesOf(child: ChildProcessWithoutNullStreams): Socket[] {
  return [child.stdin, child.stdout, child.stderr].filter((s): s is Socket => s instanceof Socket);
}

/**
 * Whether the process still runs. Node learns of an exit only when its event loop gets to the
 * SIGCHLD, so a child killed a moment ago still has no exitCode: its /proc entry (gone, or a
 * zombie) says so at once. Without /proc, Node's view is all there is.
 */
function running(child: ChildProcessWithoutNullStreams): boolean {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return false;
  let stat: string;
  try {
    stat = readFileSync(`/proc/${child.pid}/stat`, "latin1");
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== "ENOENT";
  }
  // "pid (comm) S …": the comm may hold spaces and parentheses, the state follows the last ")".
  const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
  return state !== "Z" && state !== "X";
}

class Spare {
  readonly child: ChildProcessWithoutNullStreams;
  tail = "";
  gone = false;
  private readonly tailMax: number;
  private readonly forget: (s: Spare) => void;
  private readonly onStderr = (d: string) => {
    this.tail = (this.tail + d).slice(-this.tailMax);
  };
  private readonly onGone = () => {
    this.gone = true;
    this.forget(this);
  };
  private readonly ignore = () => {};

  constructor(child: ChildProcessWithoutNullStreams, tailMax: number, forget: (s: Spare) => void) {
    this.child = child;
    this.tailMax = tailMax;
    this.forget = forget;
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", this.onStderr);
    child.stdin.on("error", this.ignore);
    child.once("error", this.onGone);
    child.once("exit", this.onGone);
    child.unref();
    for (const p of pipesOf(child)) p.unref();
  }

  get alive(): boolean {
    return !this.gone && running(this.child);
  }

  /** Hands the child over: the taker attaches its own listeners at once (same tick). */
  adopt(): AdoptedChild {
    const c = this.child;
    c.stderr.off("data", this.onStderr);
    c.stdin.off("error", this.ignore);
    c.off("error", this.onGone);
    c.off("exit", this.onGone);
    c.ref();
    for (const p of pipesOf(c)) p.ref();
    return { child: c, stderrTail: this.tail };
  }

  /** EOF ends `matchlock rpc`; SIGTERM anything that does not read its stdin. */
  discard(): void {
    this.gone = true;
    this.child.stdin.destroy();
    this.child.kill("SIGTERM");
  }
}

export class SparePool {
  private readonly spares = new Map<string, Spare>();
  private exitHook = false;
  private readonly opts: SparePoolOptions;
  private readonly start: (spec: SpawnSpec) => ChildProcessWithoutNullStreams;

  constructor(opts: SparePoolOptions, start: (spec: SpawnSpec) => ChildProcessWithoutNullStreams = spawnRpc) {
    this.opts = opts;
    this.start = start;
  }

  /** The idle child for `spec`, if there is one that still runs; it leaves the pool. */
  take(spec: SpawnSpec): AdoptedChild | undefined {
    const key = spawnKey(spec);
    const s = this.spares.get(key);
    if (!s) return undefined;
    this.spares.delete(key);
    if (s.alive) return s.adopt();
    s.discard();
    return undefined;
  }

  /**
   * Starts a spare for `spec` unless one is idle already. `extraEnv` goes to the child's env but
   * not into the key (a hint for it, not a difference a Client would see). Never throws: a spare
   * is only a time saver.
   */
  fill(spec: SpawnSpec, extraEnv: NodeJS.ProcessEnv = {}): void {
    if (spec.cwd === undefined) return; // a removed cwd: nothing tells two of them apart
    const key = spawnKey(spec);
    const have = this.spares.get(key);
    if (have?.alive) return;
    if (have) this.drop(key, have);
    for (const [k, s] of this.spares) {
      if (this.spares.size < this.opts.max) break;
      this.drop(k, s);
    }
    let child: ChildProcessWithoutNullStreams;
    try {
      child = this.start({ ...spec, env: { ...spec.env, ...extraEnv } });
    } catch {
      return;
    }
    const spare = new Spare(child, this.opts.stderrTail, (gone) => {
      if (this.spares.get(key) === gone) this.spares.delete(key);
    });
    this.spares.set(key, spare);
    if (!this.exitHook) {
      this.exitHook = true;
      process.once("exit", () => this.clear());
    }
  }

  /** The idle child's pid for `spec` (tests). */
  pidOf(spec: SpawnSpec): number | undefined {
    return this.spares.get(spawnKey(spec))?.child.pid;
  }

  get size(): number {
    return this.spares.size;
  }

  /** Ends every idle child. */
  clear(): void {
    for (const [k, s] of this.spares) this.drop(k, s);
  }

  private drop(key: string, s: Spare): void {
    this.spares.delete(key);
    s.discard();
  }
}
