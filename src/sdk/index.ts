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
  MatchlockError,
  type PortForwardBinding,
  RPC_CODES,
  RPCError,
  type StreamReader,
  type StreamResult,
  type StreamWriter,
  type TTYSize,
} from "./client.ts";
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
