import { isAbsolute } from "node:path";
import * as v from "valibot";
import { canonicalHeaderKey as canonicalName, hasControlChar } from "../api/http-fields.ts";
import {
  DEFAULT_HOOK_TIMEOUT_MS,
  type HookCallbackReply,
  type HookCallbackRequest,
  type HookPhase,
  interceptionError,
  interceptionIssueError,
  type NetworkHookRuleWire,
  NetworkInterceptionSchema,
  ruleRef,
} from "../api/network-hooks.ts";
import { type Literal, rewriteWhole } from "./body-rewrite.ts";
import { type BodyPlan, ssePlan, WHOLE_BODY_MAX_BYTES, wholePlan } from "./hook-body.ts";
import { callHook, clip, HookCallbackError, type HookCallbackFailure } from "./hook-callback.ts";
import { hostPatternProblem, matchHost } from "./host-policy.ts";
import {
  canonicalPath,
  editQuery,
  encodePath,
  firstQueryValues,
  queryFromMap,
  splitTarget,
  targetOf,
} from "./http-target.ts";
import { globProblem, PathGlob } from "./path-glob.ts";
import { deleteHeader, firstHeader, headerMap, replaceHeaders, setHeader } from "./raw-headers.ts";

export type { BodyPlan } from "./hook-body.ts";

/**
 * Network hooks (issue #12, research §1.7): rules from `network.interception` that block or rewrite
 * requests and responses in intercept mode, and callbacks into the SDK program over
 * `callback_socket`. Matchlock's semantics, rule by rule in the order given:
 * - before phase: a matching `block` rule refuses the request (403); otherwise its static edits
 *   (set/delete headers, set/delete query, rewrite_path) apply, then its callback is called with the
 *   request as it stands and its reply applied (block, or headers/query/path replaced);
 * - after phase: `block` refuses the response (403); response headers set/deleted; body replacements
 *   collected; the callback may replace headers, add replacements or set the whole body.
 * Later rules match the request as earlier rules left it.
 *
 * Where the proxy calls this (ours): after the Host = SNI check and the allow-list, and BEFORE the
 * secret swap. So rules and callbacks see and edit placeholders, never real secret values, and an
 * edit cannot smuggle a placeholder past the leak check: the swap checks what the hooks produced.
 * `after` gets the request `before` returned (pre-swap), and response headers the proxy has already
 * scrubbed of echoed secrets; the proxy pipes the planned body through its scrubber last, so text a
 * rule inserts is scrubbed too. (Matchlock sends after-phase callbacks the swapped headers.)
 *
 * Failure (ours, where Matchlock fails open and skips the rule): a callback that fails, times out,
 * cannot be reached or answers nonsense FAILS CLOSED. In the before phase the request is refused
 * (502, `network hook "<rule>" failed: <why>`); in the after phase the response is replaced by a 502.
 * A hook may enforce policy (block a path, strip a credential); making the SDK process slow or
 * killing it must not switch that policy off. The refusal carries the failure for the event log.
 *
 * Also ours: invalid rules are refused at compile with one error naming the rule and the field
 * (Matchlock drops or ignores most mistakes); the path a glob matches is canonical (see
 * canonicalPath), so `/v1/./admin` cannot dodge `/v1/admin/*`; Host and the message framing
 * (Content-Length, Transfer-Encoding) belong to the proxy and no hook can change them.
 */

/** One request as hooks see it. The proxy builds it with `hookRequest` and sends `requestTarget`. */
export interface HookRequest {
  /** The checked host name (Host = SNI), no port. */
  host: string;
  method: string;
  /** The raw path as on the wire (percent-encoded), without the query. */
  path: string;
  /** The raw query without `?`; "" when there is none. */
  rawQuery: string;
  /** Node's flat [name, value, …] list. */
  rawHeaders: string[];
}

export interface HookResponse {
  status: number;
  /** Flat list, hop-by-hop headers already removed and secret echoes scrubbed. */
  rawHeaders: string[];
}

export interface HookFailure {
  /** The rule's label: its name, or `rule N` (1-based, in the list as given). */
  rule: string;
  phase: HookPhase;
  callbackId: string;
  kind: HookCallbackFailure;
  /** What went wrong, e.g. `no reply within 5000 ms`. */
  message: string;
}

/** The request or response must not go on; send `status` with `reason` and record the event. */
export interface HookRefusal {
  kind: "refused";
  /** 403 for a block (by a rule or a callback's answer), 502 when a hook failed. */
  status: 403 | 502;
  rule: string;
  reason: string;
  failure?: HookFailure;
}

