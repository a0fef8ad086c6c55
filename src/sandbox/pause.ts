import { VmPausedError } from "../api/errors.ts";
import type { RunningVm } from "../vm/backend.ts";

/**
 * Pause and resume of one VM (`matchlock pause|resume`, RPC `pause|resume`): the hypervisor freezes
 * the guest's vCPUs, the lifecycle records it, and guest operations are refused until the resume.
 *
 * Both are idempotent (pausing a paused VM changes nothing and says so) and run one at a time in
 * call order, so concurrent callers (two CLI processes, an RPC client and a CLI) always leave the VM
 * in the state the last one asked for, with the record matching the hypervisor.
 */

/** A pause or resume: the state after it, and whether this call changed it. */
export interface PauseState {
  paused: boolean;
  changed: boolean;
}

export interface PauseTarget {
  readonly id: string;
  readonly vm: Pick<RunningVm, "pause" | "resume">;
  /** Writes the pause (`since`) or the resume (undefined) to state.db (LifecycleStore.setPaused). */
  record(since: string | undefined): void;
  /**
   * Why the VM cannot be paused or resumed now (it is stopping, or died), or undefined. `closing`:
   * the caller is the close itself, which resumes the VM on its way down.
   */
  refusal(closing: boolean): Error | undefined;
  /** The error to report for a failed QMP command: the VM's death, if that is what it was. */
  failure(e: unknown): Promise<unknown>;
}

export class VmPause {
  private readonly target: PauseTarget;
  /** When the VM was paused, while it is. */
  private since: string | undefined;
  private chain: Promise<unknown> = Promise.resolve();

  constructor(target: PauseTarget) {
    this.target = target;
  }

  get paused(): boolean {
    return this.since !== undefined;
  }

  /** Guest operations call this first: a paused VM refuses them instead of leaving them waiting. */
  refuseIfPaused(): void {
    if (this.since !== undefined) throw new VmPausedError(this.target.id);
  }

  /** Pauses (`true`) or resumes (`false`) after every change asked for before. */
  change(pause: boolean, opts: { closing?: boolean } = {}): Promise<PauseState> {
    const run = () => this.apply(pause, opts.closing === true);
    const result = this.chain.then(run, run);
    this.chain = result.catch(() => {});
    return result;
  }

  private async apply(pause: boolean, closing: boolean): Promise<PauseState> {
    const t = this.target;
    const refused = t.refusal(closing);
    if (refused) throw refused;
    if (this.paused === pause) return { paused: pause, changed: false };
    // The hypervisor first, then the record: a record of a pause that did not happen would make
    // `list` lie, and the other order cannot leave one behind (a failed record is undone below).
    try {
      await (pause ? t.vm.pause() : t.vm.resume());
    } catch (e) {
      throw await t.failure(e);
    }
    const since = pause ? new Date().toISOString() : undefined;
    try {
      t.record(since);
    } catch (e) {
      // A pause that `list` cannot see (or a resume it does not know of) must not stay: undo it.
      await (pause ? t.vm.resume() : t.vm.pause()).catch(() => {});
      throw e;
    }
    this.since = since;
    return { paused: pause, changed: true };
  }
}
