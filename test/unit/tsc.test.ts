import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { type TscSources, tscKhz } from "../../src/vm/qemu/tsc.ts";

/** The TSC frequency for TCG guests: `dmesg` is spawned once per host boot, not once per VM. */

const dir = mkdtempSync(join(tmpdir(), "matchlock-tsc-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function host(opts: { bootId?: string; sysfs?: string; log?: string; cpuinfo?: string } = {}) {
  const calls = { dmesg: 0 };
  const src: TscSources = {
    sysfs: async () => {
      if (opts.sysfs === undefined) throw new Error("ENOENT");
      return opts.sysfs;
    },
    bootId: async () => `${opts.bootId ?? "b1"}\n`,
    dmesg: async () => {
      calls.dmesg++;
      return opts.log ?? "[    0.000000] tsc: Detected 2096.040 MHz processor\n";
    },
    cpuinfo: async () => opts.cpuinfo ?? "cpu MHz\t\t: 1999.999\n",
  };
  return { src, calls };
}

describe("TSC frequency", () => {
  test("the boot log's answer is cached with the boot id and read back without dmesg", async () => {
    const file = join(dir, "a.json");
    const first = host();
    assert.equal(await tscKhz(file, first.src), 2_096_040);
    assert.equal(first.calls.dmesg, 1);
    assert.deepEqual(JSON.parse(readFileSync(file, "utf8")), { boot_id: "b1", khz: 2_096_040 });
    const again = host({ log: "tsc: Detected 1.000 MHz processor" });
    assert.equal(await tscKhz(file, again.src), 2_096_040);
    assert.equal(again.calls.dmesg, 0);
  });

  test("after a host reboot (new boot id) it is probed again", async () => {
    const file = join(dir, "b.json");
    writeFileSync(file, JSON.stringify({ boot_id: "old", khz: 1 }));
    const h = host({ bootId: "new", log: "tsc: Refined TSC clocksource calibration: 2400.5 MHz" });
    assert.equal(await tscKhz(file, h.src), 2_400_500);
    assert.equal(h.calls.dmesg, 1);
    assert.equal(JSON.parse(readFileSync(file, "utf8")).boot_id, "new");
  });

  test("a corrupt cache is probed over; sysfs needs neither cache nor dmesg", async () => {
    const file = join(dir, "c.json");
    writeFileSync(file, "{not json");
    assert.equal(await tscKhz(file, host().src), 2_096_040);
    const s = host({ sysfs: "3000000\n" });
    assert.equal(await tscKhz(join(dir, "none.json"), s.src), 3_000_000);
    assert.equal(s.calls.dmesg, 0);
  });

  test("an unwritable cache dir only costs the probe; no dmesg answer falls back to /proc/cpuinfo", async () => {
    const notADir = join(dir, "file");
    writeFileSync(notADir, ""); // a cache path under a file: no writing there, even as root
    const h = host({ log: "" });
    assert.equal(await tscKhz(join(notADir, "tsc.json"), h.src), 1_999_999);
    assert.equal(await tscKhz(undefined, host().src), 2_096_040);
  });
});
