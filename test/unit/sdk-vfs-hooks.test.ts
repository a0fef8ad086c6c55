import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { parseSandboxConfig } from "../../src/api/config.ts";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import {
  Client,
  MatchlockError,
  Sandbox,
  type VFSHookEvent,
  type VFSInterceptionConfig,
  VfsHookError,
} from "../../src/sdk/index.ts";
import { VfsHookRunner } from "../../src/sdk/vfs-hook-runner.ts";
import { compileVfsInterception, matchesLocalRule } from "../../src/sdk/vfs-hooks.ts";

/**
 * The SDK's local VFS hooks without a VM: how rules split into the wire config and local callbacks
 * (and which are refused, with Matchlock's messages), how paths match, how the runner dispatches
 * events (safe hooks dropped while one runs, dangerous ones re-entering, timeouts, errors), and
 * the client wiring against a stand-in rpc program.
 */

const dir = mkdtempSync(join(tmpdir(), "matchlock-sdk-vfs-"));
after(() => rmSync(dir, { recursive: true, force: true }));

const ev = (path: string, op = "write", size = 1): VFSHookEvent => ({
  op,
  path,
  size,
  mode: 0o644,
  uid: 0,
  gid: 0,
});
const tick = (ms = 20) => new Promise((r) => setTimeout(r, ms));
const noop = () => {};
/** The runner only hands the client to dangerous hooks; these tests give it a stand-in. */
const fakeClient = {} as Client;

function runner(config: VFSInterceptionConfig, onError: (e: VfsHookError) => void = noop): VfsHookRunner {
  const r = VfsHookRunner.of(compileVfsInterception(config), fakeClient, onError);
  assert.ok(r);
  return r;
}

