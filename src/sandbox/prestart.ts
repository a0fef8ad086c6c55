import { randomBytes } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { parseSandboxConfig, type SandboxConfig } from "../api/config.ts";
import type { Paths } from "../api/paths.ts";
import { AgentClient } from "../guest/agent-client.ts";
import { resolveImage } from "../image/resolve.ts";
import { cmdline, findProcesses, isAlive, selfIdentity } from "../state/procs.ts";
import { openState } from "../state/store.ts";
import type { RunningVm, VmBackend } from "../vm/backend.ts";
import { QemuBackend } from "../vm/qemu/machine.ts";
import { writeEtcFiles } from "./etc-files.ts";
import {
  adoptClone,
  bootContext,
  prepareClone,
  readyTemplate,
  restoreSpec,
  SHELL_TRUE,
  type Template,
  templateInputs,
  templateKey,
  variantOf,
} from "./snapshots.ts";

/**
 * A clone made ahead of time: a `matchlock rpc` that waits idle for its first request (the SDK's
 * spare child) restores a clone of the kind of sandbox it was told to expect, and leaves it paused.
 * A create of that kind then adopts it: only resuming it and making it this VM (SET_IDENTITY, /etc)
 * remain, not QEMU's start-up and the restore (~100 ms of a ~300 ms create here).
 *
 * Until adopted it is in no record, and needs none:
 * - its files live in `~/.matchlock/spares/<owner pid>-<start time>-<random>/`, renamed to the VM's
 *   dir at adoption (QEMU's open files, disk and console log, go along); `gc` removes the dir of an
 *   owner that is gone (`sweepSpares`);
 * - its QEMU dies with its owner (the backend's parent-death signal), and its TAP, made by that QEMU
 *   (`mls-…`, not persistent, never up, no address), goes with it;
 * - its guest is paused from the moment its state is loaded: it sends no packet and reads no clock
 *   until the sandbox that adopts it has set up its network and resumes it.
 */

const SPARES_DIR = "spares";
/** A rehearsal takes ~0.2 s here; a guest that needs longer is stuck, and the clone is dropped. */
const REHEARSAL_MS = 15_000;
const TAP_PREFIX = "mls-";

export interface PrestartedClone {
  readonly key: string;
  readonly template: Template;
  /** Its dir under `spares/`, until the sandbox renames it to the VM's. */
  readonly dir: string;
  readonly upper: string;
  /** The TAP its QEMU made; undefined without a NIC. */
  readonly tap: string | undefined;
  readonly vm: RunningVm;
  /** Its agent's connection, idle. */
  readonly agent: AgentClient;
  /** False once its QEMU has exited. */
  readonly alive: () => boolean;
}

/** The clone being made or held, with its template's key (known first). */
interface Held {
  key: Promise<string | undefined>;
  clone: Promise<PrestartedClone | undefined>;
  /** Set by `take`: a create waits, so the rehearsal stops at its next step. */
  wanted: boolean;
  /** Set when nobody will take it (another kind was asked for, or the server ends): stop making it. */
  cancelled: boolean;
}

export function sparesDir(p: Paths): string {
  return join(p.home, SPARES_DIR);
}

export class Prestart {
  readonly #p: Paths;
  readonly #config: SandboxConfig;
  readonly #backend: VmBackend;
  #held: Held | undefined;
  #discarding: Promise<void> = Promise.resolve();

  private constructor(p: Paths, config: SandboxConfig, backend: VmBackend) {
    this.#p = p;
    this.#config = config;
    this.#backend = backend;
  }

  /**
   * From the SDK's hint (PRESTART_ENV): a config. Undefined when it does not parse, when creates
   * here boot cold anyway (MATCHLOCK_COLD=1), or when MATCHLOCK_PRESTART=0 says no VM may wait
   * idle: a clone made ahead is only a time saver. (A create that boots cold for its own reasons,
   * extra disks, discards the clone.)
   */
  static fromHint(p: Paths, hint: string, backend?: VmBackend): Prestart | undefined {
    if (process.env.MATCHLOCK_COLD === "1" || process.env.MATCHLOCK_PRESTART === "0") return undefined;
    let config: SandboxConfig;
    try {
      config = parseSandboxConfig(JSON.parse(hint));
    } catch {
      return undefined;
    }
    return new Prestart(p, config, backend ?? new QemuBackend({ cacheDir: p.cache }));
  }

