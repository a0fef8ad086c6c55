import { isIP } from "node:net";
import * as v from "valibot";
import { InvalidArgumentError } from "./errors.ts";
import { interceptionIssueError, NetworkInterceptionSchema } from "./network-hooks.ts";
import { describeIssue, strictObject } from "./schema.ts";

/**
 * The one definition of a sandbox config: the wire shape of PROTOCOLS.md §3 (snake_case), shared by
 * the CLI, the RPC server and the SDK. Types are inferred from the schema so they cannot drift.
 */

/** The PATH a command gets when neither the image nor the sandbox sets one (Docker's default). */
export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const positiveInt = v.pipe(v.number(), v.integer(), v.minValue(1));

export const ResourcesSchema = strictObject({
  cpus: v.optional(v.pipe(v.number(), v.minValue(0.01), v.maxValue(64)), 1),
  memory_mb: v.optional(v.pipe(positiveInt, v.minValue(64), v.maxValue(262144)), 512),
  disk_size_mb: v.optional(v.pipe(positiveInt, v.minValue(16), v.maxValue(4194304)), 5120),
  /** Matchlock's field: stored with the VM, never enforced (Matchlock's SDK always sends 300). */
  timeout_seconds: v.optional(v.pipe(v.number(), v.minValue(0))),
  /** Ours: the VM is closed when this many seconds have passed since create (`--timeout`). */
  lifetime_seconds: v.optional(v.pipe(v.number(), v.minValue(0))),
});

const HOSTNAME =
  /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

/** An RFC 1123 host name: it lands in the guest's /etc/hosts and /etc/hostname, so nothing else may. */
export function isValidHostname(h: string): boolean {
  return h.length <= 253 && HOSTNAME.test(h);
}

const hostname = v.pipe(
  v.string(),
  v.check(isValidHostname, "not a valid host name (letters, digits, '-' and '.', at most 253 characters)"),
);
const ipAddress = v.pipe(
  v.string(),
  v.check((s) => isIP(s) !== 0, "not an IP address"),
);

/** Go's encoding/json writes a nil slice as `null`: Matchlock's Go SDK sends `allowed_hosts: null`. */
const stringList = v.nullish(v.array(v.string()), []);

export const SecretSchema = strictObject({
  value: v.optional(v.string()),
  placeholder: v.optional(v.string()),
  hosts: stringList,
});

export const NetworkSchema = strictObject({
  allowed_hosts: stringList,
  add_hosts: v.nullish(v.array(strictObject({ host: hostname, ip: ipAddress })), []),
  block_private_ips: v.optional(v.boolean(), true),
  no_network: v.optional(v.boolean(), false),
  intercept: v.optional(v.boolean(), false),
  /** Network hooks (src/api/network-hooks.ts); `null` is absent (Go's nil pointer). */
  interception: v.pipe(
    v.nullish(NetworkInterceptionSchema),
    v.transform((i) => i ?? undefined),
  ),
  secrets: v.optional(v.record(v.string(), SecretSchema), {}),
  dns_servers: v.nullish(v.array(ipAddress), []),
  hostname: v.optional(v.union([v.literal(""), hostname])),
  /** Ours: exact addresses the private floor lets the guest reach (`--allow-private-host`). */
  allow_private_hosts: v.nullish(v.array(ipAddress), []),
  mtu: v.optional(v.pipe(positiveInt, v.minValue(576), v.maxValue(65535)), 1500),
  /** Matchlock declares it and never runs it: accepted when empty, refused (unsupportedFeatures) when not. */
  policy_script: v.optional(v.string()),
});

export const MountSchema = strictObject({
  type: v.picklist(["memory", "host_fs", "overlay"]),
  host_path: v.optional(v.string()),
  readonly: v.optional(v.boolean(), false),
});

/** Matchlock's VFS hook rule; ops and the path glob are checked by the VFS layer (compileRules). */
export const VfsRuleSchema = strictObject({
  name: v.optional(v.string()),
  phase: v.optional(v.picklist(["before", "after"])),
  ops: v.nullish(v.array(v.string())),
  path: v.optional(v.string()),
  action: v.optional(v.picklist(["allow", "block"])),
  timeout_ms: v.optional(v.number()),
});

export const VfsSchema = strictObject({
  workspace: v.optional(v.string()),
  mounts: v.optional(v.record(v.string(), MountSchema), {}),
  /** File hooks: `before` rules allow or block (EPERM) operations; events after them. */
  interception: v.nullish(
    strictObject({
      emit_events: v.optional(v.boolean(), false),
      rules: v.nullish(v.array(VfsRuleSchema)),
    }),
  ),
  /** Matchlock's, unused there: accepted when empty, refused (unsupportedFeatures) when not. */
  direct_mounts: v.optional(v.unknown()),
});

