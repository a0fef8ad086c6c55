import { chmod, mkdtemp, rm } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InvalidArgumentError } from "../api/errors.ts";
import {
  type HookCallbackReplyInput,
  MAX_CALLBACK_LINE_BYTES,
  type NetworkHookRuleInput,
  type NetworkInterceptionInput,
} from "../api/network-hooks.ts";
import { LineSplitter } from "../rpc/lines.ts";

/**
 * Network hooks in an SDK program, as Matchlock's TypeScript SDK has them: rules in camelCase, a
 * rule with `hook` is a callback the program runs itself. `compileNetworkInterception` gives the
 * wire config (snake_case, callback ids `network_hook_<index+1>`) and the callbacks;
 * `NetworkHookServer` serves them on a Unix socket the VM's proxy dials once per call (one JSON
 * line in, one out). The client starts the server when there are callbacks and puts its path in the
 * config as `callback_socket`.
 *
 * A callback sees what the proxy sees before the secret swap: placeholders, never secret values.
 */

export type NetworkHookPhase = "before" | "after";
export type NetworkHookAction = "allow" | "block" | "mutate";

export interface NetworkBodyTransform {
  find: string;
  replace?: string;
}

export interface NetworkHookRequest {
  phase: NetworkHookPhase;
  host: string;
  method: string;
  /** Percent-decoded, `.`/`..` resolved: the path rules match. */
  path: string;
  /** First value of each query key. */
  query: Record<string, string>;
  /** Canonical names (`X-Team`), Host left out (as Go's server does). */
  requestHeaders: Record<string, string[]>;
  /** After phase only; 0 before. */
  statusCode: number;
  responseHeaders: Record<string, string[]>;
  isSSE: boolean;
}

export interface NetworkHookResult {
  action?: NetworkHookAction;
  /** Before phase: each field given replaces the whole header set, the whole query, the path. */
  request?: {
    headers?: Record<string, string[]>;
    query?: Record<string, string>;
    path?: string;
  };
  /** After phase. */
  response?: {
    headers?: Record<string, string[]>;
    bodyReplacements?: NetworkBodyTransform[];
    setBody?: string | Buffer | Uint8Array | null;
  };
}

export type NetworkHookFunc = (
  request: NetworkHookRequest,
) => NetworkHookResult | null | undefined | Promise<NetworkHookResult | null | undefined>;

export interface NetworkHookRule {
  name?: string;
  phase?: NetworkHookPhase;
  hosts?: string[];
  methods?: string[];
  path?: string;
  action?: NetworkHookAction;
  setHeaders?: Record<string, string>;
  deleteHeaders?: string[];
  setQuery?: Record<string, string>;
  deleteQuery?: string[];
  rewritePath?: string;
  setResponseHeaders?: Record<string, string>;
  deleteResponseHeaders?: string[];
  bodyReplacements?: NetworkBodyTransform[];
  /** For a callback: how long it may take (the proxy waits as long); default 5000 ms. */
  timeoutMs?: number;
  hook?: NetworkHookFunc;
}

export interface CompiledNetworkHook {
  id: string;
  name: string;
  /** "" when the rule did not say (the proxy's default, before). */
  phase: string;
  /** 0: no limit here (the proxy's own deadline still applies). */
  timeoutMs: number;
  hook: NetworkHookFunc;
}

type WireRule = NetworkHookRuleInput;

function nonEmpty<T>(x: T[] | undefined): T[] | undefined {
  return x && x.length > 0 ? [...x] : undefined;
}

function nonEmptyMap<T>(x: Record<string, T> | undefined): Record<string, T> | undefined {
  return x && Object.keys(x).length > 0 ? { ...x } : undefined;
}

