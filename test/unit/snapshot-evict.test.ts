import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import { evictTemplates, isStale, snapshotMaxBytes } from "../../src/sandbox/snapshots.ts";
import { selfIdentity } from "../../src/state/procs.ts";
import { openState } from "../../src/state/store.ts";

/** The snapshot cap: least recently used templates go first, the one just built stays. */
describe("snapshot cap", () => {
  const home = mkdtempSync(join(tmpdir(), "matchlock-evict-"));
  after(() => rmSync(home, { recursive: true, force: true }));
  const MB = 1024 * 1024;

  test("evicts least recently used ready templates until under the cap; keeps the new one", async () => {
    const state = openState(paths({ ...process.env, MATCHLOCK_HOME: home }));
    try {
      const add = (key: string, mb: number) => {
        const dir = join(home, "snapshots", key);
        mkdirSync(dir, { recursive: true });
        writeFileSync(join(dir, "ram"), "x");
        assert.ok(state.snapshots.claim(key, `img-${key}`, dir, selfIdentity(), {}));
        state.snapshots.markReady(key, mb * MB);
        return dir;
      };
      const dirs: Record<string, string> = {};
      for (const k of ["a", "b", "c", "d"]) {
        dirs[k] = add(k, 100);
        await new Promise((r) => setTimeout(r, 5)); // distinct last_used_at
      }
      state.snapshots.touch("a"); // a is now the most recently used of the old ones
      // One being built is never evicted, whatever its size.
      assert.ok(state.snapshots.claim("e", "img-e", join(home, "snapshots", "e"), selfIdentity(), {}));

      const evicted = await evictTemplates(state, 250 * MB, "d");
      assert.deepEqual(
        evicted.map((r) => r.key),
        ["b", "c"],
      );
      assert.deepEqual(
        state.snapshots
          .list()
          .map((r) => r.key)
          .sort(),
        ["a", "d", "e"],
      );
      assert.equal(existsSync(dirs.b as string), false);
      assert.equal(existsSync(dirs.a as string), true);

      // The one just built stays even when it alone is over the cap.
      assert.deepEqual(
        (await evictTemplates(state, 0, "d")).map((r) => r.key),
        ["a"],
      );
      assert.deepEqual(
        state.snapshots
          .list()
          .map((r) => r.key)
          .sort(),
        ["d", "e"],
      );
    } finally {
      state.close();
    }
  });

  test("a template saved in another format (another version of matchlock) is stale", () => {
    const row = (format: number) => ({
      key: "k",
      image: "i",
      dir: "/nonexistent",
      status: "ready" as const,
      owner_pid: 0,
      owner_start_time: 0,
      inputs_json: JSON.stringify({ format }),
      bytes: 0,
      created_at: "",
      last_used_at: "",
    });
    assert.equal(isStale(row(1)), true);
  });

  test("MATCHLOCK_SNAPSHOT_MAX_MB: default 2048 MiB, 0 allowed, garbage refused by name", () => {
    assert.equal(snapshotMaxBytes({}), 2048 * MB);
    assert.equal(snapshotMaxBytes({ MATCHLOCK_SNAPSHOT_MAX_MB: "0" }), 0);
    assert.equal(snapshotMaxBytes({ MATCHLOCK_SNAPSHOT_MAX_MB: "512" }), 512 * MB);
    assert.throws(
      () => snapshotMaxBytes({ MATCHLOCK_SNAPSHOT_MAX_MB: "lots" }),
      /MATCHLOCK_SNAPSHOT_MAX_MB=lots/,
    );
    assert.throws(() => snapshotMaxBytes({ MATCHLOCK_SNAPSHOT_MAX_MB: "-1" }), /not a number of MiB/);
  });
});
