import * as v from "valibot";
import { InvalidArgumentError } from "./errors.ts";

/**
 * The one definition of a sandbox config: the wire shape of PROTOCOLS.md §3 (snake_case), shared by
 * the CLI, the RPC server and the SDK. Types are inferred from the schema so they cannot drift.
 */

/** The PATH a command gets when neither the image nor the sandbox sets one (Docker's default). */
export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const positiveInt = v.pipe(v.number(), v.integer(), v.minValue(1));

export const ResourcesSchema = v.object({
  cpus: v.optional(v.pipe(v.number(), v.minValue(0.01), v.maxValue(64)), 1),
  memory_mb: v.optional(v.pipe(positiveInt, v.minValue(64), v.maxValue(262144)), 512),
  disk_size_mb: v.optional(v.pipe(positiveInt, v.minValue(16), v.maxValue(4194304)), 5120),
  timeout_seconds: v.optional(v.pipe(v.number(), v.minValue(0))),
});

export const SecretSchema = v.object({
  value: v.optional(v.string()),
  placeholder: v.optional(v.string()),
  hosts: v.optional(v.array(v.string()), []),
});

export const NetworkSchema = v.object({
  allowed_hosts: v.optional(v.array(v.string()), []),
  add_hosts: v.optional(v.array(v.object({ host: v.string(), ip: v.string() })), []),
  block_private_ips: v.optional(v.boolean(), true),
  no_network: v.optional(v.boolean(), false),
  intercept: v.optional(v.boolean(), false),
  interception: v.optional(v.unknown()),
  secrets: v.optional(v.record(v.string(), SecretSchema), {}),
  dns_servers: v.optional(v.array(v.string()), []),
  hostname: v.optional(v.string()),
  mtu: v.optional(v.pipe(positiveInt, v.minValue(576), v.maxValue(65535)), 1500),
});

export const MountSchema = v.object({
  type: v.picklist(["memory", "host_fs", "overlay"]),
  host_path: v.optional(v.string()),
  readonly: v.optional(v.boolean(), false),
});

export const VfsSchema = v.object({
  workspace: v.optional(v.string()),
  mounts: v.optional(v.record(v.string(), MountSchema), {}),
  interception: v.optional(v.unknown()),
});

/** The OCI image config fields that shape how a command runs (Docker semantics). */
export const ImageConfigSchema = v.object({
  user: v.optional(v.string()),
  working_dir: v.optional(v.string()),
  entrypoint: v.optional(v.array(v.string())),
  cmd: v.optional(v.array(v.string())),
  env: v.optional(v.record(v.string(), v.string())),
});

export const SandboxConfigSchema = v.object({
  image: v.optional(v.string()),
  privileged: v.optional(v.boolean(), false),
  launch_entrypoint: v.optional(v.boolean(), false),
  resources: v.optional(ResourcesSchema, {}),
  network: v.optional(NetworkSchema, {}),
  vfs: v.optional(VfsSchema, {}),
  env: v.optional(v.record(v.string(), v.string()), {}),
  extra_disks: v.optional(
    v.array(v.object({ host_path: v.string(), guest_mount: v.string(), readonly: v.optional(v.boolean()) })),
    [],
  ),
  image_config: v.optional(ImageConfigSchema),
});

export type SandboxConfigInput = v.InferInput<typeof SandboxConfigSchema>;
export type SandboxConfig = v.InferOutput<typeof SandboxConfigSchema>;
export type ImageConfig = v.InferOutput<typeof ImageConfigSchema>;

/** Parses and defaults a config; a bad field gives one error naming its path. */
export function parseSandboxConfig(input: unknown): SandboxConfig {
  const result = v.safeParse(SandboxConfigSchema, input);
  if (result.success) return result.output;
  const issue = result.issues[0];
  const where = issue?.path?.map((p) => String(p.key)).join(".") || "config";
  throw new InvalidArgumentError(`invalid sandbox config at ${where}: ${issue?.message ?? "invalid"}`);
}

/**
 * Features of the config that this build cannot honour yet. A config that asks for one is refused
 * with a message naming it: silently ignoring a field (say, an allowlist) would be a security bug.
 * A config that merely leaves networking at its default gets a VM without a NIC (no network is
 * the safe side of "default"); asking for anything network-specific is refused.
 */
export function unsupportedFeatures(config: SandboxConfig): string[] {
  const out: string[] = [];
  const n = config.network;
  if (n.allowed_hosts.length > 0) out.push("network.allowed_hosts (allowlist)");
  if (Object.keys(n.secrets).length > 0) out.push("network.secrets");
  if (n.add_hosts.length > 0) out.push("network.add_hosts");
  if (n.dns_servers.length > 0) out.push("network.dns_servers");
  if (n.intercept || n.interception !== undefined) out.push("network interception");
  if (config.vfs.workspace !== undefined || Object.keys(config.vfs.mounts).length > 0) out.push("vfs mounts");
  if (config.vfs.interception !== undefined) out.push("vfs interception");
  if (config.extra_disks.length > 0) out.push("extra_disks");
  if (config.privileged) out.push("privileged");
  return out;
}
