import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import { openState } from "../../src/state/store.ts";
import { qemuProcessesMentioning, runCli, tempHome } from "../helpers/cli.ts";
import { busyboxLayer, dockerSave } from "../helpers/images.ts";

/**
 * Fast starts: sandboxes restored from snapshot templates. A clone must be its own VM (entropy,
 * boot id, hostname, clock), a changed input must never restore a stale template, a broken one must
 * fall back to a cold boot with the reason logged, and a crash while building or restoring must
 * leave nothing `gc` cannot remove.
 *
 * The test runs on a private copy of the cache (kernel, initramfs, images) so that it can change
 * the initramfs without touching what other tests use.
 */

const h = tempHome();
const cache = mkdtempSync(join(tmpdir(), "matchlock-snapcache-"));
const env = { ...h.env, MATCHLOCK_CACHE: cache };
const p = paths(env);
before(() => {
  execFileSync("cp", ["-a", `${paths().cache}/.`, cache]);
});
after(async () => {
  await runCli(["kill", "--all"], { env });
  h.cleanup();
  rmSync(cache, { recursive: true, force: true });
});

const cli = (args: string[], extra: NodeJS.ProcessEnv = {}) => runCli(args, { env: { ...env, ...extra } });

/**
 * Runs `sh -c script` in a new VM (started with `run -d`, reached with `exec`, as a user would);
 * its stdout and how it started (the VM dir's boot.log). The VM is killed and removed afterwards.
 */
async function runKept(
  script: string,
  flags: string[] = [],
): Promise<{ out: string; boot: string; id: string }> {
  const started = await cli(["run", "-d", ...flags, "--", "sleep", "600"]);
  assert.equal(started.code, 0, started.stderr);
  const id = started.stdout.toString().trim();
  assert.match(id, /^vm-[0-9a-f]{8}$/);
  try {
    const r = await cli(["exec", id, "--", "sh", "-c", script]);
    assert.equal(r.code, 0, r.stderr);
    const boot = readFileSync(join(p.vms, id, "boot.log"), "utf8");
    return { out: r.stdout.toString(), boot, id };
  } finally {
    await cli(["kill", id]);
    await cli(["rm", id]);
  }
}

interface SnapshotRow {
  key: string;
  status: string;
  network: boolean;
  host_folders: boolean;
}
async function snapshots(): Promise<SnapshotRow[]> {
  const r = await cli(["snapshot", "ls", "--json"]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout.toString()) as SnapshotRow[];
}

const IDENTITY =
  "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/boot_id; " +
  "cat /proc/sys/kernel/random/uuid; hostname; cat /etc/hostname; date +%s";