export type BeforeResult = HookRefusal | { kind: "forward"; request: HookRequest };

export type AfterResult =
  | HookRefusal
  | {
      kind: "respond";
      /**
       * The response headers to send. When `body` is not `pass`, Content-Length and
       * Transfer-Encoding are gone: send the length applyBodyPlan gives (a `set` body's is here).
       */
      rawHeaders: string[];
      body: BodyPlan;
    };

export type CallbackInvoker = (
  socketPath: string,
  request: HookCallbackRequest,
  timeoutMs: number,
) => Promise<HookCallbackReply>;

export interface HooksOptions {
  /** How callbacks are called (tests); default callHook over the Unix socket. */
  invoke?: CallbackInvoker;
  /** The buffer limit of whole-body rewriting (default WHOLE_BODY_MAX_BYTES). */
  wholeBodyMaxBytes?: number;
}

/** Split a request target (origin or absolute form) into the parts hooks work on. */
export function hookRequest(
  host: string,
  method: string,
  url: string,
  rawHeaders: readonly string[],
): HookRequest {
  const { path, rawQuery } = splitTarget(url);
  return { host, method, path, rawQuery, rawHeaders: [...rawHeaders] };
}

/** The origin-form target to send upstream. */
export function requestTarget(req: HookRequest): string {
  return targetOf(req.path, req.rawQuery);
}

/** Headers the proxy owns: Host was checked against SNI and the allow-list; the rest is framing. */
const REQUEST_OWNED = new Set(["host", "content-length", "transfer-encoding"]);
const RESPONSE_OWNED = new Set(["content-length", "transfer-encoding"]);
/** Go's server keeps Host out of req.Header, so Matchlock's callbacks never see it. */
const NOT_SENT = new Set(["host"]);
/** sun_path holds 108 bytes with the NUL. */
const MAX_SOCKET_PATH = 107;

interface Rule {
  label: string;
  phase: HookPhase;
  block: boolean;
  callbackId: string | undefined;
  timeoutMs: number;
  hosts: string[];
  methods: Set<string> | undefined;
  glob: PathGlob | undefined;
  setHeaders: Array<[string, string]>;
  deleteHeaders: string[];
  setQuery: Array<[string, string]>;
  deleteQuery: string[];
  /** Encoded for the wire. */
  rewritePath: string | undefined;
  setResponseHeaders: Array<[string, string]>;
  deleteResponseHeaders: string[];
  replacements: Literal[];
}

function labelOf(index: number, name: string | undefined): string {
  return name ? name : `rule ${index + 1}`;
}

const BEFORE_ONLY = ["set_headers", "delete_headers", "set_query", "delete_query", "rewrite_path"] as const;
const AFTER_ONLY = ["set_response_headers", "delete_response_headers", "body_replacements"] as const;

function isSet(value: unknown): boolean {
  if (value === undefined || value === null || value === "") return false;
  if (Array.isArray(value)) return value.length > 0;
  if (typeof value === "object") return Object.keys(value).length > 0;
  return true;
}

/** The checks that need the whole rule or the net layer; throws naming the rule and field. */
function checkRule(r: NetworkHookRuleWire, index: number, socket: string | undefined): void {
  const bad = (field: string, message: string) =>
    interceptionError(`${ruleRef(index, r.name)}: ${field}`, message);
  (r.hosts ?? []).forEach((h, i) => {
    const problem = hostPatternProblem(h);
    if (problem !== undefined) throw bad(`hosts[${i}]`, problem);
  });
  if (r.path !== undefined && r.path !== "") {
    if (!r.path.startsWith("/")) throw bad("path", "the glob must start with / (it matches the URL path)");
    const problem = globProblem(r.path);
    if (problem !== undefined) throw bad("path", `bad glob: ${problem}`);
  }
  if (r.rewrite_path !== undefined && r.rewrite_path !== "") {
    if (!r.rewrite_path.startsWith("/")) throw bad("rewrite_path", "the path must start with /");
    if (hasControlChar(r.rewrite_path)) throw bad("rewrite_path", "the path contains a control character");
  }
  const headerFields = [
    ["set_headers", Object.keys(r.set_headers ?? {})],
    ["delete_headers", r.delete_headers ?? []],
    ["set_response_headers", Object.keys(r.set_response_headers ?? {})],
    ["delete_response_headers", r.delete_response_headers ?? []],
  ] as const;
  for (const [field, names] of headerFields) {
    const owned = names.find((n) => REQUEST_OWNED.has(n.toLowerCase()));
    if (owned !== undefined) {
      throw bad(
        field,
        `${owned} belongs to the proxy (Host is checked against the TLS name and the allow-list; Content-Length and Transfer-Encoding frame the message)`,
      );
    }
  }
  const wrong =
    r.phase === "before" ? AFTER_ONLY.find((f) => isSet(r[f])) : BEFORE_ONLY.find((f) => isSet(r[f]));
  if (wrong !== undefined) throw bad(wrong, `phase "${r.phase}" cannot ${wrong}`);
  if (r.callback_id) {
    if (r.action !== "allow") {
      throw bad(
        "action",
        `a callback rule cannot be ${r.action} (leave action out: the callback decides, and may answer block)`,
      );
    }
    if (socket === undefined || socket === "")
      throw bad("callback_id", "there is no callback_socket to call");
  }
}

