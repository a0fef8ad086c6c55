import { isBinaryLike, toBuffer } from "./bytes.ts";
import type { Client } from "./client.ts";
import { VfsHookError } from "./errors.ts";
import {
  type AfterHook,
  type CompiledVfsInterception,
  matchesLocalRule,
  VFS_HOOK_ACTION_ALLOW,
  VFS_HOOK_ACTION_BLOCK,
  VFS_HOOK_OP_WRITE,
  type VFSActionRequest,
  type VFSHookEvent,
} from "./vfs-hooks.ts";

/**
 * Runs one sandbox's local VFS hooks (compiled by compileVfsInterception), with Matchlock's SDK
 * semantics:
 *
 * - After hooks run on each `file` event that matches them, without holding up the client (the
 *   event handler returns at once). A `dangerousHook` runs every time, concurrently, and may call
 *   the client, whose file operations make new events that run it again (re-entry is its author's
 *   business). The safe `hook`s of one event run one after the other while a flag is up; events
 *   that arrive meanwhile are dropped for safe hooks, so what a safe hook does to the files (through
 *   a client it holds) cannot run it again. `timeoutMs` stops the waiting, not the hook: the flag
 *   comes down and the next event runs.
 * - Errors and timeouts of after hooks never reach the client's callers: they go to `onError`.
 * - Before hooks run inline in the SDK's own file calls: actionHook first ("block" throws
 *   VfsHookError VFS_HOOK_BLOCKED and the call never reaches the server), then each matching
 *   mutateHook in turn on the content. What they throw, the call throws.
 */
export class VfsHookRunner {
  readonly #hooks: CompiledVfsInterception;
  readonly #client: Client;
  readonly #onError: (e: VfsHookError) => void;
  #safeActive = false;

  private constructor(hooks: CompiledVfsInterception, client: Client, onError: (e: VfsHookError) => void) {
    this.#hooks = hooks;
    this.#client = client;
    this.#onError = onError;
  }

  /** A runner for the local hooks, or undefined when there are none (nothing to do per call). */
  static of(
    hooks: CompiledVfsInterception,
    client: Client,
    onError: (e: VfsHookError) => void,
  ): VfsHookRunner | undefined {
    if (hooks.after.length + hooks.mutate.length + hooks.action.length === 0) return undefined;
    return new VfsHookRunner(hooks, client, onError);
  }

  /** A file event from the server. Never throws and never waits. */
  onFileEvent(event: VFSHookEvent): void {
    const safe: AfterHook[] = [];
    for (const hook of this.#hooks.after) {
      if (!matchesLocalRule(hook, event.op, event.path)) continue;
      if (hook.dangerous) void this.#runAfter(hook, event);
      else safe.push(hook);
    }
    if (safe.length === 0 || this.#safeActive) return;
    void this.#runSafe(safe, event);
  }

  async #runSafe(hooks: AfterHook[], event: VFSHookEvent): Promise<void> {
    // Raised before the first hook starts (this part runs synchronously), so an event the hook's
    // own calls cause always finds it up.
    this.#safeActive = true;
    try {
      for (const hook of hooks) await this.#runAfter(hook, event);
    } finally {
      this.#safeActive = false;
    }
  }

  /** One after hook: resolves when it ends or its timeout passes; reports what went wrong. */
  async #runAfter(hook: AfterHook, event: VFSHookEvent): Promise<void> {
    const where = { hook: hook.name, op: event.op, path: event.path };
    const failed = (e: unknown) =>
      this.#report(
        new VfsHookError(
          "VFS_HOOK_FAILED",
          `vfs hook ${JSON.stringify(hook.name)} failed on ${event.op} ${event.path}: ${e instanceof Error ? e.message : String(e)}`,
          where,
          { cause: e },
        ),
      );
    // Called through a promise, so a hook that throws synchronously is reported like any other.
    const run = Promise.resolve().then(() => hook.run(this.#client, { ...event }));
    if (hook.timeoutMs <= 0) {
      await run.catch(failed);
      return;
    }
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      run.then(
        () => false,
        (e: unknown) => {
          failed(e);
          return false;
        },
      ),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), hook.timeoutMs);
        // A hook that hangs must not keep the program alive on our account.
        timer.unref();
      }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      this.#report(
        new VfsHookError(
          "VFS_HOOK_TIMEOUT",
          `vfs hook ${JSON.stringify(hook.name)} on ${event.op} ${event.path} did not finish within ${hook.timeoutMs} ms`,
          where,
        ),
      );
    }
  }

  #report(e: VfsHookError): void {
    try {
      this.#onError(e);
    } catch {
      // The program's own error handler failed: nothing left to tell.
    }
  }

  /** The actionHooks for one SDK call; throws VfsHookError when one blocks it or answers nonsense. */
  async checkAction(op: string, path: string, size: number, mode: number): Promise<void> {
    for (const hook of this.#hooks.action) {
      if (!matchesLocalRule(hook, op, path)) continue;
      const request: VFSActionRequest = { op, path, size, mode, ...owner() };
      const answer = (await hook.run(request)) ?? VFS_HOOK_ACTION_ALLOW;
      const decision = String(answer).trim().toLowerCase();
      const where = { hook: hook.name, op, path };
      if (decision === "" || decision === VFS_HOOK_ACTION_ALLOW) continue;
      if (decision === VFS_HOOK_ACTION_BLOCK) {
        throw new VfsHookError(
          "VFS_HOOK_BLOCKED",
          `vfs action hook blocked operation: op=${op} path=${path} hook=${JSON.stringify(hook.name)}`,
          where,
        );
      }
      throw new VfsHookError(
        "VFS_HOOK_INVALID_RESULT",
        `invalid action_hook return value for ${JSON.stringify(hook.name)}: expected "allow"|"block", got ${JSON.stringify(decision)}`,
        where,
      );
    }
  }

  /** The content a writeFile stores: each matching mutateHook in turn may replace it. */
  async mutateWrite(path: string, content: Buffer, mode: number): Promise<Buffer> {
    let current = content;
    for (const hook of this.#hooks.mutate) {
      if (!matchesLocalRule(hook, VFS_HOOK_OP_WRITE, path)) continue;
      const out = await hook.run({ path, size: current.length, mode, ...owner() });
      if (out === null || out === undefined) continue;
      if (!isBinaryLike(out)) {
        throw new VfsHookError(
          "VFS_HOOK_INVALID_RESULT",
          `invalid mutate_hook return type for ${JSON.stringify(hook.name)}: expected bytes|string|undefined`,
          { hook: hook.name, op: VFS_HOOK_OP_WRITE, path },
        );
      }
      current = toBuffer(out);
    }
    return current;
  }
}

/** This program's effective uid and gid, which Matchlock puts in hook requests. */
function owner(): { uid: number; gid: number } {
  return { uid: process.geteuid?.() ?? 0, gid: process.getegid?.() ?? 0 };
}
