import * as v from "valibot";
import { interceptionIssueMessage, SandboxConfigSchema } from "./config.ts";
import type { ErrorCode } from "./errors.ts";
import { SandboxEventSchema } from "./events.ts";
import { describeIssue, strictObject } from "./schema.ts";

/**
 * The JSON-RPC surface of `matchlock rpc` (PROTOCOLS.md §2), declared once: per method its params
 * and its result, the notifications both ways, and the error codes. The server's handler table is
 * typed from these (a missing handler does not compile), it validates params on the way in and
 * results on the way out; the SDK's calls are typed from them and parse results and notifications
 * with the same schemas; a test checks docs/rpc.md against them.
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
  // Ours (Matchlock has no pause): freeze / thaw the VM's vCPUs.
  pause: v.optional(strictObject({}), {}),
  resume: v.optional(strictObject({}), {}),
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
/** What a client sends (defaults not applied yet). */
export type RpcParamsInput<M extends RpcMethod> = v.InferInput<(typeof RpcMethods)[M]>;

/*
 * Results. Objects are not strict: a newer server may add keys, and a client must not break on
 * them. Bytes travel base64 (stdout, stderr, content), as in Matchlock.
 */
const Empty = v.object({});
const StreamedExit = v.object({ exit_code: v.number(), duration_ms: v.number() });
const AllowListResult = { allowed_hosts: v.array(v.string()) };

export const RpcResults = {
  create: v.object({ id: v.string() }),
  exec: v.object({
    exit_code: v.number(),
    stdout: v.string(),
    stderr: v.string(),
    duration_ms: v.number(),
  }),
  exec_stream: StreamedExit,
  exec_pipe: StreamedExit,
  exec_tty: StreamedExit,
  write_file: Empty,
  read_file: v.object({ content: v.string() }),
  list_files: v.object({
    files: v.array(
      v.object({
        name: v.string(),
        size: v.number(),
        /** Go's os.FileMode (goFileMode). */
        mode: v.number(),
        /** RFC 3339. */
        mod_time: v.string(),
        is_dir: v.boolean(),
      }),
    ),
  }),
  log: v.object({ content: v.string() }),
  log_stream: Empty,
  allow_list_add: v.object({ added: v.array(v.string()), ...AllowListResult }),
  allow_list_delete: v.object({ removed: v.array(v.string()), ...AllowListResult }),
  port_forward: v.object({
    bindings: v.array(v.object({ address: v.string(), local_port: v.number(), remote_port: v.number() })),
  }),
  cancel: v.object({ cancelled: v.boolean() }),
  close: Empty,
  pause: v.object({ paused: v.boolean(), changed: v.boolean() }),
  resume: v.object({ paused: v.boolean(), changed: v.boolean() }),
} as const satisfies Record<RpcMethod, v.GenericSchema>;

export type RpcResult<M extends RpcMethod> = v.InferOutput<(typeof RpcResults)[M]>;

const RequestId = v.union([v.number(), v.string()]);
/** A piece of a request's output: `id` is the request's, `data` base64. */
const Chunk = v.object({ id: RequestId, data: v.string() });

/**
 * Notifications the server sends. Output notifications carry the id of the request they belong to;
 * `event` is unsolicited (a network decision of the VM).
 */
export const RpcServerNotifications = {
  "exec_stream.stdout": Chunk,
  "exec_stream.stderr": Chunk,
  "exec_pipe.ready": v.object({ id: RequestId }),
  "exec_pipe.stdout": Chunk,
  "exec_pipe.stderr": Chunk,
  "exec_tty.ready": v.object({ id: RequestId }),
  "exec_tty.stdout": Chunk,
  "log_stream.data": Chunk,
  event: SandboxEventSchema,
} as const;

export type RpcServerNotification = keyof typeof RpcServerNotifications;
export type RpcNotificationParams<N extends RpcServerNotification> = v.InferOutput<
  (typeof RpcServerNotifications)[N]
>;

export function isServerNotification(m: string): m is RpcServerNotification {
  return Object.hasOwn(RpcServerNotifications, m);
}

/** Notifications the client sends to feed a running exec_pipe / exec_tty request. */
export const RpcClientNotifications = {
  "exec_pipe.stdin": Chunk,
  "exec_pipe.stdin_eof": v.object({ id: RequestId }),
  "exec_tty.stdin": Chunk,
  "exec_tty.stdin_eof": v.object({ id: RequestId }),
  "exec_tty.resize": v.object({ id: RequestId, ...Dims }),
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