function compileRule(r: NetworkHookRuleWire, index: number): Rule | undefined {
  const replacements = (r.body_replacements ?? []).map((b) => ({
    find: Buffer.from(b.find),
    replace: Buffer.from(b.replace),
  }));
  const canon = (names: readonly string[]) => [...new Set(names.map((n) => canonicalName(n)))];
  const rule: Rule = {
    label: labelOf(index, r.name),
    phase: r.phase,
    block: r.action === "block",
    callbackId: r.callback_id || undefined,
    timeoutMs: r.timeout_ms || DEFAULT_HOOK_TIMEOUT_MS,
    hosts: r.hosts ?? [],
    methods: r.methods && r.methods.length > 0 ? new Set(r.methods) : undefined,
    glob: r.path ? new PathGlob(r.path) : undefined,
    setHeaders: Object.entries(r.set_headers ?? {}).map(([k, val]) => [canonicalName(k), val]),
    deleteHeaders: canon(r.delete_headers ?? []),
    setQuery: Object.entries(r.set_query ?? {}),
    deleteQuery: [...new Set(r.delete_query ?? [])],
    rewritePath: r.rewrite_path ? encodePath(r.rewrite_path) : undefined,
    setResponseHeaders: Object.entries(r.set_response_headers ?? {}).map(([k, val]) => [
      canonicalName(k),
      val,
    ]),
    deleteResponseHeaders: canon(r.delete_response_headers ?? []),
    replacements,
  };
  const edits =
    rule.phase === "before"
      ? rule.setHeaders.length + rule.deleteHeaders.length + rule.setQuery.length + rule.deleteQuery.length >
          0 || rule.rewritePath !== undefined
      : rule.setResponseHeaders.length + rule.deleteResponseHeaders.length + rule.replacements.length > 0;
  // Matchlock keeps only rules that do something: allow with no edit and no callback is a no-op.
  if (!rule.block && !edits && rule.callbackId === undefined) return undefined;
  return rule;
}

/**
 * Validates `network.interception` and compiles its rules. `undefined`, `null` and `{}` give empty
 * hooks. Throws one InvalidArgumentError naming the rule and the field.
 */
export function compileHooks(interception: unknown, options: HooksOptions = {}): NetworkHooks {
  if (interception === undefined || interception === null) return new NetworkHooks([], undefined, options);
  const parsed = v.safeParse(NetworkInterceptionSchema, interception);
  if (!parsed.success) throw interceptionIssueError(interception, parsed.issues[0]);
  const socket = parsed.output.callback_socket || undefined;
  if (socket !== undefined) {
    if (!isAbsolute(socket)) throw interceptionError("callback_socket", "must be an absolute path");
    if (Buffer.byteLength(socket) > MAX_SOCKET_PATH) {
      throw interceptionError(
        "callback_socket",
        `longer than ${MAX_SOCKET_PATH} bytes (a Unix socket path cannot be)`,
      );
    }
  }
  const rules = parsed.output.rules ?? [];
  rules.forEach((r, i) => {
    checkRule(r, i, socket);
  });
  const compiled = rules.map((r, i) => compileRule(r, i)).filter((r): r is Rule => r !== undefined);
  return new NetworkHooks(compiled, socket, options);
}

