import * as v from "valibot";
import { InvalidArgumentError } from "./errors.ts";
import { hasControlChar, headerValueProblem, isToken } from "./http-fields.ts";
import { isUnknownKeyIssue, strictObject } from "./schema.ts";

/**
 * The one definition of network hooks on the wire (research §1.7): `network.interception` in a
 * create config, and the callback protocol the proxy speaks to an SDK program over
 * `callback_socket` (one JSON line each way, one connection per call). Field names are Matchlock's.
 *
 * The schemas check shape and grammar (types, picklists, header names and values, limits). What
 * needs the rest of the rule (phase against fields, a callback without a socket) or the net layer
 * (host patterns, path globs) is checked by `compileHooks` (src/net/hooks.ts), which turns any
 * problem into one error naming the rule and the field.
 */

/** A callback that does not answer within this many ms (and no `timeout_ms`) fails its rule. */
export const DEFAULT_HOOK_TIMEOUT_MS = 5_000;
export const MAX_HOOK_TIMEOUT_MS = 60_000;
/** Either JSON line of the callback protocol; a longer one is a protocol error. */
export const MAX_CALLBACK_LINE_BYTES = 1024 * 1024;
export const MAX_RULES = 1024;
/** Per rule and per callback reply: each is a stage the body streams through. */
export const MAX_BODY_REPLACEMENTS = 256;
/** `find` and `replace` each; a `find` is held back while a match may still complete. */
export const MAX_LITERAL_BYTES = 64 * 1024;
const MAX_LIST = 256;
const MAX_NAME = 200;

const bytes = (s: string) => Buffer.byteLength(s);

const headerName = v.pipe(
  v.string(),
  v.check(isToken, "not a valid header name (an RFC 9110 token: letters, digits and !#$%&'*+-.^_`|~)"),
);
const headerValue = v.pipe(
  v.string(),
  v.check(
    (s) => headerValueProblem(s) === undefined,
    (issue) => headerValueProblem(String(issue.input)) ?? "invalid header value",
  ),
);
/** A printable label: it lands in events, errors and `matchlock events` lines. */
const label = (what: string) =>
  v.pipe(
    v.string(),
    v.maxLength(MAX_NAME, `${what} is longer than ${MAX_NAME} characters`),
    v.check((s) => !hasControlChar(s), `${what} contains a control character`),
  );
const list = <T extends v.GenericSchema>(item: T, what: string) =>
  v.nullish(v.pipe(v.array(item), v.maxLength(MAX_LIST, `more than ${MAX_LIST} ${what}`)));
const headerMap = v.nullish(v.record(headerName, headerValue));
const literal = (what: string) =>
  v.pipe(
    v.string(),
    v.check((s) => bytes(s) <= MAX_LITERAL_BYTES, `${what} is longer than ${MAX_LITERAL_BYTES} bytes`),
  );

/** `find: ""` would match between every two bytes: refused, where Matchlock drops it silently. */
export const BodyReplacementSchema = strictObject({
  find: v.pipe(literal("find"), v.minLength(1, "empty (it would match everywhere)")),
  replace: v.optional(literal("replace"), ""),
});

const bodyReplacements = v.nullish(
  v.pipe(
    v.array(BodyReplacementSchema),
    v.maxLength(MAX_BODY_REPLACEMENTS, `more than ${MAX_BODY_REPLACEMENTS} body replacements`),
  ),
);

/** Matchlock lower-cases and trims; "" means the default. Anything else is a typo, refused. */
const keyword = <const T extends readonly [string, ...string[]]>(options: T, message: string) =>
  v.pipe(
    v.string(),
    v.trim(),
    v.toLowerCase(),
    v.check((s) => s === "" || (options as readonly string[]).includes(s), message),
    v.transform((s) => (s === "" ? options[0] : s) as T[number]),
  );

const phase = keyword(["before", "after"] as const, "must be before or after");
const action = keyword(["allow", "block", "mutate"] as const, "must be allow, block or mutate");

