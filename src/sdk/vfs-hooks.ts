import { minimatch } from "minimatch";
import type { VfsInterceptionInput, VfsRuleInput } from "../api/config.ts";
import { InvalidArgumentError } from "../api/errors.ts";
import type { FileEvent } from "../api/events.ts";
import { canonicalVfsOp, VFS_OPS, type VfsOp } from "../api/vfs-ops.ts";
import type { BinaryLike } from "./bytes.ts";
import type { Client } from "./client.ts";

/**
 * VFS interception in an SDK program, as Matchlock's TypeScript SDK has it (names, rules, messages).
 * A rule without a callback is static: it goes to the server in `vfs.interception.rules` (the wire
 * shape of src/api/config.ts), which allows or blocks (EPERM) the guest's file operations. A rule
 * with a callback never leaves this process:
 *
 * - `hook(event)` and `dangerousHook(client, event)` (phase "after") run on the `file` event
 *   notifications the server sends; the SDK turns `emit_events` on when there are any.
 * - `actionHook(req)` and `mutateHook(req)` (phase "before") run on the SDK's own writeFile /
 *   writeFileMode / readFile / listFiles calls (ops write, read, readdir), never on the guest's
 *   file operations: those reach the host as FUSE requests the program cannot answer in time.
 *
 * `compileVfsInterception` splits rules into the two; `VfsHookRunner` (vfs-hook-runner.ts) runs
 * the local ones.
 */

export const VFS_HOOK_PHASE_BEFORE = "before";
export const VFS_HOOK_PHASE_AFTER = "after";
export const VFS_HOOK_ACTION_ALLOW = "allow";
export const VFS_HOOK_ACTION_BLOCK = "block";
export const VFS_HOOK_OP_STAT = "stat";
export const VFS_HOOK_OP_READDIR = "readdir";
export const VFS_HOOK_OP_OPEN = "open";
export const VFS_HOOK_OP_CREATE = "create";
export const VFS_HOOK_OP_MKDIR = "mkdir";
export const VFS_HOOK_OP_CHMOD = "chmod";
export const VFS_HOOK_OP_REMOVE = "remove";
export const VFS_HOOK_OP_REMOVE_ALL = "remove_all";
export const VFS_HOOK_OP_RENAME = "rename";
export const VFS_HOOK_OP_SYMLINK = "symlink";
export const VFS_HOOK_OP_READLINK = "readlink";
export const VFS_HOOK_OP_READ = "read";
export const VFS_HOOK_OP_WRITE = "write";
export const VFS_HOOK_OP_CLOSE = "close";
export const VFS_HOOK_OP_SYNC = "sync";
export const VFS_HOOK_OP_TRUNCATE = "truncate";

export type VFSHookPhase = "" | "before" | "after";
export type VFSHookOp = VfsOp;
/** "" and undefined mean allow; anything but allow/block is an error. */
export type VFSHookAction = "allow" | "block" | (string & {});

/** What an after hook gets: the `file` part of the server's event. */
export type VFSHookEvent = FileEvent["file"];

export interface VFSMutateRequest {
  path: string;
  /** Bytes about to be written (after any earlier mutateHook). */
  size: number;
  mode: number;
  /** This program's effective uid/gid, as Matchlock gives them. */
  uid: number;
  gid: number;
}

export interface VFSActionRequest {
  /** write, read or readdir. */
  op: string;
  path: string;
  /** write: bytes given; read and readdir: 0. */
  size: number;
  /** write: the mode asked for; read and readdir: 0. */
  mode: number;
  uid: number;
  gid: number;
}

export type VFSHookFunc = (event: VFSHookEvent) => void | Promise<void>;
export type VFSDangerousHookFunc = (client: Client, event: VFSHookEvent) => void | Promise<void>;
export type VFSMutateHookFunc = (
  request: VFSMutateRequest,
) => BinaryLike | null | undefined | Promise<BinaryLike | null | undefined>;
export type VFSActionHookFunc = (
  request: VFSActionRequest,
) => VFSHookAction | undefined | Promise<VFSHookAction | undefined>;

export interface VFSHookRule {
  name?: string;
  phase?: VFSHookPhase;
  /** VFSHookOp names (or Matchlock's aliases read_dir, removeall); empty: every op. */
  ops?: Array<VFSHookOp | (string & {})>;
  /** A minimatch glob (dot files included) for callbacks, as Matchlock's SDK; Go's filepath.Match on the server. */
  path?: string;
  action?: VFSHookAction;
  /** After hooks: stop waiting after this long (the hook is not stopped). Static rules: sent as timeout_ms. */
  timeoutMs?: number;
  hook?: VFSHookFunc;
  dangerousHook?: VFSDangerousHookFunc;
  mutateHook?: VFSMutateHookFunc;
  actionHook?: VFSActionHookFunc;
}