describe("compileVfsInterception", () => {
  test("static rules go on the wire, callbacks stay local; emit_events comes on for after hooks", () => {
    const c = compileVfsInterception({
      rules: [
        {
          name: "no-env",
          phase: "before",
          ops: ["create"],
          path: "/workspace/*.env",
          action: "Block",
          timeoutMs: 50,
        },
        { name: "audit", phase: "after", ops: ["write"], path: "/workspace/**", hook: noop },
        { name: "danger", phase: "after", dangerousHook: noop, timeoutMs: 300 },
        { name: "gate", ops: ["read"], actionHook: () => "allow" },
        { name: "stamp", phase: "before", ops: ["write"], mutateHook: () => "x" },
      ],
    });
    assert.deepEqual(c.wire, {
      emit_events: true,
      rules: [
        {
          name: "no-env",
          phase: "before",
          ops: ["create"],
          path: "/workspace/*.env",
          action: "block",
          timeout_ms: 50,
        },
      ],
    });
    assert.deepEqual(
      c.after.map((h) => [h.name, h.dangerous, h.timeoutMs, [...h.ops], h.path]),
      [
        ["audit", false, 0, ["write"], "/workspace/**"],
        ["danger", true, 300, [], ""],
      ],
    );
    assert.deepEqual(
      c.action.map((h) => h.name),
      ["gate"],
    );
    assert.deepEqual(
      c.mutate.map((h) => h.name),
      ["stamp"],
    );
  });

  test("only before callbacks and no emitEvents: nothing goes to the server", () => {
    const c = compileVfsInterception({
      rules: [{ actionHook: () => "block" }, { mutateHook: () => undefined }],
    });
    assert.equal(c.wire, undefined);
    assert.equal(compileVfsInterception({ emitEvents: true }).wire?.emit_events, true);
    assert.equal(compileVfsInterception(undefined).wire, undefined);
  });

  test("the builder's create config carries the static rules only and is what the server accepts", () => {
    const s = new Sandbox().mountMemory("/workspace/m").withVFSInterception({
      rules: [
        { phase: "before", ops: ["remove"], path: "/workspace/m/keep", action: "block" },
        { phase: "after", ops: ["write"], hook: noop },
        { actionHook: () => "allow" },
      ],
    });
    const options = s.options();
    assert.deepEqual(JSON.parse(JSON.stringify(options)), options, "no functions in the wire config");
    assert.deepEqual(options.vfs?.interception, {
      emit_events: true,
      rules: [{ phase: "before", ops: ["remove"], path: "/workspace/m/keep", action: "block" }],
    });
    assert.deepEqual(parseSandboxConfig(options).vfs.interception?.rules?.length, 1);
    // Replacing the interception with before hooks only takes it off the wire, mounts stay.
    const t = s.withVFSInterception({ rules: [{ mutateHook: () => "x" }] });
    assert.equal(t.options().vfs?.interception, undefined);
    assert.deepEqual(Object.keys(t.options().vfs?.mounts ?? {}), ["/workspace/m"]);
    assert.equal(t.vfsHooks().mutate.length, 1);
    // The builder copies the rule list: changing the caller's array later changes nothing.
    const rules: VFSInterceptionConfig["rules"] = [{ phase: "after", hook: noop }];
    const u = new Sandbox().withVFSInterception({ rules });
    rules.push({ actionHook: () => "block" });
    assert.equal(u.vfsHooks().action.length, 0);
  });

  test("refused as Matchlock refuses them, naming the rule", () => {
    const refused = (config: VFSInterceptionConfig, message: RegExp) =>
      assert.throws(
        () => compileVfsInterception(config),
        (e: Error) => e instanceof InvalidArgumentError && message.test(e.message),
      );
    refused(
      { rules: [{ name: "two", phase: "after", hook: noop, dangerousHook: noop }] },
      /^invalid vfs hook "two": cannot set more than one callback hook$/,
    );
    refused(
      { rules: [{ name: "h", hook: noop }] },
      /^invalid vfs hook "h": callback hooks must use phase=after$/,
    );
    refused(
      { rules: [{ name: "d", phase: "before", dangerousHook: noop }] },
      /^invalid vfs hook "d": dangerous_hook must use phase=after$/,
    );
    refused(
      { rules: [{ name: "a", phase: "after", actionHook: () => "allow" }] },
      /^invalid vfs hook "a": action_hook must use phase=before$/,
    );
    refused(
      { rules: [{ name: "m", phase: "after", mutateHook: () => "x" }] },
      /^invalid vfs hook "m": mutate_hook must use phase=before$/,
    );
    refused(
      { rules: [{ name: "b", phase: "after", action: "block", hook: noop }] },
      /^invalid vfs hook "b": callback hooks cannot set action="block"$/,
    );
    refused(
      { rules: [{ name: "b", action: "block", actionHook: () => "allow" }] },
      /action_hook cannot set action="block"/,
    );
    refused({ rules: [{ name: "w", action: "mutate_write" }] }, /mutate_write requires mutate_hook callback/);
    // Ours: what Matchlock's SDK would keep and never match, or drop without a word.
    refused({ rules: [{ name: "o", phase: "after", ops: ["wrte"], hook: noop }] }, /unknown op "wrte"/);
    refused(
      { rules: [{ phase: "after", hook: noop, timeout_ms: 5 } as never] },
      /rule 1: unknown key timeout_ms \(did you mean timeoutMs\?\)/,
    );
    refused({ emit_events: true } as never, /unknown key emit_events \(did you mean emitEvents\?\)/);
    refused({ rules: [{ phase: "after", hook: "audit" } as never] }, /hook must be a function/);
    // Matchlock's aliases are accepted for local rules too.
    assert.deepEqual(
      [
        ...(compileVfsInterception({ rules: [{ ops: ["read_dir"], actionHook: () => "allow" }] }).action[0]
          ?.ops ?? []),
      ],
      ["readdir"],
    );
  });

  test("a bad rule makes launch reject (options() throws), as Matchlock's create does", async () => {
    const s = new Sandbox().withVFSInterception({ rules: [{ hook: noop }] });
    assert.throws(() => s.options(), /must use phase=after/);
    const c = new Client({ binaryPath: "/bin/false" });
    await assert.rejects(c.launch(s), /must use phase=after/);
    await c.close();
  });
});

