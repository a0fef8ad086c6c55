/**
 * Sandbox events: one definition for the RPC `event` notification, the per-VM decision log
 * (`events.jsonl` in the VM dir) and `matchlock events`. The shape is Matchlock's
 * (`{type, timestamp (unix seconds), network{…}}`); `protocol` and `port` are ours and extra keys
 * are ignored by Matchlock's SDKs. An event never carries a secret value or a query string.
 */

export type NetworkProtocol = "http" | "https" | "dns" | "tcp";

export interface NetworkEventBody {
  /** HTTP method; "" for DNS, TCP and blocked TLS handshakes. */
  method: string;
  /** `scheme://host/path` without the query; "" where there is no request. */
  url: string;
  /** The name asked for (SNI, Host, DNS question) or the address for plain TCP. */
  host: string;
  status_code: number;
  request_bytes: number;
  response_bytes: number;
  duration_ms: number;
  blocked: boolean;
  /** Why it was blocked, in words a user can act on. */
  block_reason?: string;
  /** Ours: which path made the decision. */
  protocol: NetworkProtocol;
  /** Ours: the destination port (TCP and TLS). */
  port?: number;
}

export interface NetworkEvent {
  type: "network";
  timestamp: number;
  network: NetworkEventBody;
}

export type SandboxEvent = NetworkEvent;

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
  const n = e.network;
  const time = new Date(e.timestamp * 1000).toISOString().slice(11, 19);
  const target = n.url !== "" ? `${n.method} ${n.url}`.trim() : n.port ? `${n.host}:${n.port}` : n.host;
  if (n.blocked) return `${time} BLOCKED ${n.protocol} ${target} — ${n.block_reason ?? "blocked"}`;
  const status = n.status_code ? ` ${n.status_code}` : "";
  const size = n.response_bytes ? ` ${n.response_bytes}B` : "";
  return `${time} allowed ${n.protocol} ${target}${status}${size} ${n.duration_ms}ms`;
}