export interface VFSInterceptionConfig {
  emitEvents?: boolean;
  rules?: VFSHookRule[];
}

interface LocalRule {
  name: string;
  /** Empty: every op. */
  ops: ReadonlySet<VfsOp>;
  /** "" matches every path. */
  path: string;
}

export interface AfterHook extends LocalRule {
  /** dangerousHook: runs on every matching event, may re-enter; hook: dropped while another safe hook runs. */
  dangerous: boolean;
  /** 0: wait as long as it takes. */
  timeoutMs: number;
  run: (client: Client, event: VFSHookEvent) => void | Promise<void>;
}

export interface MutateHook extends LocalRule {
  run: VFSMutateHookFunc;
}

export interface ActionHook extends LocalRule {
  run: VFSActionHookFunc;
}

export interface CompiledVfsInterception {
  /** What goes to the server: static rules only; undefined when there is nothing to send. */
  wire: VfsInterceptionInput | undefined;
  after: AfterHook[];
  mutate: MutateHook[];
  action: ActionHook[];
}

const RULE_KEYS: ReadonlySet<string> = new Set<keyof VFSHookRule>([
  "name",
  "phase",
  "ops",
  "path",
  "action",
  "timeoutMs",
  "hook",
  "dangerousHook",
  "mutateHook",
  "actionHook",
]);
const CONFIG_KEYS: ReadonlySet<string> = new Set<keyof VFSInterceptionConfig>(["emitEvents", "rules"]);
const CALLBACKS = ["hook", "dangerousHook", "mutateHook", "actionHook"] as const;

/** camelCase from snake_case: `timeout_ms` → `timeoutMs`. */
function camel(key: string): string {
  return key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
}

/** A key nobody reads would be dropped silently (say, a wire-style `timeout_ms` or `dangerous_hook`). */
function checkKeys(obj: object, known: ReadonlySet<string>, what: string): void {
  for (const key of Object.keys(obj)) {
    if (known.has(key)) continue;
    const hint = known.has(camel(key)) ? ` (did you mean ${camel(key)}?)` : "";
    throw new InvalidArgumentError(`${what}: unknown key ${key}${hint}`);
  }
}

const norm = (s: string | undefined): string =>
  String(s ?? "")
    .trim()
    .toLowerCase();

/** Matchlock's message prefix, so errors read the same as there. */
const who = (rule: VFSHookRule): string => `invalid vfs hook ${JSON.stringify(rule.name ?? "")}`;

/**
 * A local rule's ops. Ours: an op the server would not know is refused (Matchlock's SDK lowercases
 * and keeps it, and the rule then never matches).
 */
function localOps(rule: VFSHookRule): Set<VfsOp> {
  const ops = new Set<VfsOp>();
  for (const o of rule.ops ?? []) {
    const op = canonicalVfsOp(norm(o));
    if (op === undefined) {
      throw new InvalidArgumentError(
        `${who(rule)}: unknown op ${JSON.stringify(o)} (one of ${VFS_OPS.join(", ")})`,
      );
    }
    ops.add(op);
  }
  return ops;
}

/** Matchlock's wire rule: the static fields, empty ones left out; `action` normalised. */
function toWire(rule: VFSHookRule, action: string): VfsRuleInput {
  const out: VfsRuleInput = {};
  if (rule.name) out.name = rule.name;
  if (rule.phase) out.phase = norm(rule.phase) as VfsRuleInput["phase"];
  if (rule.ops && rule.ops.length > 0) out.ops = [...rule.ops];
  if (rule.path) out.path = rule.path;
  if (action) out.action = action as VfsRuleInput["action"];
  if (rule.timeoutMs !== undefined && rule.timeoutMs > 0) out.timeout_ms = rule.timeoutMs;
  return out;
}

/** A callback rule may only say allow: the callback decides (Matchlock's rule). */
function checkCallbackAction(rule: VFSHookRule, label: string): void {
  const action = norm(rule.action);
  if (action !== "" && action !== VFS_HOOK_ACTION_ALLOW) {
    throw new InvalidArgumentError(`${who(rule)}: ${label} cannot set action=${JSON.stringify(rule.action)}`);
  }
}

function checkPhase(rule: VFSHookRule, label: string, phase: "before" | "after"): void {
  const p = norm(rule.phase);
  // As Matchlock: after hooks must say so; before hooks may leave the phase out (before is the default).
  const ok = phase === "after" ? p === "after" : p === "" || p === "before";
  if (!ok) throw new InvalidArgumentError(`${who(rule)}: ${label} must use phase=${phase}`);
}