export const NetworkHookRuleSchema = strictObject({
  name: v.optional(label("name")),
  phase: v.optional(phase, "before"),
  /** Host globs (matchHost); empty or absent: every host. */
  hosts: list(v.string(), "hosts"),
  /** Upper-cased; empty or absent: every method. */
  methods: list(
    v.pipe(v.string(), v.trim(), v.toUpperCase(), v.check(isToken, "not an HTTP method")),
    "methods",
  ),
  /** Go path.Match glob on the request's path; absent: every path. */
  path: v.optional(v.pipe(v.string(), v.trim())),
  action: v.optional(action, "allow"),
  callback_id: v.optional(v.pipe(label("callback_id"), v.trim())),
  /** 0 or absent: DEFAULT_HOOK_TIMEOUT_MS (Go's zero value means "not set"). */
  timeout_ms: v.nullish(
    v.pipe(
      v.number(),
      v.integer("must be a whole number of milliseconds"),
      v.minValue(0, `must be between 1 and ${MAX_HOOK_TIMEOUT_MS} (0 or absent: ${DEFAULT_HOOK_TIMEOUT_MS})`),
      v.maxValue(
        MAX_HOOK_TIMEOUT_MS,
        `must be between 1 and ${MAX_HOOK_TIMEOUT_MS} (0 or absent: ${DEFAULT_HOOK_TIMEOUT_MS})`,
      ),
    ),
  ),
  set_headers: headerMap,
  delete_headers: list(headerName, "header names"),
  set_query: v.nullish(v.record(v.pipe(v.string(), v.minLength(1, "empty query key")), v.string())),
  delete_query: list(v.pipe(v.string(), v.minLength(1, "empty query key")), "query keys"),
  rewrite_path: v.optional(v.pipe(v.string(), v.trim())),
  set_response_headers: headerMap,
  delete_response_headers: list(headerName, "header names"),
  body_replacements: bodyReplacements,
});

export const NetworkInterceptionSchema = strictObject({
  rules: v.nullish(
    v.pipe(v.array(NetworkHookRuleSchema), v.maxLength(MAX_RULES, `more than ${MAX_RULES} rules`)),
  ),
  /** The SDK program's Unix socket for rules with a `callback_id`. */
  callback_socket: v.optional(v.pipe(v.string(), v.trim())),
});

export type NetworkInterceptionInput = v.InferInput<typeof NetworkInterceptionSchema>;
export type NetworkInterception = v.InferOutput<typeof NetworkInterceptionSchema>;
export type NetworkHookRuleInput = v.InferInput<typeof NetworkHookRuleSchema>;
export type NetworkHookRuleWire = v.InferOutput<typeof NetworkHookRuleSchema>;
export type BodyReplacement = v.InferOutput<typeof BodyReplacementSchema>;
export type HookPhase = "before" | "after";
export type HookAction = "allow" | "block" | "mutate";

/**
 * The line the proxy writes to the callback socket. Absent fields are Go's `omitempty`: the proxy
 * leaves out empty strings and maps, a zero status and a false `is_sse`, as Matchlock does.
 * `query` holds the first value of each key; header names are canonical (Go's spelling).
 */
export const HookCallbackRequestSchema = v.object({
  callback_id: v.string(),
  phase: v.picklist(["before", "after"]),
  host: v.optional(v.string()),
  method: v.optional(v.string()),
  path: v.optional(v.string()),
  query: v.optional(v.record(v.string(), v.string())),
  request_headers: v.optional(v.record(v.string(), v.array(v.string()))),
  status_code: v.optional(v.number()),
  response_headers: v.optional(v.record(v.string(), v.array(v.string()))),
  is_sse: v.optional(v.boolean()),
});
export type HookCallbackRequest = v.InferOutput<typeof HookCallbackRequestSchema>;

