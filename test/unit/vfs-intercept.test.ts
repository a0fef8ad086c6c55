import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { type FileEvent, globToRegExp, InterceptProvider } from "../../src/vfs/intercept.ts";
import { MemoryProvider } from "../../src/vfs/memory.ts";
import { FuseServer } from "../../src/vfs/server.ts";
import { FakeKernel } from "../helpers/fuse-client.ts";

/** vfs.interception: before rules block with EPERM, events after operations. */

const CALLER = { uid: 0, gid: 0, pid: 1 };

describe("vfs interception", () => {
  test("globs follow Go's filepath.Match: * and ? stay within one component", () => {
    assert.ok(globToRegExp("/workspace/*.env").test("/workspace/.env"));
    assert.ok(globToRegExp("/workspace/*.env").test("/workspace/prod.env"));
    assert.ok(!globToRegExp("/workspace/*.env").test("/workspace/a/prod.env"));
    assert.ok(globToRegExp("/w/[a-c]?").test("/w/bz"));
    assert.ok(!globToRegExp("/w/[^a-c]").test("/w/b"));
    assert.ok(globToRegExp("/w/\\*").test("/w/*"));
    assert.throws(() => globToRegExp("/w/[abc"), /unclosed/);
  });

  test("a before rule blocks with EPERM; the first matching rule wins; unknown ops are refused", async () => {
    const mem = new MemoryProvider();
    await mem.mkdir("/secret", 0o755, CALLER);
    const p = new InterceptProvider(mem, {
      prefix: "/workspace",
      rules: [
        { ops: ["read", "open"], path: "/workspace/secret/ok", action: "allow" },
        { ops: ["create", "open", "read_dir"], path: "/workspace/secret/*", action: "block" },
        { ops: ["readdir"], path: "/workspace/secret", action: "block" },
      ],
    });
    await assert.rejects(p.create("/secret/x", 2, 0o644, CALLER), { code: "EPERM" });
    await assert.rejects(p.readdir("/secret"), { code: "EPERM" });
    await (await mem.create("/secret/ok", 2, 0o644, CALLER)).release();
    await (await p.open("/secret/ok", 0)).release();
    await (await p.create("/free", 2, 0o644, CALLER)).release();
    assert.throws(
      () => new InterceptProvider(mem, { prefix: "/w", rules: [{ ops: ["delete"] }] }),
      /ops: unknown op "delete"/,
    );
  });

  test("events: every op with emitEvents, or only those an after rule matches; through the FUSE server", async () => {
    const events: FileEvent[] = [];
    const p = new InterceptProvider(new MemoryProvider(), {
      prefix: "/workspace",
      rules: [{ phase: "after", ops: ["write"], path: "/workspace/*.log" }],
      onEvent: (e) => events.push(e),
    });
    const k = new FakeKernel(new FuseServer({ provider: p, log: () => {} }));
    await k.init();
    const c = await k.create(1n, "app.log", 2, 0o644);
    await k.write(c.fh, 0, Buffer.from("hello"));
    await k.release(c.fh);
    const d = await k.create(1n, "other.txt", 2, 0o644);
    await k.write(d.fh, 0, Buffer.from("x"));
    assert.deepEqual(
      events.map((e) => [e.op, e.path, e.size]),
      [["write", "/workspace/app.log", 5]],
    );
    const all: FileEvent[] = [];
    const q = new InterceptProvider(new MemoryProvider(), {
      prefix: "/w",
      rules: [],
      emitEvents: true,
      onEvent: (e) => all.push(e),
    });
    await q.mkdir("/d", 0o755, CALLER);
    await q.rename("/d", "/e", 0);
    assert.deepEqual(
      all.map((e) => [e.op, e.path]),
      [
        ["mkdir", "/w/d"],
        ["rename", "/w/e"],
      ],
    );
  });
});