describe("matchesLocalRule", () => {
  const rule = (path: string, ops: string[] = []) => {
    const r = compileVfsInterception({ rules: [{ ops, path, actionHook: () => undefined }] }).action[0];
    assert.ok(r);
    return r;
  };
  test("minimatch with dot files, as Matchlock's TypeScript SDK", () => {
    assert.ok(matchesLocalRule(rule("/workspace/*.txt"), "write", "/workspace/a.txt"));
    assert.ok(matchesLocalRule(rule("/workspace/*"), "write", "/workspace/.env"), "dot files match *");
    assert.ok(
      !matchesLocalRule(rule("/workspace/*.txt"), "write", "/workspace/d/a.txt"),
      "* stays in one segment",
    );
    assert.ok(
      matchesLocalRule(rule("/workspace/**"), "write", "/workspace/d/e/a.txt"),
      "** crosses segments",
    );
    assert.ok(matchesLocalRule(rule("/workspace/{a,b}.txt"), "read", "/workspace/b.txt"), "braces");
    assert.ok(matchesLocalRule(rule(""), "stat", "/anything"), "no path: every path");
  });
  test("ops: none means all; otherwise the event's op must be listed", () => {
    assert.ok(matchesLocalRule(rule("", ["write", "read"]), "read", "/x"));
    assert.ok(!matchesLocalRule(rule("", ["write"]), "read", "/x"));
    assert.ok(
      matchesLocalRule(rule("", ["write"]), "WRITE", "/x"),
      "the event's op is lowercased as Matchlock does",
    );
  });
});

