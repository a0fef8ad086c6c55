/**
 * Every error matchlock raises on purpose is a MatchlockError with a stable `code`. The CLI turns it
 * into one line on stderr and an exit code; the RPC server into a JSON-RPC error. Callers test
 * `code` (or the class), never the message text.
 */
export type ErrorCode =
  | "INVALID_ARGUMENT" // bad flag, spec or config value
  | "NOT_SET_UP" // a prerequisite `matchlock setup` provides is missing
  | "SETUP_FAILED" // a setup step failed
  | "IMAGE_NOT_FOUND"
  | "VM_NOT_FOUND" // no VM with this id is recorded (never was, or already removed)
  | "VM_NOT_RUNNING" // the VM is stopped, crashed or stopping: pause/resume and guest operations cannot reach it
  | "VM_PAUSED" // the VM is paused (`matchlock pause`): nothing runs in the guest until it is resumed
  | "DB_CORRUPT" // state.db (or metadata.db) is not a usable SQLite database; the hint says how to recover
  | "VM_BOOT_FAILED" // QEMU exited or the agent never said READY before the deadline
  | "VM_FAILED" // the VM died or misbehaved after boot
  | "AGENT_PROTOCOL" // the guest sent bytes that break the agent protocol
  | "EXEC_FAILED" // the guest could not start the command
  | "FILE_FAILED" // a guest file operation failed
  | "NETWORK_FAILED" // the host side of a VM's network could not be set up or torn down
  | "DNS_FAILED" // no upstream DNS server answered a lookup the host itself made
  | "CANCELLED"
  | "UNSUPPORTED_NODE" // this Node.js version cannot run matchlock (src/api/node-support.ts)
  | "INTERNAL";

export class MatchlockError extends Error {
  readonly code: ErrorCode;
  /** A line telling the user what to do about it, printed after the message. */
  readonly hint: string | undefined;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; hint?: string }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = "MatchlockError";
    this.code = code;
    this.hint = options?.hint;
  }
}

export class InvalidArgumentError extends MatchlockError {
  constructor(message: string, hint?: string) {
    super("INVALID_ARGUMENT", message, hint === undefined ? undefined : { hint });
    this.name = "InvalidArgumentError";
  }
}

export class NotSetUpError extends MatchlockError {
  constructor(message: string) {
    super("NOT_SET_UP", message, { hint: "run `matchlock setup` (as root) first" });
    this.name = "NotSetUpError";
  }
}

export class VmBootError extends MatchlockError {
  constructor(message: string, options?: { cause?: unknown; hint?: string }) {
    super("VM_BOOT_FAILED", message, options);
    this.name = "VmBootError";
  }
}

/** Thrown by the SDK's import on a Node.js it cannot run on; the message is one line saying what to install. */
export class UnsupportedNodeError extends MatchlockError {
  constructor(message: string) {
    super("UNSUPPORTED_NODE", message);
    this.name = "UnsupportedNodeError";
  }
}

/**
 * A guest operation (exec, file transfer, port forward) on a paused VM. Refused rather than left
 * waiting: the caller paused it, or someone else did, and either way the fix is to resume it.
 */
export class VmPausedError extends MatchlockError {
  readonly vmId: string;
  constructor(vmId: string) {
    super("VM_PAUSED", `VM ${vmId} is paused: resume it first with \`matchlock resume ${vmId}\``, {
      hint: "a paused VM runs nothing; `matchlock list` shows it as paused",
    });
    this.name = "VmPausedError";
    this.vmId = vmId;
  }
}

/** Pause or resume of a VM that is not running: stopped, crashed (its owner is gone) or stopping. */
export class VmNotRunningError extends MatchlockError {
  readonly vmId: string;
  readonly status: string;
  constructor(vmId: string, status: string) {
    super("VM_NOT_RUNNING", `VM ${vmId} is not running (${status})`, {
      hint:
        status === "stopping"
          ? "it is being stopped"
          : "only a running VM can be paused or resumed; `matchlock list` shows each VM's status",
    });
    this.name = "VmNotRunningError";
    this.vmId = vmId;
    this.status = status;
  }
}

export class AgentProtocolError extends MatchlockError {
  constructor(message: string) {
    super("AGENT_PROTOCOL", message);
    this.name = "AgentProtocolError";
  }
}

export function isMatchlockError(e: unknown): e is MatchlockError {
  return e instanceof MatchlockError;
}

/** The message of any thrown value, for wrapping causes into our own errors. */
export function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
