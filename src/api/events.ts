import * as v from "valibot";

/**
 * Sandbox events: one definition for the RPC `event` notification, the per-VM decision log
 * (`events.jsonl` in the VM dir) and `matchlock events`. The shape is Matchlock's
 * (`{type, timestamp (unix seconds), network{…}}`); `protocol` and `port` are ours and extra keys
 * are ignored by Matchlock's SDKs. An event never carries a secret value or a query string.
 */

export const NetworkProtocolSchema = v.picklist(["http", "https", "dns", "tcp"]);
export type NetworkProtocol = v.InferOutput<typeof NetworkProtocolSchema>;

export const NetworkEventBodySchema = v.object({
  /** HTTP method; "" for DNS, TCP and blocked TLS handshakes. */
  method: v.string(),
  /** `scheme://host/path` without the query; "" where there is no request. */
  url: v.string(),
  /** The name asked for (SNI, Host, DNS question) or the address for plain TCP. */
  host: v.string(),
  status_code: v.number(),
  request_bytes: v.number(),
  response_bytes: v.number(),
  duration_ms: v.number(),
  blocked: v.boolean(),
  /** Why it was blocked, in words a user can act on. */
  block_reason: v.optional(v.string()),
  /** Ours: which path made the decision. */
  protocol: NetworkProtocolSchema,
  /** Ours: the destination port (TCP and TLS). */
  port: v.optional(v.number()),
});
export type NetworkEventBody = v.InferOutput<typeof NetworkEventBodySchema>;

export const NetworkEventSchema = v.object({
  type: v.literal("network"),
  /** Unix seconds. */
  timestamp: v.number(),
  network: NetworkEventBodySchema,
});
export type NetworkEvent = v.InferOutput<typeof NetworkEventSchema>;

/** A file operation in the host folders (`vfs.interception` with `emit_events` or an after rule). */
export const FileEventSchema = v.object({
  type: v.literal("file"),
  timestamp: v.number(),
  file: v.object({
    op: v.string(),
    /** The guest path. */
    path: v.string(),
    /** Bytes read or written, else the file's size after the op (0 when unknown). */
    size: v.number(),
    mode: v.number(),
    uid: v.number(),
    gid: v.number(),
  }),
});
export type FileEvent = v.InferOutput<typeof FileEventSchema>;

/** Every event a sandbox emits (the RPC `event` notification's params). */
export const SandboxEventSchema = v.variant("type", [NetworkEventSchema, FileEventSchema]);
export type SandboxEvent = v.InferOutput<typeof SandboxEventSchema>;

export function fileEvent(file: FileEvent["file"]): FileEvent {
  return { type: "file", timestamp: Math.floor(Date.now() / 1000), file };
}

export function networkEvent(
  body: Omit<NetworkEventBody, "status_code" | "request_bytes" | "response_bytes" | "duration_ms"> &
    Partial<NetworkEventBody>,
): NetworkEvent {
  return {
    type: "network",
    timestamp: Math.floor(Date.now() / 1000),
    network: { status_code: 0, request_bytes: 0, response_bytes: 0, duration_ms: 0, ...body },
  };
}

/** One line for people: `12:00:01 BLOCKED https api.evil.test:443 — not in the allow-list`. */
export function describeEvent(e: SandboxEvent): string {
  const time = new Date(e.timestamp * 1000).toISOString().slice(11, 19);
  if (e.type === "file") return `${time} file ${e.file.op} ${e.file.path} ${e.file.size}B`;
  const n = e.network;
  const target = n.url !== "" ? `${n.method} ${n.url}`.trim() : n.port ? `${n.host}:${n.port}` : n.host;
  if (n.blocked) return `${time} BLOCKED ${n.protocol} ${target} — ${n.block_reason ?? "blocked"}`;
  const status = n.status_code ? ` ${n.status_code}` : "";
  const size = n.response_bytes ? ` ${n.response_bytes}B` : "";
  return `${time} allowed ${n.protocol} ${target}${status}${size} ${n.duration_ms}ms`;
}