describe("VfsHookRunner: after hooks", () => {
  test("a safe hook is not run again by events that arrive while it runs (its own writes)", async () => {
    const seen: string[] = [];
    let self: VfsHookRunner | undefined;
    self = runner({
      rules: [
        {
          phase: "after",
          path: "/workspace/*",
          hook: async (e) => {
            seen.push(e.path);
            // What a hook's own writeFile would bring: events for the same glob while it runs.
            self?.onFileEvent(ev("/workspace/from-hook.txt"));
            await tick();
            self?.onFileEvent(ev("/workspace/from-hook-2.txt"));
          },
        },
      ],
    });
    self.onFileEvent(ev("/workspace/trigger.txt"));
    await tick(100);
    assert.deepEqual(seen, ["/workspace/trigger.txt"]);
    // Once it is done, the next event runs it again.
    self.onFileEvent(ev("/workspace/next.txt"));
    await tick(100);
    assert.deepEqual(seen, ["/workspace/trigger.txt", "/workspace/next.txt"]);
  });

  test("the safe hooks of one event run one after the other; the flag covers all safe hooks", async () => {
    const order: string[] = [];
    const r = runner({
      rules: [
        {
          phase: "after",
          name: "a",
          hook: async () => {
            order.push("a-start");
            await tick();
            order.push("a-end");
          },
        },
        { phase: "after", name: "b", ops: ["write"], hook: () => void order.push("b") },
        { phase: "after", name: "c", ops: ["read"], hook: () => void order.push("c") },
      ],
    });
    r.onFileEvent(ev("/w/1"));
    r.onFileEvent(ev("/w/2", "read")); // while a runs: dropped, so c never runs
    await tick(100);
    assert.deepEqual(order, ["a-start", "a-end", "b"]);
  });

  test("a dangerous hook runs on every event, concurrently, and may re-enter", async () => {
    const seen: string[] = [];
    let clientSeen: Client | undefined;
    let self: VfsHookRunner | undefined;
    self = runner({
      rules: [
        {
          phase: "after",
          ops: ["write"],
          dangerousHook: async (client, e) => {
            clientSeen = client;
            seen.push(e.path);
            if (e.path.endsWith("trigger.txt")) self?.onFileEvent(ev("/workspace/echo.txt"));
            await tick();
          },
        },
      ],
    });
    self.onFileEvent(ev("/workspace/trigger.txt"));
    self.onFileEvent(ev("/workspace/other.txt"));
    await tick(100);
    assert.deepEqual(seen, ["/workspace/trigger.txt", "/workspace/other.txt", "/workspace/echo.txt"]);
    assert.equal(clientSeen, fakeClient, "the hook gets the client");
  });

  test("errors of after hooks (sync, async) are reported with a stable code, never thrown", async () => {
    const errors: VfsHookError[] = [];
    const r = runner(
      {
        rules: [
          {
            name: "sync",
            phase: "after",
            ops: ["write"],
            hook: () => {
              throw new Error("sync boom");
            },
          },
          {
            name: "async",
            phase: "after",
            ops: ["create"],
            dangerousHook: async () => Promise.reject(new Error("async boom")),
          },
        ],
      },
      (e) => errors.push(e),
    );
    r.onFileEvent(ev("/w/a"));
    r.onFileEvent(ev("/w/b", "create"));
    await tick(50);
    assert.deepEqual(
      errors.map((e) => [e.code, e.hook, e.op, e.path, (e.cause as Error).message]),
      [
        ["VFS_HOOK_FAILED", "sync", "write", "/w/a", "sync boom"],
        ["VFS_HOOK_FAILED", "async", "create", "/w/b", "async boom"],
      ],
    );
    assert.ok(errors[0] instanceof MatchlockError);
    // The safe flag came down after the failure: the next event runs the hook again.
    r.onFileEvent(ev("/w/c"));
    await tick(50);
    assert.equal(errors.length, 3);
    // An error handler that throws is contained too.
    const r2 = runner({ rules: [{ phase: "after", hook: () => Promise.reject(new Error("x")) }] }, () => {
      throw new Error("handler broke");
    });
    r2.onFileEvent(ev("/w/d"));
    await tick(50);
  });

  test("timeoutMs stops the waiting: reported, and the next event runs while the slow hook still hangs", async () => {
    const errors: VfsHookError[] = [];
    let runs = 0;
    const r = runner(
      {
        rules: [
          {
            name: "slow",
            phase: "after",
            timeoutMs: 50,
            hook: () => {
              runs++;
              return new Promise<void>(() => {}); // never ends
            },
          },
        ],
      },
      (e) => errors.push(e),
    );
    r.onFileEvent(ev("/w/1"));
    r.onFileEvent(ev("/w/2")); // dropped: the first still runs
    await tick(120);
    assert.equal(runs, 1);
    assert.deepEqual(
      errors.map((e) => [e.code, e.hook, e.path]),
      [["VFS_HOOK_TIMEOUT", "slow", "/w/1"]],
    );
    r.onFileEvent(ev("/w/3"));
    await tick(120);
    assert.equal(runs, 2);
  });
});

