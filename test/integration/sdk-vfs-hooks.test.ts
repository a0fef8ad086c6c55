import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Client, MatchlockError, Sandbox, type VFSHookEvent, VfsHookError } from "../../src/sdk/index.ts";
import { tempHome } from "../helpers/cli.ts";

/**
 * The SDK's local VFS hooks (Matchlock's `hook`, `dangerousHook`, `mutateHook`, `actionHook`)
 * against a real VM: one VM with a memory folder at /workspace/m and one rule per test, each on its
 * own subfolder, so the tests share the VM without seeing each other's events. No rule asks for
 * emit_events: the SDK turns it on because there are after hooks.
 */

const h = tempHome();
const M = "/workspace/m";

const audit: VFSHookEvent[] = [];
const safe = { runs: 0, finished: 0 };
const danger = { paths: [] as string[], active: 0, maxActive: 0, cat: [] as string[] };
const hookErrors: VfsHookError[] = [];

// The hooks below call this client (a safe hook through the closure, as Matchlock's example does).
const c = new Client({ env: h.env, onHookError: (e) => hookErrors.push(e) });

const sandbox = new Sandbox()
  .withNoNetwork()
  .withMemory(256)
  .mountMemory(M)
  .withVFSInterception({
    rules: [
      {
        name: "audit",
        phase: "after",
        ops: ["write"],
        path: `${M}/audit/*`,
        hook: (e) => void audit.push(e),
      },
      {
        name: "safe-writer",
        phase: "after",
        ops: ["write"],
        path: `${M}/safe/**`,
        hook: async () => {
          safe.runs++;
          // A write of its own under the same glob: its event arrives while this hook runs.
          await c.writeFile(`${M}/safe/hook-${safe.runs}.txt`, "from the hook\n");
          safe.finished++;
        },
      },
      {
        name: "re-enter",
        phase: "after",
        ops: ["write"],
        path: `${M}/danger/*`,
        dangerousHook: async (client, e) => {
          danger.active++;
          danger.maxActive = Math.max(danger.maxActive, danger.active);
          danger.paths.push(e.path);
          try {
            if (e.path.endsWith("/trigger.txt")) {
              await client.writeFile(`${M}/danger/echo.txt`, "echo from the hook\n");
              danger.cat.push((await client.exec(`cat ${M}/danger/echo.txt`)).stdout);
            }
          } finally {
            danger.active--;
          }
        },
      },
      {
        name: "stamp",
        phase: "before",
        ops: ["write"],
        path: `${M}/mut/*`,
        mutateHook: (q) => `mutated size=${q.size} mode=${q.mode.toString(8)}\n`,
      },
      {
        name: "locked",
        path: `${M}/locked/**`,
        actionHook: (q) => (q.op === "read" || q.op === "write" || q.op === "readdir" ? "block" : "allow"),
      },
      {
        name: "boom",
        phase: "after",
        ops: ["write"],
        path: `${M}/boom/*`,
        hook: () => {
          throw new Error("safe hook exploded");
        },
      },
      {
        name: "boom-async",
        phase: "after",
        ops: ["write"],
        path: `${M}/boom/*`,
        dangerousHook: async () => Promise.reject(new Error("dangerous hook exploded")),
      },
    ],
  });