  /**
   * Starts making one clone, unless one is held or being made. Only from a snapshot that is ready:
   * it never builds one, never pulls an image, and any failure just leaves none.
   */
  prepare(): void {
    if (this.#held) return;
    const key = this.#keyFor().catch(() => undefined);
    const held: Held = { key, clone: Promise.resolve(undefined), wanted: false, cancelled: false };
    held.clone = key.then((k) => (k === undefined ? undefined : this.#make(k, held))).catch(() => undefined);
    this.#held = held;
  }

  /**
   * The clone for the template `key`, alive and paused; it is the caller's from then on. One still
   * being made is waited for, but only to the end of its restore (which the create would do anyway):
   * its rehearsal stops at the next step. A clone of another template is discarded, and the create
   * makes its VM as usual.
   */
  async take(key: string): Promise<PrestartedClone | undefined> {
    const held = this.#held;
    if (!held) return undefined;
    this.#held = undefined;
    held.wanted = true;
    if ((await held.key) !== key) {
      this.#drop(held);
      return undefined;
    }
    const clone = await held.clone;
    if (clone?.alive()) return clone;
    if (clone) await discardClone(clone);
    return undefined;
  }

  /**
   * Stops and removes whatever is held or being made (the rpc server is ending). Calls made while
   * one runs (EOF and SIGTERM come together) wait for the same work.
   */
  discard(): Promise<void> {
    const held = this.#held;
    this.#held = undefined;
    if (held) this.#drop(held);
    return this.#discarding;
  }

  /** Stops making `held` and removes what was made; `discard` waits for this too. */
  #drop(held: Held): void {
    held.cancelled = true;
    const gone = held.clone.then((c) => c && discardClone(c));
    this.#discarding = Promise.all([this.#discarding, gone]).then(() => {});
  }

  async #keyFor(): Promise<string> {
    const image = await resolveImage(this.#p, this.#config.image, { localOnly: true });
    return templateKey(await templateInputs(await bootContext(this.#p, image), variantOf(this.#config)));
  }

  async #make(key: string, held: Held): Promise<PrestartedClone | undefined> {
    const state = openState(this.#p);
    let template: Template | undefined;
    try {
      template = readyTemplate(state, key);
    } finally {
      state.close();
    }
    if (!template || held.cancelled) return undefined;
    const me = selfIdentity();
    const name = `${me.pid}-${me.start_time}-${randomBytes(4).toString("hex")}`;
    const dir = join(sparesDir(this.#p), name);
    const upper = join(dir, "upper.ext4");
    const tap = template.inputs.nic ? `${TAP_PREFIX}${name.slice(-8)}` : undefined;
    await mkdir(dir, { recursive: true, mode: 0o700 });
    try {
      const { devices } = await prepareClone(template, dir, upper);
      if (held.cancelled) throw new Error("cancelled");
      const vm = await this.#backend.start({
        ...restoreSpec(template, devices, { id: `spare-${name}`, dir, upper, ...(tap ? { tap } : {}) }),
        paused: true,
      });
      const agent = new AgentClient(vm.agent);
      try {
        if (held.cancelled) throw new Error("cancelled");
        await withDeadline(
          rehearse(agent, vm, template, () => held.wanted || held.cancelled),
          REHEARSAL_MS,
          "the rehearsal",
        );
      } catch (e) {
        agent.close();
        await vm.stop(0);
        throw e;
      }
      let exited = false;
      void vm.exited.then(() => {
        exited = true;
      });
      return { key, template, dir, upper, tap, vm, agent, alive: () => !exited };
    } catch (e) {
      await rm(dir, { recursive: true, force: true });
      throw e;
    }
  }
}

/**
 * Lets the clone run once through what its adoption will run, then pauses it again: SET_IDENTITY
 * (fresh entropy, clock, a placeholder hostname; no network, no folders yet), the /etc files, and a
 * first command. QEMU under TCG keeps the guest code it has translated for the life of the process,
 * so the adopting create and its first command then run translated code, which is most of their
 * time after a restore. The guest runs here without a network (its TAP is down, with no address),
 * and no user command has run in it yet.
 */
async function rehearse(
  agent: AgentClient,
  vm: RunningVm,
  t: Template,
  wanted: () => boolean,
): Promise<void> {
  const steps = [
    () =>
      adoptClone(agent, vm, ["matchlock.hostname=localhost", `matchlock.time=${Date.now() / 1000}`], 15_000),
    () =>
      writeEtcFiles(agent, {
        hostname: "localhost",
        addHosts: [],
        ...(t.inputs.nic ? { gateway: "127.0.0.1" } : {}),
      }),
    // An image without /bin/sh just skips it.
    () => agent.exec(SHELL_TRUE).done.catch(() => {}),
  ];
  if (wanted()) return; // a create is waiting already: it gets the clone as restored
  await vm.resume();
  try {
    for (const step of steps) {
      if (wanted()) break; // each step only saves the create time; it need not wait for all
      await step();
    }
  } finally {
    await vm.pause();
  }
}

function withDeadline<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took over ${ms / 1000} s`)), ms);
  });
  return Promise.race([work, late]).finally(() => clearTimeout(timer));
}

/** Stops a clone that nobody adopted and removes its dir. */
export async function discardClone(c: PrestartedClone): Promise<void> {
  c.agent.close();
  await c.vm.stop(0).catch(() => {});
  await rm(c.dir, { recursive: true, force: true }).catch(() => {});
}

/**
 * `gc`: the dirs of clones made ahead whose owner is gone (killed before it could remove them),
 * with any QEMU still running from one. Returns the names removed.
 */
export async function sweepSpares(p: Paths): Promise<string[]> {
  const root = sparesDir(p);
  const ownerGone = (name: string) => {
    const m = /^(\d+)-(\d+)-[0-9a-f]+$/.exec(name);
    return !(m && isAlive({ pid: Number(m[1]), start_time: Number(m[2]) }));
  };
  // QEMUs first, dir or not: an adopted clone's command line still names the dir it was made in,
  // and a sandbox that adopted one and died without a parent-death signal leaves it running.
  for (const proc of findProcesses(`${root}/`, /qemu-system/)) {
    const cmd = cmdline(proc.pid).join(" ");
    const name = cmd.slice(cmd.indexOf(`${root}/`) + root.length + 1).split("/")[0] ?? "";
    if (!ownerGone(name)) continue;
    try {
      process.kill(proc.pid, "SIGKILL");
    } catch {}
  }
  if (!existsSync(root)) return [];
  const removed: string[] = [];
  for (const entry of readdirSync(root, { withFileTypes: true })) {
    if (!ownerGone(entry.name)) continue;
    await rm(join(root, entry.name), { recursive: true, force: true });
    removed.push(entry.name);
  }
  return removed;
}