const headerValuesMap = v.nullish(v.record(headerName, v.array(headerValue)));

/**
 * The callback's one-line reply. Unknown keys are ignored (newer SDKs may add some). `null` and an
 * absent map leave things as they are; a map, even `{}`, replaces the whole header set or query.
 */
export const HookCallbackReplySchema = v.object({
  action: v.optional(action),
  request: v.nullish(
    v.object({
      headers: headerValuesMap,
      query: v.nullish(v.record(v.string(), v.string())),
      path: v.optional(v.pipe(v.string(), v.trim())),
    }),
  ),
  response: v.nullish(
    v.object({
      headers: headerValuesMap,
      /** An empty `find` is a no-op and dropped, as in Matchlock. */
      body_replacements: v.nullish(
        v.pipe(
          v.array(v.object({ find: literal("find"), replace: v.optional(literal("replace"), "") })),
          v.maxLength(MAX_BODY_REPLACEMENTS, `more than ${MAX_BODY_REPLACEMENTS} body replacements`),
        ),
      ),
      set_body_base64: v.optional(v.pipe(v.string(), v.trim())),
    }),
  ),
  error: v.optional(v.string()),
});
export type HookCallbackReplyInput = v.InferInput<typeof HookCallbackReplySchema>;
export type HookCallbackReply = v.InferOutput<typeof HookCallbackReplySchema>;

/** `rule 2 ("strip-debug")`, how compile errors name a rule. */
export function ruleRef(index: number, name: unknown): string {
  return typeof name === "string" && name !== ""
    ? `rule ${index + 1} (${JSON.stringify(name)})`
    : `rule ${index + 1}`;
}

const MAP_FIELDS = new Set(["set_headers", "set_query", "set_response_headers"]);

/** `methods[0]`, `set_headers["X A"]`, `body_replacements[1].find`. */
function fieldPath(keys: readonly unknown[]): string {
  let out = "";
  keys.forEach((k, i) => {
    if (typeof k === "number") out += `[${k}]`;
    else if (i > 0 && MAP_FIELDS.has(String(keys[i - 1]))) out += `[${JSON.stringify(String(k))}]`;
    else out += out === "" ? String(k) : `.${String(k)}`;
  });
  return out;
}

/** `invalid network interception: rule 2 ("x"): path: …`, the one shape of every hook error. */
export function interceptionError(where: string, message: string): InvalidArgumentError {
  return new InvalidArgumentError(`invalid network interception: ${where}: ${message}`);
}

/**
 * One error naming the rule and field of the first schema issue. `input` is the interception that
 * was parsed; `depth` the number of path keys above it (2 when the issue came from a whole config).
 */
export function interceptionIssueError(
  input: unknown,
  issue: v.BaseIssue<unknown> | undefined,
  depth = 0,
): InvalidArgumentError {
  const keys = issue?.path?.slice(depth).map((p) => p.key) ?? [];
  const message = issue === undefined ? "invalid" : issue.message;
  const unknownKey = issue !== undefined && isUnknownKeyIssue(issue);
  if (keys[0] === "rules" && typeof keys[1] === "number") {
    const rules = (input as { rules?: unknown[] }).rules ?? [];
    const rule = rules[keys[1]] as { name?: unknown } | undefined;
    const ref = ruleRef(keys[1], rule?.name);
    const rest = keys.slice(2);
    if (unknownKey)
      return interceptionError(ref, message.replace(/^unknown key/, `unknown key ${fieldPath(rest)}`));
    return interceptionError(rest.length === 0 ? ref : `${ref}: ${fieldPath(rest)}`, message);
  }
  if (unknownKey) {
    return new InvalidArgumentError(
      `invalid network interception: ${message.replace(/^unknown key/, `unknown key ${fieldPath(keys)}`)}`,
    );
  }
  if (keys.length === 0) return new InvalidArgumentError(`invalid network interception: ${message}`);
  return interceptionError(fieldPath(keys), message);
}
