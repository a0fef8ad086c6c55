import * as v from "valibot";
import { interceptionIssueMessage, SandboxConfigSchema } from "./config.ts";
import type { ErrorCode } from "./errors.ts";
import { describeIssue, strictObject } from "./schema.ts";

/**
 * The JSON-RPC surface of `matchlock rpc` (PROTOCOLS.md §2), declared once: method names, their
 * params schemas and the error codes. The server validates every request against these; the SDK
 * and the protocol test read the same declarations.
 */

export const RpcCode = {
  PARSE_ERROR: -32700,
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  INVALID_PARAMS: -32602,
  INTERNAL: -32603,
  VM_FAILED: -32000,
  EXEC_FAILED: -32001,
  FILE_FAILED: -32002,
  CANCELLED: -32003,
} as const;

/** How our typed errors travel over JSON-RPC. */
export function rpcCodeFor(code: ErrorCode): number {
  switch (code) {
    case "INVALID_ARGUMENT":
      return RpcCode.INVALID_PARAMS;
    case "EXEC_FAILED":
      return RpcCode.EXEC_FAILED;
    case "FILE_FAILED":
      return RpcCode.FILE_FAILED;
    case "CANCELLED":
      return RpcCode.CANCELLED;
    case "INTERNAL":
    case "AGENT_PROTOCOL":
      return RpcCode.INTERNAL;
    default:
      return RpcCode.VM_FAILED;
  }
}

/*
 * Every params object is strict: a key we do not know is refused with -32602 naming it, never
 * dropped. The keys are those Matchlock's TypeScript, Go and Python SDKs send (exec: command,
 * working_dir, user; exec_tty adds rows, cols; close: timeout_seconds; …), so their programs run
 * unchanged. Client notifications stay lenient: they have no reply to carry an error, and dropping
 * stdin over an extra key would be worse than ignoring the key.
 */

const ExecParams = strictObject({
  command: v.pipe(v.string(), v.minLength(1, "command must not be empty")),
  // "" means the image's default, as Matchlock's SDKs send it; anything else must be absolute.
  working_dir: v.optional(
    v.pipe(
      v.string(),
      v.check(
        (d) => d === "" || d.startsWith("/"),
        (issue) =>
          `the working directory ${JSON.stringify(issue.input)} is invalid: it must be an absolute path`,
      ),
    ),
  ),
  user: v.optional(v.string()),
});

const Dims = {
  rows: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(65535)), 24),
  cols: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(65535)), 80),
};

/** Allow-list entries; Matchlock's SDKs send an array, and an empty one is a mistake worth naming. */
const Hosts = v.pipe(v.array(v.string()), v.minLength(1, "hosts is empty: give at least one host"));

const Port = v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(65535));

export const RpcMethods = {
  create: v.optional(SandboxConfigSchema, {}),
  exec: ExecParams,
  exec_stream: ExecParams,
  exec_pipe: ExecParams,
  exec_tty: strictObject({ ...ExecParams.entries, ...Dims }),
  write_file: strictObject({
    path: v.pipe(v.string(), v.minLength(1)),
    content: v.optional(v.string(), ""),
    mode: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(0o7777))),
  }),
  read_file: strictObject({ path: v.pipe(v.string(), v.minLength(1)) }),
  list_files: strictObject({ path: v.pipe(v.string(), v.minLength(1)) }),
  log: v.optional(strictObject({}), {}),
  log_stream: v.optional(strictObject({}), {}),
  allow_list_add: strictObject({ hosts: Hosts }),
  allow_list_delete: strictObject({ hosts: Hosts }),
  port_forward: strictObject({
    forwards: v.pipe(
      v.array(strictObject({ local_port: Port, remote_port: v.pipe(Port, v.minValue(1)) })),
      v.minLength(1),
    ),
    addresses: v.optional(v.array(v.string())),
  }),
  cancel: strictObject({ id: v.union([v.number(), v.string()]) }),
  close: v.optional(strictObject({ timeout_seconds: v.optional(v.number()) }), {}),
} as const;

export type RpcMethod = keyof typeof RpcMethods;

/**
 * The -32602 message for params that fail their schema, naming the field:
 * `invalid params for create: unknown key resources.memory (did you mean resources.memory_mb?)`.
 */
export function invalidParamsMessage(method: string, issues: readonly v.BaseIssue<unknown>[]): string {
  const hooks = method === "create" && issues[0] ? interceptionIssueMessage(issues[0]) : undefined;
  return `invalid params for ${method}: ${hooks ?? describeIssue(issues[0])}`;
}
export type RpcParams<M extends RpcMethod> = v.InferOutput<(typeof RpcMethods)[M]>;

/** Notifications the client sends to feed a running exec_pipe / exec_tty request. */
export const RpcClientNotifications = {
  "exec_pipe.stdin": v.object({ id: v.union([v.number(), v.string()]), data: v.string() }),
  "exec_pipe.stdin_eof": v.object({ id: v.union([v.number(), v.string()]) }),
  "exec_tty.stdin": v.object({ id: v.union([v.number(), v.string()]), data: v.string() }),
  "exec_tty.stdin_eof": v.object({ id: v.union([v.number(), v.string()]) }),
  "exec_tty.resize": v.object({ id: v.union([v.number(), v.string()]), ...Dims }),
} as const;

export type RpcClientNotification = keyof typeof RpcClientNotifications;

export function isRpcMethod(m: string): m is RpcMethod {
  return Object.hasOwn(RpcMethods, m);
}

export function isClientNotification(m: string): m is RpcClientNotification {
  return Object.hasOwn(RpcClientNotifications, m);
}

/**
 * A Unix `st_mode` as Go's `os.FileMode`, which Matchlock's `list_files` sends: permission bits
 * plus Go's type and special bits (a directory is 1<<31 | perm).
 */
export function goFileMode(stMode: number): number {
  const perm = stMode & 0o777;
  const GO = {
    dir: 2 ** 31,
    symlink: 2 ** 27,
    device: 2 ** 26,
    namedPipe: 2 ** 25,
    socket: 2 ** 24,
    setuid: 2 ** 23,
    setgid: 2 ** 22,
    charDevice: 2 ** 21,
    sticky: 2 ** 20,
  };
  let mode = perm;
  switch (stMode & 0o170000) {
    case 0o040000:
      mode += GO.dir;
      break;
    case 0o120000:
      mode += GO.symlink;
      break;
    case 0o060000:
      mode += GO.device;
      break;
    case 0o020000:
      mode += GO.device + GO.charDevice;
      break;
    case 0o010000:
      mode += GO.namedPipe;
      break;
    case 0o140000:
      mode += GO.socket;
      break;
  }
  if (stMode & 0o4000) mode += GO.setuid;
  if (stMode & 0o2000) mode += GO.setgid;
  if (stMode & 0o1000) mode += GO.sticky;
  return mode;
}