/** The OCI image config fields that shape how a command runs (Docker semantics). */
export const ImageConfigSchema = strictObject({
  user: v.optional(v.string()),
  working_dir: v.optional(
    v.pipe(
      v.string(),
      v.check((d) => d === "" || d.startsWith("/"), "the working directory must be an absolute path"),
    ),
  ),
  entrypoint: v.optional(v.array(v.string())),
  cmd: v.optional(v.array(v.string())),
  env: v.optional(v.record(v.string(), v.string())),
});

/** Keys of the sections, so a key given at the wrong level gets a pointer to the right one. */
const SECTION_KEYS = [
  ...Object.keys(ResourcesSchema.entries).map((k) => `resources.${k}`),
  ...Object.keys(NetworkSchema.entries).map((k) => `network.${k}`),
  ...Object.keys(VfsSchema.entries).map((k) => `vfs.${k}`),
];

export const SandboxConfigSchema = strictObject(
  {
    image: v.optional(
      v.pipe(
        v.string(),
        v.check((s) => s.trim() !== "", "the image reference is empty (omit image for the default image)"),
      ),
    ),
    /** Matchlock's SDKs may send it; the id is always chosen by the server. */
    id: v.optional(
      v.pipe(
        v.string(),
        v.check((s) => s === "", "the VM id is chosen by matchlock: leave id empty"),
      ),
    ),
    privileged: v.optional(v.boolean(), false),
    launch_entrypoint: v.optional(v.boolean(), false),
    resources: v.optional(ResourcesSchema, {}),
    network: v.optional(NetworkSchema, {}),
    vfs: v.optional(VfsSchema, {}),
    env: v.optional(v.record(v.string(), v.string()), {}),
    extra_disks: v.optional(
      v.array(
        strictObject({ host_path: v.string(), guest_mount: v.string(), readonly: v.optional(v.boolean()) }),
      ),
      [],
    ),
    image_config: v.optional(ImageConfigSchema),
  },
  SECTION_KEYS,
);

export type SandboxConfigInput = v.InferInput<typeof SandboxConfigSchema>;
export type SandboxConfig = v.InferOutput<typeof SandboxConfigSchema>;
export type ImageConfig = v.InferOutput<typeof ImageConfigSchema>;
/** A `vfs.interception` rule and the whole section as a client sends them (the SDK builds these). */
export type VfsRuleInput = v.InferInput<typeof VfsRuleSchema>;
export type VfsInterceptionInput = NonNullable<v.InferInput<typeof VfsSchema>["interception"]>;

/**
 * An issue in `network.interception` as compileHooks names it (`invalid network interception:
 * rule 2 ("strip-debug"): phase: …`), or undefined for an issue elsewhere. Shared by the config
 * parser and the RPC edge, so that CLI, RPC and SDK users read the same message.
 */
export function interceptionIssueMessage(issue: v.BaseIssue<unknown>): string | undefined {
  const path = issue.path ?? [];
  if (path[0]?.key !== "network" || path[1]?.key !== "interception" || path.length <= 2) return undefined;
  return interceptionIssueError(path[1].value, issue, 2).message;
}

/** Parses and defaults a config; a bad field gives one error naming its path. */
export function parseSandboxConfig(input: unknown): SandboxConfig {
  const result = v.safeParse(SandboxConfigSchema, input);
  if (result.success) return result.output;
  const issue = result.issues[0];
  const hooks = interceptionIssueMessage(issue);
  if (hooks !== undefined) throw new InvalidArgumentError(hooks);
  throw new InvalidArgumentError(`invalid sandbox config: ${describeIssue(issue, "config")}`);
}

/** Whether the sandbox serves host folders to the guest (a workspace, mounts, or file hooks). */
export function hostFoldersRequested(config: SandboxConfig): boolean {
  const i = config.vfs.interception;
  return (
    config.vfs.workspace !== undefined ||
    Object.keys(config.vfs.mounts).length > 0 ||
    (i !== undefined && i !== null && (i.emit_events || (i.rules ?? []).length > 0))
  );
}

function isEmptyValue(x: unknown): boolean {
  if (x === undefined || x === null || x === "") return true;
  if (Array.isArray(x)) return x.length === 0;
  return typeof x === "object" && Object.keys(x).length === 0;
}

/**
 * Features of the config that this build cannot honour yet. A config that asks for one is refused
 * with a message naming it: silently ignoring a field (say, an allowlist) would be a security bug.
 */
export function unsupportedFeatures(config: SandboxConfig): string[] {
  const out: string[] = [];
  if (!isEmptyValue(config.vfs.direct_mounts)) out.push("vfs.direct_mounts");
  if (config.network.policy_script) out.push("network.policy_script");
  if (config.privileged) out.push("privileged");
  return out;
}