/** Matchlock's wire builder: empty fields left out. */
function toWire(rule: NetworkHookRule): WireRule {
  const out: WireRule = {};
  if (rule.name) out.name = rule.name;
  if (rule.phase) out.phase = rule.phase;
  if (nonEmpty(rule.hosts)) out.hosts = [...(rule.hosts ?? [])];
  if (nonEmpty(rule.methods)) out.methods = [...(rule.methods ?? [])];
  if (rule.path) out.path = rule.path;
  if (rule.action) out.action = rule.action;
  const setHeaders = nonEmptyMap(rule.setHeaders);
  if (setHeaders) out.set_headers = setHeaders;
  const deleteHeaders = nonEmpty(rule.deleteHeaders);
  if (deleteHeaders) out.delete_headers = deleteHeaders;
  const setQuery = nonEmptyMap(rule.setQuery);
  if (setQuery) out.set_query = setQuery;
  const deleteQuery = nonEmpty(rule.deleteQuery);
  if (deleteQuery) out.delete_query = deleteQuery;
  if (rule.rewritePath) out.rewrite_path = rule.rewritePath;
  const setResponseHeaders = nonEmptyMap(rule.setResponseHeaders);
  if (setResponseHeaders) out.set_response_headers = setResponseHeaders;
  const deleteResponseHeaders = nonEmpty(rule.deleteResponseHeaders);
  if (deleteResponseHeaders) out.delete_response_headers = deleteResponseHeaders;
  const bodyReplacements = nonEmpty(rule.bodyReplacements);
  if (bodyReplacements)
    out.body_replacements = bodyReplacements.map((b) => ({ find: b.find, replace: b.replace ?? "" }));
  if (rule.timeoutMs !== undefined && rule.timeoutMs > 0) out.timeout_ms = rule.timeoutMs;
  return out;
}

const RULE_KEYS: ReadonlySet<string> = new Set<keyof NetworkHookRule>([
  "name",
  "phase",
  "hosts",
  "methods",
  "path",
  "action",
  "setHeaders",
  "deleteHeaders",
  "setQuery",
  "deleteQuery",
  "rewritePath",
  "setResponseHeaders",
  "deleteResponseHeaders",
  "bodyReplacements",
  "timeoutMs",
  "hook",
]);

/** camelCase from snake_case: `set_headers` → `setHeaders`. */
function camel(key: string): string {
  return key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
}

/** A key the builder does not know would be dropped silently (say, a wire-style `set_headers`). */
function checkRuleKeys(rule: NetworkHookRule, index: number): void {
  if (rule === null || typeof rule !== "object") {
    throw new InvalidArgumentError(`network hook rule ${index + 1} is not an object`);
  }
  for (const key of Object.keys(rule)) {
    if (RULE_KEYS.has(key)) continue;
    const hint = RULE_KEYS.has(camel(key)) ? ` (did you mean ${camel(key)}?)` : "";
    throw new InvalidArgumentError(`network hook rule ${index + 1}: unknown key ${key}${hint}`);
  }
}

/**
 * Rules → the `network.interception` wire object (without `callback_socket`, which the server's
 * path fills in) and the callbacks by id. A callback rule may not set an action other than allow
 * (Matchlock's rule: the callback decides).
 */
export function compileNetworkInterception(rules: readonly NetworkHookRule[]): {
  wire: NetworkInterceptionInput;
  callbacks: Map<string, CompiledNetworkHook>;
} {
  const callbacks = new Map<string, CompiledNetworkHook>();
  const wireRules = rules.map((rule, index) => {
    checkRuleKeys(rule, index);
    const out = toWire(rule);
    if (rule.hook === undefined) return out;
    if (typeof rule.hook !== "function") {
      throw new InvalidArgumentError(
        `network hook ${JSON.stringify(rule.name ?? "")}: hook must be a function`,
      );
    }
    const action = String(rule.action ?? "")
      .trim()
      .toLowerCase();
    if (action !== "" && action !== "allow") {
      throw new InvalidArgumentError(
        `network hook ${JSON.stringify(rule.name ?? "")}: a callback hook cannot set action=${JSON.stringify(rule.action)}`,
      );
    }
    const id = `network_hook_${index + 1}`;
    out.callback_id = id;
    callbacks.set(id, {
      id,
      name: rule.name ?? "",
      phase: String(rule.phase ?? "")
        .trim()
        .toLowerCase(),
      timeoutMs: rule.timeoutMs !== undefined && rule.timeoutMs > 0 ? rule.timeoutMs : 0,
      hook: rule.hook,
    });
    return out;
  });
  return { wire: wireRules.length > 0 ? { rules: wireRules } : {}, callbacks };
}