function isSse(rawHeaders: readonly string[]): boolean {
  return (firstHeader(rawHeaders, "content-type") ?? "").trim().toLowerCase().startsWith("text/event-stream");
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

export class NetworkHooks {
  readonly #before: Rule[];
  readonly #after: Rule[];
  readonly #socket: string | undefined;
  readonly #invoke: CallbackInvoker;
  readonly #maxWhole: number;

  constructor(rules: readonly Rule[], socket: string | undefined, options: HooksOptions) {
    this.#before = rules.filter((r) => r.phase === "before");
    this.#after = rules.filter((r) => r.phase === "after");
    this.#socket = socket;
    this.#invoke = options.invoke ?? callHook;
    this.#maxWhole = options.wholeBodyMaxBytes ?? WHOLE_BODY_MAX_BYTES;
  }

  /** No rule survived compilation: the proxy can skip hooks entirely. */
  get isEmpty(): boolean {
    return this.#before.length === 0 && this.#after.length === 0;
  }

  /** Rules in effect (no-op rules dropped), for logs and tests. */
  get ruleCount(): number {
    return this.#before.length + this.#after.length;
  }

  /** Whether `after` could do anything for this (post-`before`) request. */
  hasAfterFor(req: HookRequest): boolean {
    return this.#matching(this.#after, req).length > 0;
  }

  /**
   * Whether an after rule may rewrite this request's response body (replacements, or a callback
   * that may return some). The proxy then asks upstream for `Accept-Encoding: identity`, as it does
   * for the secret scrub: replacements need the plain bytes, and a compressed body they would have
   * to change is refused (502) rather than passed on unredacted.
   */
  mayRewriteBody(req: HookRequest): boolean {
    return this.#matching(this.#after, req).some(
      (r) => r.replacements.length > 0 || r.callbackId !== undefined,
    );
  }

  #matching(rules: readonly Rule[], req: HookRequest): Rule[] {
    if (rules.length === 0) return [];
    const path = canonicalPath(req.path);
    return rules.filter((r) => matches(r, req, path));
  }

  async before(req: HookRequest): Promise<BeforeResult> {
    let cur: HookRequest = req;
    for (const rule of this.#before) {
      if (!matches(rule, cur, canonicalPath(cur.path))) continue;
      if (rule.block) return refused(403, rule, `blocked by network hook "${rule.label}"`);
      cur = applyStatic(cur, rule);
      if (rule.callbackId === undefined) continue;
      const reply = await this.#call(rule, callbackRequest(rule.callbackId, "before", cur));
      if ("kind" in reply) return reply;
      const next = applyRequestReply(cur, rule, reply);
      if (next.kind === "refused") return next;
      cur = next.request;
    }
    return { kind: "forward", request: cur };
  }

  async after(req: HookRequest, res: HookResponse): Promise<AfterResult> {
    let headers = res.rawHeaders;
    const literals: Literal[] = [];
    let setBody: { body: Buffer; rule: Rule } | undefined;
    let bodyRule: Rule | undefined;
    for (const rule of this.#matching(this.#after, req)) {
      if (rule.block) return refused(403, rule, `blocked by network hook "${rule.label}"`);
      for (const [name, value] of rule.setResponseHeaders) headers = setHeader(headers, name, value);
      for (const name of rule.deleteResponseHeaders) headers = deleteHeader(headers, name);
      literals.push(...rule.replacements);
      if (rule.replacements.length > 0) bodyRule ??= rule;
      if (rule.callbackId === undefined) continue;
      const reply = await this.#call(
        rule,
        callbackRequest(rule.callbackId, "after", req, res.status, headers),
      );
      if ("kind" in reply) return reply;
      if (reply.action === "block") {
        return refused(403, rule, `blocked by network hook "${rule.label}" (its callback answered block)`);
      }
      const m = reply.response;
      if (!m) continue;
      if (m.headers) headers = replaceHeaders(headers, m.headers, RESPONSE_OWNED);
      if (m.set_body_base64) {
        const b64 = m.set_body_base64;
        if (b64.length % 4 !== 0 || !BASE64.test(b64)) {
          return failed(rule, "after", "protocol", "bad reply: response.set_body_base64 is not base64");
        }
        setBody = { body: Buffer.from(b64, "base64"), rule };
      }
      const more = (m.body_replacements ?? []).filter((b) => b.find !== "");
      literals.push(...more.map((b) => ({ find: Buffer.from(b.find), replace: Buffer.from(b.replace) })));
      if (more.length > 0) bodyRule ??= rule;
    }
    const noBody =
      req.method.toUpperCase() === "HEAD" || res.status === 204 || res.status === 304 || res.status < 200;
    if (noBody || (setBody === undefined && literals.length === 0)) {
      return { kind: "respond", rawHeaders: headers, body: { kind: "pass" } };
    }
    const framed = deleteHeader(deleteHeader(headers, "content-length"), "transfer-encoding");
    if (setBody !== undefined) {
      const body = rewriteWhole(setBody.body, literals, this.#maxWhole);
      if (body === undefined) {
        return failed(
          setBody.rule,
          "after",
          "protocol",
          `the rewritten body is longer than ${this.#maxWhole} bytes`,
        );
      }
      return {
        kind: "respond",
        rawHeaders: setHeader(framed, "Content-Length", String(body.length)),
        body: { kind: "set", body },
      };
    }
    const encoding = (firstHeader(headers, "content-encoding") ?? "").trim().toLowerCase();
    if (encoding !== "" && encoding !== "identity") {
      const rule = bodyRule as Rule;
      return refused(
        502,
        rule,
        `network hook "${rule.label}" cannot apply body_replacements to a ${clip(encoding, 40)}-encoded body`,
      );
    }
    const body = isSse(headers) ? ssePlan(literals) : wholePlan(literals, this.#maxWhole);
    return { kind: "respond", rawHeaders: framed, body };
  }

  /** The reply, or the refusal a failed call turns into (fail closed). */
  async #call(rule: Rule, request: HookCallbackRequest): Promise<HookCallbackReply | HookRefusal> {
    try {
      return await this.#invoke(this.#socket as string, request, rule.timeoutMs);
    } catch (e) {
      const kind = e instanceof HookCallbackError ? e.kind : "protocol";
      return failed(rule, request.phase, kind, e instanceof Error ? e.message : String(e));
    }
  }
}

