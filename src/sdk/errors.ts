/**
 * The errors the SDK throws. Their own module so the hook modules can raise them without importing
 * the client (which imports them).
 */

/** An error the server answered with; `code` is the JSON-RPC code (-32000 VM failed, …). */
export class RPCError extends Error {
  readonly code: number;
  constructor(code: number, message: string) {
    super(message);
    this.name = "RPCError";
    this.code = code;
  }
}

/** A client-side failure: the rpc process died, a timeout, an abort. `stderr` holds what it printed last. */
export class MatchlockError extends Error {
  readonly stderr: string;
  constructor(message: string, stderr = "", options?: { cause?: unknown }) {
    super(stderr ? `${message}\n--- matchlock rpc stderr ---\n${stderr.trimEnd()}` : message, options);
    this.name = "MatchlockError";
    this.stderr = stderr;
  }
}

/**
 * Stable codes of VfsHookError: `VFS_HOOK_BLOCKED` an actionHook said "block" (the SDK call threw
 * it); `VFS_HOOK_INVALID_RESULT` an actionHook or mutateHook returned something it may not (thrown
 * too); `VFS_HOOK_FAILED` an after hook (hook, dangerousHook) threw, `VFS_HOOK_TIMEOUT` one ran past
 * its timeoutMs (both only reported, to ClientOptions.onHookError).
 */
export type VfsHookErrorCode =
  | "VFS_HOOK_BLOCKED"
  | "VFS_HOOK_INVALID_RESULT"
  | "VFS_HOOK_FAILED"
  | "VFS_HOOK_TIMEOUT";

/**
 * A VFS hook's verdict or failure. A MatchlockError, as in Matchlock's SDK (whose messages these
 * are), so programs that catch MatchlockError around writeFile keep working; `code`, `hook`, `op`
 * and `path` say the rest without parsing the message.
 */
export class VfsHookError extends MatchlockError {
  readonly code: VfsHookErrorCode;
  /** The rule's name ("" when it has none). */
  readonly hook: string;
  readonly op: string;
  readonly path: string;
  constructor(
    code: VfsHookErrorCode,
    message: string,
    where: { hook: string; op: string; path: string },
    options?: { cause?: unknown },
  ) {
    super(message, "", options);
    this.name = "VfsHookError";
    this.code = code;
    this.hook = where.hook;
    this.op = where.op;
    this.path = where.path;
  }
}