function asString(x: unknown): string {
  return typeof x === "string" ? x : "";
}

function stringMap(x: unknown): Record<string, string> {
  if (x === null || typeof x !== "object" || Array.isArray(x)) return {};
  return Object.fromEntries(Object.entries(x).map(([k, val]) => [k, String(val ?? "")]));
}

function valuesMap(x: unknown): Record<string, string[]> {
  if (x === null || typeof x !== "object" || Array.isArray(x)) return {};
  return Object.fromEntries(
    Object.entries(x).map(([k, val]) => [
      k,
      Array.isArray(val) ? val.map((e) => String(e ?? "")) : [String(val ?? "")],
    ]),
  );
}

/** The request line, read leniently (Go's omitempty leaves out empty fields). */
function toRequest(payload: Record<string, unknown>, phase: string): NetworkHookRequest {
  return {
    phase: phase as NetworkHookPhase,
    host: asString(payload.host),
    method: asString(payload.method),
    path: asString(payload.path),
    query: stringMap(payload.query),
    requestHeaders: valuesMap(payload.request_headers),
    statusCode: typeof payload.status_code === "number" ? payload.status_code : 0,
    responseHeaders: valuesMap(payload.response_headers),
    isSSE: payload.is_sse === true,
  };
}

function toBuffer(b: string | Buffer | Uint8Array): Buffer {
  if (typeof b === "string") return Buffer.from(b, "utf8");
  return Buffer.isBuffer(b) ? b : Buffer.from(b);
}

/** The result in wire form; empty parts left out, as Matchlock's SDK does. */
export function resultToWire(result: NetworkHookResult | null | undefined): HookCallbackReplyInput {
  const out: HookCallbackReplyInput = {};
  if (!result) return out;
  if (result.action) out.action = result.action;
  const rq = result.request;
  if (rq) {
    const req: NonNullable<HookCallbackReplyInput["request"]> = {};
    if (rq.headers !== undefined) req.headers = rq.headers;
    if (rq.query !== undefined) req.query = rq.query;
    if (rq.path) req.path = rq.path;
    if (Object.keys(req).length > 0) out.request = req;
  }
  const rs = result.response;
  if (rs) {
    const res: NonNullable<HookCallbackReplyInput["response"]> = {};
    if (rs.headers !== undefined) res.headers = rs.headers;
    if (rs.bodyReplacements && rs.bodyReplacements.length > 0) {
      res.body_replacements = rs.bodyReplacements.map((b) => ({ find: b.find, replace: b.replace ?? "" }));
    }
    if (rs.setBody !== undefined && rs.setBody !== null)
      res.set_body_base64 = toBuffer(rs.setBody).toString("base64");
    if (Object.keys(res).length > 0) out.response = res;
  }
  return out;
}

/** How long the proxy may take to send its one line; it writes it at once. */
const READ_TIMEOUT_MS = 10_000;

function runWithTimeout(
  hook: CompiledNetworkHook,
  req: NetworkHookRequest,
): Promise<NetworkHookResult | null | undefined> {
  const run = Promise.resolve().then(() => hook.hook(req));
  if (hook.timeoutMs <= 0) return run;
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`network hook callback timed out after ${hook.timeoutMs} ms`)),
      hook.timeoutMs,
    );
  });
  return Promise.race([run, late]).finally(() => clearTimeout(timer));
}

/** The callbacks of one sandbox, served on `<tmpdir>/matchlock-network-hook-XXXXXX/hook.sock` (0600). */
export class NetworkHookServer {
  readonly socketPath: string;
  readonly #server: Server;
  readonly #dir: string;
  readonly #callbacks: ReadonlyMap<string, CompiledNetworkHook>;
  readonly #sockets = new Set<Socket>();
  #closed: Promise<void> | undefined;