/** Waits until `cond` holds (hooks run after the call that caused them returns). */
async function until(cond: () => boolean, what: string, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function sh(script: string): Promise<string> {
  const r = await c.exec(script);
  assert.equal(r.exitCode, 0, r.stderr);
  return r.stdout;
}

before(async () => {
  await c.launch(sandbox);
  await sh(`mkdir -p ${M}/audit ${M}/safe ${M}/danger ${M}/mut ${M}/locked ${M}/boom`);
});
after(async () => {
  await c.close();
  await c.remove().catch(() => {});
  h.cleanup();
});

describe("after hooks on the guest's file operations", () => {
  test("hook: sees the guest's write under its glob (op, path, size), not writes elsewhere", async () => {
    await sh(`printf hello > ${M}/audit/a.txt; printf 'not this' > ${M}/elsewhere.txt; mkdir ${M}/audit/sub`);
    await until(() => audit.length > 0, "the audit hook");
    await new Promise((r) => setTimeout(r, 300));
    const a = audit.find((e) => e.path === `${M}/audit/a.txt`);
    assert.ok(a, JSON.stringify(audit));
    assert.equal(a.op, "write");
    assert.equal(a.size, 5);
    assert.ok(
      audit.every((e) => e.op === "write" && e.path.startsWith(`${M}/audit/`)),
      JSON.stringify(audit),
    );
  });

  test("hook: what a safe hook writes itself does not run it again", async () => {
    await sh(`echo go > ${M}/safe/trigger.txt`);
    await until(() => safe.finished === 1, "the safe hook");
    // Long enough for any event its own write caused to have arrived and been dropped.
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(safe.runs, 1);
    assert.equal(await sh(`ls ${M}/safe`), "hook-1.txt\ntrigger.txt\n");
    assert.equal(await sh(`cat ${M}/safe/hook-1.txt`), "from the hook\n");
  });

  test("dangerousHook: calls the client (writeFile, exec); its own write runs it again, concurrently", async () => {
    await sh(`echo go > ${M}/danger/trigger.txt`);
    await until(() => danger.cat.length === 1 && danger.active === 0, "the dangerous hook");
    assert.deepEqual(danger.cat, ["echo from the hook\n"]);
    assert.ok(danger.paths.includes(`${M}/danger/trigger.txt`), JSON.stringify(danger.paths));
    assert.ok(danger.paths.includes(`${M}/danger/echo.txt`), "re-entered for the hook's own write");
    assert.equal(danger.maxActive, 2, "the re-entry ran while the first call was still inside the hook");
  });

  test("a hook that throws (safe or dangerous) is reported to onHookError and the client goes on", async () => {
    await sh(`echo x > ${M}/boom/f.txt`);
    await until(() => hookErrors.length >= 2, "two hook errors");
    assert.deepEqual(hookErrors.map((e) => [e.code, e.hook, e.op, e.path]).sort(), [
      ["VFS_HOOK_FAILED", "boom", "write", `${M}/boom/f.txt`],
      ["VFS_HOOK_FAILED", "boom-async", "write", `${M}/boom/f.txt`],
    ]);
    for (const e of hookErrors) assert.match(String((e.cause as Error).message), /hook exploded/);
    assert.equal(await sh("echo still here"), "still here\n");
    // The safe flag came down after the failure: the next matching write runs the safe hook again.
    await sh(`echo y > ${M}/boom/g.txt`);
    await until(() => hookErrors.length >= 4, "the hooks running again");
  });
});

describe("before hooks on the client's own file calls", () => {
  test("mutateHook: changes what writeFile / writeFileMode store (read back with cat)", async () => {
    await c.writeFileMode(`${M}/mut/a.txt`, "original content", 0o600);
    assert.equal(await sh(`cat ${M}/mut/a.txt`), "mutated size=16 mode=600\n");
    await c.writeFile(`${M}/mut/b.txt`, "xy");
    assert.equal(await sh(`cat ${M}/mut/b.txt; stat -c %a ${M}/mut/b.txt`), "mutated size=2 mode=644\n644\n");
    // Outside the glob, content is written as given.
    await c.writeFile(`${M}/plain.txt`, "as given\n");
    assert.equal(await sh(`cat ${M}/plain.txt`), "as given\n");
  });

  test("actionHook: blocks writeFile, readFile and listFiles with Matchlock's error; the guest itself is not affected", async () => {
    await sh(`echo guest > ${M}/locked/f.txt`);
    const blocked = (op: string, path: string) => (e: Error) => {
      assert.ok(e instanceof VfsHookError && e instanceof MatchlockError, String(e));
      assert.equal(e.code, "VFS_HOOK_BLOCKED");
      assert.equal(e.message, `vfs action hook blocked operation: op=${op} path=${path} hook="locked"`);
      return true;
    };
    await assert.rejects(c.writeFile(`${M}/locked/f.txt`, "from sdk"), blocked("write", `${M}/locked/f.txt`));
    await assert.rejects(c.readFile(`${M}/locked/f.txt`), blocked("read", `${M}/locked/f.txt`));
    await assert.rejects(c.listFiles(`${M}/locked/sub`), blocked("readdir", `${M}/locked/sub`));
    assert.equal(await sh(`cat ${M}/locked/f.txt`), "guest\n", "the blocked write never reached the guest");
    assert.equal((await c.readFile(`${M}/plain.txt`)).toString(), "as given\n", "other paths still read");
  });
});