describe("VfsHookRunner: before hooks", () => {
  test("actionHook block throws Matchlock's error (a MatchlockError) with a stable code", async () => {
    const requests: unknown[] = [];
    const r = runner({
      rules: [
        {
          name: "ro",
          ops: ["write", "read"],
          path: "/workspace/locked/*",
          actionHook: (q) => {
            requests.push(q);
            return "block";
          },
        },
      ],
    });
    await assert.rejects(r.checkAction("write", "/workspace/locked/a", 3, 0o600), (e: Error) => {
      assert.ok(e instanceof VfsHookError && e instanceof MatchlockError);
      assert.equal(
        e.message,
        'vfs action hook blocked operation: op=write path=/workspace/locked/a hook="ro"',
      );
      assert.deepEqual(
        [e.code, e.hook, e.op, e.path],
        ["VFS_HOOK_BLOCKED", "ro", "write", "/workspace/locked/a"],
      );
      return true;
    });
    assert.deepEqual(requests, [
      {
        op: "write",
        path: "/workspace/locked/a",
        size: 3,
        mode: 0o600,
        uid: process.geteuid?.(),
        gid: process.getegid?.(),
      },
    ]);
    await r.checkAction("readdir", "/workspace/locked/a", 0, 0); // op not listed
    await r.checkAction("write", "/workspace/open/a", 0, 0); // path not matched
  });

  test("allow, '', undefined allow; anything else is an invalid result; a hook's own error propagates", async () => {
    for (const answer of ["allow", " ALLOW ", "", undefined]) {
      await runner({ rules: [{ actionHook: () => answer }] }).checkAction("read", "/x", 0, 0);
    }
    await assert.rejects(
      runner({ rules: [{ name: "n", actionHook: () => "deny" }] }).checkAction("read", "/x", 0, 0),
      (e: Error) =>
        e instanceof VfsHookError && e.code === "VFS_HOOK_INVALID_RESULT" && /got "deny"/.test(e.message),
    );
    await assert.rejects(
      runner({
        rules: [
          {
            actionHook: () => {
              throw new Error("policy service down");
            },
          },
        ],
      }).checkAction("read", "/x", 0, 0),
      /policy service down/,
    );
  });

  test("mutateHooks chain on the content (each sees the current size); null/undefined keep it", async () => {
    const sizes: number[] = [];
    const r = runner({
      rules: [
        {
          ops: ["write"],
          path: "/w/*",
          mutateHook: (q) => {
            sizes.push(q.size);
            return `<${q.path}:${q.mode.toString(8)}>`;
          },
        },
        { path: "/w/*", mutateHook: () => undefined },
        {
          path: "/w/*",
          mutateHook: (q) => {
            sizes.push(q.size);
            return new Uint8Array([65, 66]);
          },
        },
        { path: "/other/*", mutateHook: () => "never" },
      ],
    });
    const out = await r.mutateWrite("/w/f", Buffer.from("abc"), 0o640);
    assert.equal(out.toString(), "AB");
    assert.deepEqual(sizes, [3, "</w/f:640>".length]);
    assert.equal((await r.mutateWrite("/else", Buffer.from("keep"), 0o644)).toString(), "keep");
    await assert.rejects(
      runner({ rules: [{ name: "n", mutateHook: () => 42 as never }] }).mutateWrite("/x", Buffer.from(""), 0),
      (e: Error) => e instanceof VfsHookError && e.code === "VFS_HOOK_INVALID_RESULT",
    );
  });
});

/** A stand-in `matchlock rpc`: records requests, keeps written files, emits a file event on exec. */
function fakeRpc(): { bin: string; log: string } {
  const log = join(dir, "requests.jsonl");
  const bin = join(dir, "fake-rpc.mjs");
  writeFileSync(
    bin,
    `import { appendFileSync } from "node:fs";
     import { createInterface } from "node:readline";
     const files = new Map();
     const send = (m) => process.stdout.write(JSON.stringify({ jsonrpc: "2.0", ...m }) + "\\n");
     for await (const line of createInterface({ input: process.stdin })) {
       const m = JSON.parse(line);
       appendFileSync(${JSON.stringify(log)}, line + "\\n");
       if (m.id === undefined) continue;
       const p = m.params ?? {};
       if (m.method === "create") send({ id: m.id, result: { id: "vm-0000abcd" } });
       else if (m.method === "exec") {
         // The guest "writes" the file named by the command: the event comes before the result.
         send({ method: "event", params: { type: "file", timestamp: 1, file: { op: "write", path: p.command, size: 5, mode: 420, uid: 0, gid: 0 } } });
         send({ id: m.id, result: { exit_code: 0, stdout: "", stderr: "", duration_ms: 1 } });
       } else if (m.method === "write_file") { files.set(p.path, p.content); send({ id: m.id, result: {} }); }
       else if (m.method === "read_file") send({ id: m.id, result: { content: files.get(p.path) ?? "" } });
       else if (m.method === "list_files") send({ id: m.id, result: { files: [] } });
       else if (m.method === "close") send({ id: m.id, result: {} });
       else send({ id: m.id, error: { code: -32601, message: "no " + m.method } });
     }`,
  );
  return { bin, log };
}