  private constructor(
    server: Server,
    dir: string,
    socketPath: string,
    callbacks: ReadonlyMap<string, CompiledNetworkHook>,
  ) {
    this.#server = server;
    this.#dir = dir;
    this.socketPath = socketPath;
    this.#callbacks = callbacks;
  }

  static async start(callbacks: ReadonlyMap<string, CompiledNetworkHook>): Promise<NetworkHookServer> {
    // mkdtemp makes the directory 0700: nobody else can reach the socket even before the chmod.
    const dir = await mkdtemp(join(tmpdir(), "matchlock-network-hook-"));
    const socketPath = join(dir, "hook.sock");
    const server = createServer();
    try {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(socketPath, () => {
          server.off("error", reject);
          resolve();
        });
      });
      await chmod(socketPath, 0o600);
    } catch (e) {
      server.close();
      await rm(dir, { recursive: true, force: true });
      throw e;
    }
    const self = new NetworkHookServer(server, dir, socketPath, new Map(callbacks));
    server.on("connection", (s: Socket) => self.#serve(s));
    server.on("error", () => {}); // accept errors must not take the program down
    return self;
  }

  /** Stops listening, drops connections in flight (their calls fail closed) and removes the directory. */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      await new Promise<void>((resolve) => {
        this.#server.close(() => resolve());
        for (const s of this.#sockets) s.destroy();
      });
      await rm(this.#dir, { recursive: true, force: true });
    })();
    return this.#closed;
  }

  #serve(sock: Socket): void {
    this.#sockets.add(sock);
    sock.once("close", () => this.#sockets.delete(sock));
    sock.on("error", () => {});
    sock.setTimeout(READ_TIMEOUT_MS, () => sock.destroy());
    const lines = new LineSplitter(MAX_CALLBACK_LINE_BYTES);
    let done = false;
    const take = (events: ReturnType<LineSplitter["push"]>) => {
      const ev = events[0];
      if (done || ev === undefined) return;
      done = true;
      sock.off("data", onData);
      sock.setTimeout(0);
      if (ev.kind === "too_long") {
        reply(sock, { error: `the request line is longer than ${MAX_CALLBACK_LINE_BYTES} bytes` });
        return;
      }
      this.#answer(sock, ev.line.toString("utf8")).catch((e: unknown) =>
        reply(sock, { error: e instanceof Error ? e.message : String(e) }),
      );
    };
    const onData = (chunk: Buffer) => take(lines.push(chunk));
    sock.on("data", onData);
    sock.once("end", () => take(lines.end()));
  }

  async #answer(sock: Socket, line: string): Promise<void> {
    let payload: unknown;
    try {
      payload = JSON.parse(line);
    } catch (e) {
      reply(sock, { error: `the request is not JSON: ${(e as Error).message}` });
      return;
    }
    if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
      reply(sock, { error: "the request is not a JSON object" });
      return;
    }
    const p = payload as Record<string, unknown>;
    const hook = this.#callbacks.get(asString(p.callback_id).trim());
    if (hook === undefined) {
      reply(sock, { error: `network hook callback ${JSON.stringify(asString(p.callback_id))} not found` });
      return;
    }
    const phase = asString(p.phase).trim().toLowerCase();
    if (hook.phase !== "" && hook.phase !== phase) {
      reply(sock, { error: `network hook phase mismatch: the rule is ${hook.phase}, the call is ${phase}` });
      return;
    }
    const result = await runWithTimeout(hook, toRequest(p, phase));
    reply(sock, resultToWire(result));
  }
}

function reply(sock: Socket, body: HookCallbackReplyInput): void {
  if (sock.destroyed) return;
  let json = JSON.stringify(body);
  if (Buffer.byteLength(json) > MAX_CALLBACK_LINE_BYTES) {
    // Said here, so the proxy reports why rather than "reply too long".
    json = JSON.stringify({
      error: `the hook's reply is ${Buffer.byteLength(json)} bytes, more than the ${MAX_CALLBACK_LINE_BYTES} the proxy accepts (setBody is sent base64)`,
    });
  }
  sock.end(`${json}\n`);
}