function matches(rule: Rule, req: HookRequest, path: string): boolean {
  if (rule.hosts.length > 0 && !rule.hosts.some((p) => matchHost(p, req.host))) return false;
  if (rule.methods !== undefined && !rule.methods.has(req.method.trim().toUpperCase())) return false;
  if (rule.glob !== undefined && !rule.glob.matches(path)) return false;
  return true;
}

function refused(status: 403 | 502, rule: Rule, reason: string): HookRefusal {
  return { kind: "refused", status, rule: rule.label, reason };
}

function failed(rule: Rule, phase: HookPhase, kind: HookCallbackFailure, message: string): HookRefusal {
  return {
    kind: "refused",
    status: 502,
    rule: rule.label,
    reason: `network hook "${rule.label}" failed: ${message}`,
    failure: { rule: rule.label, phase, callbackId: rule.callbackId ?? "", kind, message },
  };
}

/** Matchlock's order: set headers, delete headers, set query, delete query, rewrite the path. */
function applyStatic(req: HookRequest, rule: Rule): HookRequest {
  let rawHeaders = req.rawHeaders;
  for (const [name, value] of rule.setHeaders) rawHeaders = setHeader(rawHeaders, name, value);
  for (const name of rule.deleteHeaders) rawHeaders = deleteHeader(rawHeaders, name);
  const rawQuery =
    rule.setQuery.length + rule.deleteQuery.length > 0
      ? editQuery(req.rawQuery, rule.setQuery, rule.deleteQuery)
      : req.rawQuery;
  return { ...req, rawHeaders, rawQuery, path: rule.rewritePath ?? req.path };
}

function applyRequestReply(
  req: HookRequest,
  rule: Rule,
  reply: HookCallbackReply,
): HookRefusal | { kind: "forward"; request: HookRequest } {
  if (reply.action === "block") {
    return refused(403, rule, `blocked by network hook "${rule.label}" (its callback answered block)`);
  }
  const m = reply.request;
  if (!m) return { kind: "forward", request: req };
  if (m.path && !m.path.startsWith("/")) {
    return failed(rule, "before", "protocol", "bad reply: request.path must start with /");
  }
  return {
    kind: "forward",
    request: {
      ...req,
      rawHeaders: m.headers ? replaceHeaders(req.rawHeaders, m.headers, REQUEST_OWNED) : req.rawHeaders,
      rawQuery: m.query ? queryFromMap(m.query) : req.rawQuery,
      path: m.path ? encodePath(m.path) : req.path,
    },
  };
}

/** The JSON line a callback gets, with Go's `omitempty` so that Matchlock's SDKs read it as theirs. */
function callbackRequest(
  id: string,
  phase: HookPhase,
  req: HookRequest,
  status?: number,
  responseHeaders?: readonly string[],
): HookCallbackRequest {
  const out: HookCallbackRequest = { callback_id: id, phase };
  if (req.host !== "") out.host = req.host;
  if (req.method !== "") out.method = req.method;
  out.path = canonicalPath(req.path);
  const query = firstQueryValues(req.rawQuery);
  if (Object.keys(query).length > 0) out.query = query;
  const headers = headerMap(req.rawHeaders, NOT_SENT);
  if (Object.keys(headers).length > 0) out.request_headers = headers;
  if (status) out.status_code = status;
  if (responseHeaders !== undefined) {
    const map = headerMap(responseHeaders);
    if (Object.keys(map).length > 0) out.response_headers = map;
    if (isSse(responseHeaders)) out.is_sse = true;
  }
  return out;
}