/**
 * Splits Matchlock's `withVFSInterception` config into the wire config (static rules; `emit_events`
 * also on when there are after hooks, which feed on the events) and the local callbacks. Errors
 * (InvalidArgumentError) name the rule as Matchlock's SDK does. Static rules are checked by the
 * server (ops, glob), which refuses the create naming the rule.
 */
export function compileVfsInterception(config: VFSInterceptionConfig | undefined): CompiledVfsInterception {
  const compiled: CompiledVfsInterception = { wire: undefined, after: [], mutate: [], action: [] };
  if (config === undefined) return compiled;
  if (config === null || typeof config !== "object") {
    throw new InvalidArgumentError("vfs interception config is not an object");
  }
  checkKeys(config, CONFIG_KEYS, "vfs interception config");
  const wireRules: VfsRuleInput[] = [];
  (config.rules ?? []).forEach((rule, index) => {
    if (rule === null || typeof rule !== "object") {
      throw new InvalidArgumentError(`vfs hook rule ${index + 1} is not an object`);
    }
    checkKeys(rule, RULE_KEYS, `vfs hook rule ${index + 1}`);
    const given = CALLBACKS.filter((k) => rule[k] !== undefined && rule[k] !== null);
    if (given.length > 1) {
      throw new InvalidArgumentError(`${who(rule)}: cannot set more than one callback hook`);
    }
    const kind = given[0];
    if (kind === undefined) {
      const action = norm(rule.action);
      if (action === "mutate_write") {
        throw new InvalidArgumentError(`${who(rule)}: mutate_write requires mutate_hook callback`);
      }
      wireRules.push(toWire(rule, action));
      return;
    }
    const fn = rule[kind];
    if (typeof fn !== "function") throw new InvalidArgumentError(`${who(rule)}: ${kind} must be a function`);
    const base: LocalRule = { name: rule.name ?? "", ops: localOps(rule), path: rule.path ?? "" };
    if (base.path !== "") checkGlob(rule, base.path);
    const timeoutMs = rule.timeoutMs !== undefined && rule.timeoutMs > 0 ? rule.timeoutMs : 0;
    if (kind === "hook" || kind === "dangerousHook") {
      const label = kind === "hook" ? "callback hooks" : "dangerous_hook";
      checkCallbackAction(rule, label);
      checkPhase(rule, label, "after");
      const run: AfterHook["run"] =
        kind === "hook"
          ? (_client, event) => (fn as VFSHookFunc)(event)
          : (client, event) => (fn as VFSDangerousHookFunc)(client, event);
      compiled.after.push({ ...base, dangerous: kind === "dangerousHook", timeoutMs, run });
    } else if (kind === "actionHook") {
      checkCallbackAction(rule, "action_hook");
      checkPhase(rule, "action_hook", "before");
      compiled.action.push({ ...base, run: fn as VFSActionHookFunc });
    } else {
      checkCallbackAction(rule, "mutate_hook");
      checkPhase(rule, "mutate_hook", "before");
      compiled.mutate.push({ ...base, run: fn as VFSMutateHookFunc });
    }
  });
  const emitEvents = config.emitEvents === true || compiled.after.length > 0;
  if (emitEvents || wireRules.length > 0) {
    compiled.wire = {
      ...(emitEvents ? { emit_events: true } : {}),
      ...(wireRules.length > 0 ? { rules: wireRules } : {}),
    };
  }
  return compiled;
}

const GLOB_OPTIONS = { dot: true } as const;

/** Ours: a glob minimatch cannot read is refused here (Matchlock's SDK lets the rule never match). */
function checkGlob(rule: VFSHookRule, pattern: string): void {
  try {
    minimatch("/", pattern, GLOB_OPTIONS);
  } catch (e) {
    throw new InvalidArgumentError(
      `${who(rule)}: bad path glob ${JSON.stringify(pattern)}: ${(e as Error).message}`,
    );
  }
}

/**
 * Whether a local rule applies to `op` on `path`: no ops means every op; the path glob is
 * minimatch's with dot files included, as in Matchlock's TypeScript SDK (so `**` and `{a,b}`
 * work here, unlike in the server's static rules, which match with Go's filepath.Match).
 */
export function matchesLocalRule(rule: LocalRule, op: string, path: string): boolean {
  if (rule.ops.size > 0 && !rule.ops.has(op.toLowerCase() as VfsOp)) return false;
  return rule.path === "" || minimatch(path, rule.path, GLOB_OPTIONS);
}
