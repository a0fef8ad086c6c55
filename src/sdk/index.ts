/**
 * matchlock's TypeScript SDK: `import { Client, Sandbox } from "matchlock"`.
 *
 *   const client = new Client();
 *   await client.launch(new Sandbox().withMemory(256).withEnv("A", "1"));
 *   const r = await client.exec("echo hi; exit 3"); // { exitCode: 3, stdout: "hi\n", … }
 *   await client.close();
 */
// First: refuses an unsupported Node.js with one line before the rest of the SDK loads.
import "./node-check.ts";

export type { SandboxConfigInput as SandboxConfig } from "../api/config.ts";
export type { FileEvent, NetworkEvent, NetworkEventBody, SandboxEvent } from "../api/events.ts";
export {
  type BinaryLike,
  type CallOptions,
  Client,
  type ClientOptions,
  type ExecInteractiveOptions,
  type ExecOptions,
  type ExecPipeOptions,
  type ExecResult,
  type ExecStreamOptions,
  type FileInfo,
  type PortForwardBinding,
  RPC_CODES,
  type StreamReader,
  type StreamResult,
  type StreamWriter,
  type TTYSize,
} from "./client.ts";
export { MatchlockError, RPCError, VfsHookError, type VfsHookErrorCode } from "./errors.ts";
export type {
  NetworkBodyTransform,
  NetworkHookAction,
  NetworkHookFunc,
  NetworkHookPhase,
  NetworkHookRequest,
  NetworkHookResult,
  NetworkHookRule,
} from "./network-hooks.ts";
export {
  type ImageConfigOptions,
  type MountOptions,
  type NetworkHookFilter,
  type NetworkInterceptionConfig,
  type PortForwardSpec,
  Sandbox,
  type SandboxExtras,
  type VfsInterceptionConfig,
} from "./sandbox.ts";
export {
  VFS_HOOK_ACTION_ALLOW,
  VFS_HOOK_ACTION_BLOCK,
  VFS_HOOK_OP_CHMOD,
  VFS_HOOK_OP_CLOSE,
  VFS_HOOK_OP_CREATE,
  VFS_HOOK_OP_MKDIR,
  VFS_HOOK_OP_OPEN,
  VFS_HOOK_OP_READ,
  VFS_HOOK_OP_READDIR,
  VFS_HOOK_OP_READLINK,
  VFS_HOOK_OP_REMOVE,
  VFS_HOOK_OP_REMOVE_ALL,
  VFS_HOOK_OP_RENAME,
  VFS_HOOK_OP_STAT,
  VFS_HOOK_OP_SYMLINK,
  VFS_HOOK_OP_SYNC,
  VFS_HOOK_OP_TRUNCATE,
  VFS_HOOK_OP_WRITE,
  VFS_HOOK_PHASE_AFTER,
  VFS_HOOK_PHASE_BEFORE,
  type VFSActionHookFunc,
  type VFSActionRequest,
  type VFSDangerousHookFunc,
  type VFSHookAction,
  type VFSHookEvent,
  type VFSHookFunc,
  type VFSHookOp,
  type VFSHookPhase,
  type VFSHookRule,
  type VFSInterceptionConfig,
  type VFSMutateHookFunc,
  type VFSMutateRequest,
} from "./vfs-hooks.ts";
