import { hostFoldersRequested, parseSandboxConfig, type SandboxConfigInput } from "./config.ts";

/**
 * The SDK starts its spare `matchlock rpc` child with this variable: the kind of sandbox the last
 * create asked for, so that the child can restore a clone of that kind ahead of time while it waits
 * (sandbox/prestart.ts). Only what picks the snapshot goes in (image, resources, network or not,
 * host folders or not): never secrets, env, allowed hosts or host paths.
 */
export const PRESTART_ENV = "MATCHLOCK_RPC_PRESTART";

/**
 * The hint for a create with this config (wire form): itself a config, which the rpc child parses
 * as any other. Undefined for a config that does not parse (its create failed anyway).
 */
export function prestartHint(input: SandboxConfigInput): string | undefined {
  let config: ReturnType<typeof parseSandboxConfig>;
  try {
    config = parseSandboxConfig(input);
  } catch {
    return undefined;
  }
  const hint: SandboxConfigInput = {
    image: config.image,
    resources: config.resources,
    network: { no_network: config.network.no_network },
    // Host folders or not picks the snapshot; which ones does not, so a bare workspace stands for all.
    ...(hostFoldersRequested(config) ? { vfs: { workspace: "/workspace" } } : {}),
  };
  return JSON.stringify(hint);
}
