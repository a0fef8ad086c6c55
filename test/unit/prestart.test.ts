import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { parseSandboxConfig, type SandboxConfigInput } from "../../src/api/config.ts";
import { paths } from "../../src/api/paths.ts";
import { prestartHint } from "../../src/api/prestart.ts";
import { Prestart, sparesDir, sweepSpares } from "../../src/sandbox/prestart.ts";
import { variantOf } from "../../src/sandbox/snapshots.ts";
import { selfIdentity } from "../../src/state/procs.ts";

/** Clones made ahead of time: the SDK's hint, and the leftovers `gc` removes. */
describe("clones made ahead of time", () => {
  const home = mkdtempSync(join(tmpdir(), "matchlock-prestart-"));
  after(() => rmSync(home, { recursive: true, force: true }));
  const p = paths({ ...process.env, MATCHLOCK_HOME: home });

  const configs: SandboxConfigInput[] = [
    {},
    { image: "alpine:3.20", resources: { memory_mb: 256, cpus: 2, disk_size_mb: 2048 } },
    { network: { no_network: true } },
    { vfs: { mounts: { "/data": { type: "memory" } } } },
    { vfs: { interception: { emit_events: true } } },
  ];

  test("the hint picks the same snapshot as the config it comes from", () => {
    for (const c of configs) {
      const hint = prestartHint(c);
      assert.ok(hint !== undefined);
      const parsed = parseSandboxConfig(JSON.parse(hint));
      const full = parseSandboxConfig(c);
      assert.deepEqual(variantOf(parsed), variantOf(full), JSON.stringify(c));
      assert.equal(parsed.image, full.image);
    }
  });

  test("the hint carries no secret, env, allowed host or host path", () => {
    const hint = prestartHint({
      env: { TOKEN: "env-secret-1" },
      network: {
        allowed_hosts: ["api.example.test"],
        secrets: { KEY: { value: "wire-secret-2", hosts: ["api.example.test"] } },
      },
      vfs: { mounts: { "/w": { type: "host_fs", host_path: "/home/someone/private" } } },
    });
    assert.ok(hint !== undefined);
    for (const word of ["env-secret-1", "wire-secret-2", "api.example.test", "/home/someone"]) {
      assert.doesNotMatch(hint, new RegExp(word), word);
    }
  });

  test("a config that does not parse gives no hint; a bad hint, MATCHLOCK_COLD=1 or MATCHLOCK_PRESTART=0, no holder", () => {
    assert.equal(prestartHint({ resources: { memory_mb: -1 } }), undefined);
    assert.equal(Prestart.fromHint(p, "{not json"), undefined);
    assert.equal(Prestart.fromHint(p, JSON.stringify({ resources: { cpus: "two" } })), undefined);
    assert.ok(Prestart.fromHint(p, "{}") instanceof Prestart);
    for (const [name, value] of [
      ["MATCHLOCK_COLD", "1"],
      ["MATCHLOCK_PRESTART", "0"],
    ] as const) {
      process.env[name] = value;
      try {
        assert.equal(Prestart.fromHint(p, "{}"), undefined, name);
      } finally {
        delete process.env[name];
      }
    }
  });

  test("with no ready snapshot a holder makes nothing: no build, no dir, no clone to take", async () => {
    const holder = Prestart.fromHint(p, "{}");
    assert.ok(holder);
    holder.prepare();
    assert.equal(await holder.take("0123456789abcdef"), undefined);
    holder.prepare();
    await holder.discard();
    assert.equal(existsSync(sparesDir(p)), false);
    assert.equal(existsSync(join(home, "snapshots")), false);
  });

  test("gc removes the dirs of owners that are gone, and leaves a live owner's", async () => {
    const me = selfIdentity();
    const mine = `${me.pid}-${me.start_time}-0a0b0c0d`;
    const dead = `${me.pid}-${me.start_time + 1}-01020304`; // same pid, another start: another process
    const stray = "not-a-spare";
    for (const n of [mine, dead, stray]) mkdirSync(join(sparesDir(p), n), { recursive: true });
    assert.deepEqual((await sweepSpares(p)).sort(), [dead, stray].sort());
    assert.ok(existsSync(join(sparesDir(p), mine)));
    assert.equal(existsSync(join(sparesDir(p), dead)), false);
  });
});