describe("restored clones", () => {
  test("the first run builds the snapshot, later runs restore it, and each clone is its own VM", async () => {
    const first = await runKept(IDENTITY, ["--hostname", "first"]);
    assert.match(first.boot, /restored from snapshot [0-9a-f]{16}/);
    // where the start went, phase by phase
    assert.match(first.boot, /ready in \d+ ms: .*\bqemu \d+, identity \d+, etc \d+/);
    const rows = await snapshots();
    assert.equal(rows.length, 1);
    assert.equal(rows[0]?.status, "ready");
    assert.equal(rows[0]?.network, true);

    const clones = [first];
    for (const name of ["second", "third"]) {
      const c = await runKept(IDENTITY, ["--hostname", name]);
      assert.match(c.boot, new RegExp(`restored from snapshot ${rows[0]?.key}`));
      clones.push(c);
    }
    assert.equal((await snapshots()).length, 1, "no second snapshot was built");

    const fields = clones.map((c) => c.out.trim().split("\n"));
    for (const [i, name] of ["first", "second", "third"].entries()) {
      const f = fields[i] as string[];
      assert.equal(f[3], name, "hostname");
      assert.equal(f[4], name, "/etc/hostname");
      const skew = Math.abs(Number(f[5]) - Date.now() / 1000);
      assert.ok(skew < 30, `clock within 30 s of the host's (${f[5]}, skew ${skew} s)`);
    }
    // urandom, boot_id and a fresh uuid: whatever differs after a cold boot differs between clones.
    for (const k of [0, 1, 2]) {
      const values = new Set(fields.map((f) => f[k]));
      assert.equal(values.size, 3, `field ${k} differs in every clone: ${[...values]}`);
    }
  });

  test("a clone's network, folders and exec work as after a cold boot", async () => {
    const dir = mkdtempSync(join(tmpdir(), "matchlock-snapfolder-"));
    writeFileSync(join(dir, "hello.txt"), "from the host\n");
    try {
      // twice: the first builds the host-folder variant's snapshot, the second restores it
      for (let i = 0; i < 2; i++) {
        const r = await runKept(
          "cat /workspace/data/hello.txt; echo made > /workspace/data/out.txt; ip -4 addr show eth0 | grep -c inet",
          ["-v", `${dir}:/workspace/data:host_fs`],
        );
        assert.match(r.boot, /restored from snapshot/);
        assert.equal(r.out, "from the host\n1\n");
        assert.equal(readFileSync(join(dir, "out.txt"), "utf8"), "made\n");
      }
      const rows = await snapshots();
      assert.ok(
        rows.some((r) => r.host_folders),
        "a snapshot with the folder port",
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("--cold, MATCHLOCK_COLD=1 and extra disks boot cold and say why", async () => {
    // eth0 as a cold boot configures it (a clone only sets the address on a link its template brought up)
    const cold = await runKept(
      "echo ok; ip -4 addr show eth0 | grep -c 'inet 10\\.'; cat /sys/class/net/eth0/mtu; ip route | grep -c '^default via'",
      ["--cold", "--mtu", "1400"],
    );
    assert.equal(cold.out, "ok\n1\n1400\n1\n");
    assert.match(cold.boot, /cold boot: --cold/);
    assert.match(cold.boot, /ready in \d+ ms: .*\bdisk \d+, .*\bboot \d+/);
    const clone = await runKept(
      "cat /sys/class/net/eth0/mtu; cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6",
      ["--mtu", "1400"],
    );
    assert.match(clone.boot, /restored from snapshot/);
    assert.equal(clone.out, "1400\n1\n");
    const env1 = await cli(["run", "-d", "--", "sleep", "600"], { MATCHLOCK_COLD: "1" });
    assert.equal(env1.code, 0, env1.stderr);
    const id = env1.stdout.toString().trim();
    assert.match(readFileSync(join(p.vms, id, "boot.log"), "utf8"), /cold boot: MATCHLOCK_COLD=1/);
    await cli(["kill", id]);
    const volume = await cli(["volume", "create", "snapvol", "--size", "64"]);
    assert.equal(volume.code, 0, volume.stderr);
    const disk = await runKept("echo ok", ["--disk", "@snapvol:/mnt/vol"]);
    assert.equal(disk.out, "ok\n");
    assert.match(disk.boot, /cold boot: extra disks are attached at boot/);
  });
});

describe("stale and broken snapshots", () => {
  test("a changed initramfs (agent) or image is a new snapshot, never a stale restore; snapshot gc removes the old", async () => {
    const before = (await snapshots()).map((r) => r.key);
    // Rebuilt files are new files (write + rename): same bytes, new inode and mtime.
    const initramfs = join(p.guest, "initramfs.cpio");
    copyFileSync(initramfs, `${initramfs}.new`);
    renameSync(`${initramfs}.new`, initramfs);
    const r = await runKept("echo ok");
    assert.equal(r.out, "ok\n");
    const rows = await snapshots();
    const fresh = rows.filter((x) => !before.includes(x.key));
    assert.equal(fresh.length, 1, "one new snapshot for the new initramfs");
    assert.match(r.boot, new RegExp(`restored from snapshot ${fresh[0]?.key}`));
    assert.ok(
      rows.filter((x) => before.includes(x.key)).every((x) => x.status === "stale"),
      "the old ones are listed as stale",
    );
    const gc = await cli(["snapshot", "gc"]);
    assert.equal(gc.code, 0, gc.stderr);
    assert.match(gc.stdout.toString(), /removed\s+inputs changed/);
    assert.deepEqual(
      (await snapshots()).map((x) => x.key),
      [fresh[0]?.key],
    );
  });

  test("a truncated device state falls back to a cold boot with the reason in boot.log, then a missing RAM file rebuilds", async () => {
    const [row] = await snapshots();
    assert.ok(row);
    const dir = join(p.home, "snapshots", row.key);
    truncateSync(join(dir, "state"), 1000);
    const r = await runKept("echo ok");
    assert.equal(r.out, "ok\n");
    assert.match(r.boot, /could not be restored \(.+\); booting cold/);

    rmSync(join(dir, "ram"));
    const again = await runKept("echo ok");
    assert.equal(again.out, "ok\n");
    assert.match(again.boot, /restored from snapshot/, "rebuilt and restored");
    assert.ok(existsSync(join(dir, "ram")));
  });

  test("removing an image removes its snapshots", async () => {
    const tag = "snaptest/removable:1";
    const imp = await runCli(["image", "import", tag], {
      env,
      input: await dockerSave({ layers: [await busyboxLayer()] }, tag),
    });
    assert.equal(imp.code, 0, imp.stderr);
    const r = await runKept("echo ok", ["--image", tag]);
    assert.match(r.boot, /restored from snapshot/);
    const rm = await cli(["image", "rm", tag]);
    assert.equal(rm.code, 0, rm.stderr);
    const s = openState(p);
    try {
      assert.ok(!s.snapshots.list().some((x) => x.image.includes("snaptest/removable")));
    } finally {
      s.close();
    }
  });
});

describe("crashes while building or restoring", () => {
  for (const phase of ["snapshot-building", "snapshot-saved", "restoring"]) {
    test(`SIGKILL at ${phase}, then gc: nothing is left`, async () => {
      if (phase !== "restoring") {
        const rm = await cli(["snapshot", "rm", "--all"]);
        assert.equal(rm.code, 0, rm.stderr);
      }
      const r = await cli(["run", "--", "true"], {
        MATCHLOCK_TEST_CRASH_AT: phase,
        MATCHLOCK_TEST_NO_PDEATHSIG: "1",
      });
      assert.equal(r.signal, "SIGKILL", `the owner should have died at ${phase}: ${r.stderr}`);
      const gc = await cli(["gc"]);
      assert.equal(gc.code, 0, gc.stdout.toString() + gc.stderr);
      assert.deepEqual(qemuProcessesMentioning(h.home), [], "no QEMU left");
      const rows = await snapshots();
      assert.ok(
        rows.every((x) => x.status === "ready"),
        `no build left: ${JSON.stringify(rows)}`,
      );
      const dirs = existsSync(join(p.home, "snapshots")) ? readdirSync(join(p.home, "snapshots")) : [];
      assert.deepEqual(dirs.sort(), rows.map((x) => x.key).sort(), "only ready snapshots have files");
      for (const id of readdirSync(p.vms)) {
        const left = existsSync(join(p.vms, id))
          ? readdirSync(join(p.vms, id)).filter((f) => /\.(ext4|sock)$/.test(f))
          : [];
        assert.deepEqual(left, [], `${id}: disks and sockets removed`);
      }
      // and the next run works (restoring, or building again)
      const ok = await cli(["run", "--", "echo", "ok"]);
      assert.equal(ok.stdout.toString(), "ok\n", ok.stderr);
    });
  }
});

describe("the cap on snapshots' disk use", () => {
  test("a new snapshot over MATCHLOCK_SNAPSHOT_MAX_MB evicts the least recently used; a bad value is refused", async () => {
    const before = (await snapshots()).map((r) => r.key);
    assert.ok(before.length > 0, "earlier tests left snapshots");
    const capped = { MATCHLOCK_SNAPSHOT_MAX_MB: "1" };
    const started = await cli(["run", "-d", "--memory", "384", "--", "sleep", "600"], capped);
    assert.equal(started.code, 0, started.stderr);
    const id = started.stdout.toString().trim();
    try {
      const r = await cli(["exec", id, "--", "echo", "ok"]);
      assert.equal(r.stdout.toString(), "ok\n", r.stderr);
      const boot = readFileSync(join(p.vms, id, "boot.log"), "utf8");
      assert.match(
        boot,
        /removed the least recently used snapshot [0-9a-f]{16} .* MATCHLOCK_SNAPSHOT_MAX_MB/,
      );
      assert.match(boot, /restored from snapshot/);
    } finally {
      await cli(["kill", id]);
    }
    const after = await snapshots();
    assert.equal(after.length, 1, `only the new one stays: ${JSON.stringify(after)}`);
    assert.ok(!before.includes(after[0]?.key as string));
    assert.deepEqual(readdirSync(join(p.home, "snapshots")), [after[0]?.key]);

    const bad = await cli(["run", "--", "true"], { MATCHLOCK_SNAPSHOT_MAX_MB: "lots" });
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /MATCHLOCK_SNAPSHOT_MAX_MB=lots is not a number of MiB/);
    assert.doesNotMatch(bad.stderr, /\n\s+at /, "no stack trace");
  });
});