describe("Client wiring (stand-in rpc)", () => {
  test("hooks run on file events and on the client's own file calls; callbacks never go on the wire", async () => {
    const { bin, log } = fakeRpc();
    const seen: VFSHookEvent[] = [];
    const errors: VfsHookError[] = [];
    const c = new Client({ binaryPath: bin, onHookError: (e) => errors.push(e) });
    try {
      await c.launch(
        new Sandbox().withVFSInterception({
          rules: [
            { phase: "after", ops: ["write"], path: "/workspace/audit/*", hook: (e) => void seen.push(e) },
            {
              phase: "after",
              path: "/workspace/boom/*",
              hook: () => {
                throw new Error("boom");
              },
            },
            { ops: ["write"], path: "/workspace/m/*", mutateHook: (q) => `mutated ${q.size}` },
            { path: "/workspace/locked/**", actionHook: () => "block" },
          ],
        }),
      );
      await c.exec("/workspace/audit/a.txt");
      await c.exec("/workspace/boom/b.txt");
      await tick(50);
      assert.deepEqual(seen, [
        { op: "write", path: "/workspace/audit/a.txt", size: 5, mode: 420, uid: 0, gid: 0 },
      ]);
      assert.deepEqual(
        errors.map((e) => [e.code, e.path]),
        [["VFS_HOOK_FAILED", "/workspace/boom/b.txt"]],
      );

      await c.writeFileMode("/workspace/m/x", "original", 0o600);
      assert.equal((await c.readFile("/workspace/m/x")).toString(), "mutated 8");
      await c.writeFile("/workspace/plain", new Uint8Array([104, 105]).buffer);
      assert.equal(
        (await c.readFile("/workspace/plain")).toString(),
        "hi",
        "ArrayBuffer content, as Matchlock takes",
      );

      await assert.rejects(
        c.writeFile("/workspace/locked/f", "x"),
        (e: Error) => e instanceof VfsHookError && e.op === "write",
      );
      await assert.rejects(
        c.readFile("/workspace/locked/f"),
        (e: Error) => e instanceof VfsHookError && e.op === "read",
      );
      await assert.rejects(
        c.listFiles("/workspace/locked/d"),
        (e: Error) => e instanceof VfsHookError && e.op === "readdir",
      );
      await c.exec("/workspace/audit/still-working");
    } finally {
      await c.close();
    }
    const { readFileSync } = await import("node:fs");
    const requests = readFileSync(log, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { method: string; params: Record<string, unknown> });
    assert.deepEqual(requests[0]?.params.vfs, { interception: { emit_events: true } });
    // Blocked calls never reached the server.
    assert.ok(!requests.some((r) => String(r.params?.path ?? "").startsWith("/workspace/locked")));
    assert.deepEqual(
      requests.filter((r) => r.method === "write_file").map((r) => [r.params.path, r.params.mode]),
      [
        ["/workspace/m/x", 0o600],
        ["/workspace/plain", 0o644],
      ],
    );
  });

  test("without onHookError, an after hook's failure is a process warning", async () => {
    const { bin } = fakeRpc();
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on("warning", onWarning);
    const c = new Client({ binaryPath: bin });
    try {
      await c.launch(
        new Sandbox().withVFSInterception({
          rules: [
            {
              name: "loud",
              phase: "after",
              hook: () => {
                throw new Error("boom");
              },
            },
          ],
        }),
      );
      await c.exec("/workspace/x");
      await tick(100);
    } finally {
      await c.close();
      process.off("warning", onWarning);
    }
    assert.ok(
      warnings.some((w) => w instanceof VfsHookError && w.hook === "loud"),
      warnings.map(String).join("\n"),
    );
  });
});
