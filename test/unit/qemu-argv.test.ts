import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { DiskSpec, VmSpec } from "../../src/vm/backend.ts";
import { deviceSignature, kernelCmdline, qemuArgv } from "../../src/vm/qemu/argv.ts";
import { guestNeedsRng } from "../../src/vm/qemu/rng.ts";

const spec: VmSpec = {
  id: "vm-00000000",
  dir: "/tmp/vm",
  kernel: "/k/vmlinux",
  initramfs: "/k/initramfs.cpio",
  kernelArgs: ["matchlock.hostname=h"],
  cpus: 1.5,
  memoryMb: 256,
  disks: [
    { path: "/img/base,odd.ext4", readonly: true },
    { path: "/tmp/vm/upper.ext4", readonly: false },
  ],
  accel: "tcg",
};
const paths = {
  agentSocket: "/tmp/vm/agent.sock",
  qmpSocket: "/tmp/vm/qmp.sock",
  vfsSocket: "/tmp/vm/vfs.sock",
  consoleLog: "/tmp/vm/console.log",
};

describe("QEMU command line", () => {
  test("microvm with an RTC, fractional CPUs rounded up, memory in MB", () => {
    const a = qemuArgv(spec, paths, { khz: 2_100_000 });
    assert.match(a[a.indexOf("-M") + 1] as string, /^microvm,.*rtc=on/);
    assert.equal(a[a.indexOf("-smp") + 1], "2");
    assert.equal(a[a.indexOf("-m") + 1], "256M");
    assert.ok(a.includes("-no-reboot"));
  });

  test("disks in order, the base read-only, commas in paths escaped", () => {
    const drives = qemuArgv(spec, paths, undefined).filter((x) => x.startsWith("id=disk"));
    assert.equal(drives.length, 2);
    assert.match(drives[0] as string, /file=\/img\/base,,odd\.ext4,.*readonly=on/);
    assert.doesNotMatch(drives[1] as string, /readonly/);
  });

  test("TSC hints only under TCG, with lpj for HZ=250", () => {
    const tcg = kernelCmdline(spec, { khz: 2_100_000 });
    assert.match(tcg, /tsc_early_khz=2100000 lpj=8400000/);
    assert.match(tcg, /matchlock\.hostname=h$/);
    assert.doesNotMatch(kernelCmdline({ ...spec, accel: "kvm" }, { khz: 2_100_000 }), /tsc_early_khz/);
    assert.doesNotMatch(kernelCmdline(spec, { khz: 0 }), /tsc_early_khz/);
  });

  test("the crypto self-tests are skipped, under TCG and KVM alike", () => {
    assert.match(kernelCmdline(spec, { khz: 2_100_000 }), /(^| )cryptomgr\.notests=1( |$)/);
    assert.match(kernelCmdline({ ...spec, accel: "kvm" }, undefined), /(^| )cryptomgr\.notests=1( |$)/);
  });

  test("virtio-rng only when asked for, and then the agent is told to load its driver", () => {
    const without = qemuArgv(spec, paths, undefined);
    assert.ok(!without.includes("virtio-rng-device"));
    assert.doesNotMatch(kernelCmdline(spec, undefined), /matchlock\.rng/);
    const withRng = qemuArgv({ ...spec, rng: true }, paths, undefined);
    assert.equal(withRng[withRng.indexOf("virtio-rng-device") - 1], "-device");
    assert.match(kernelCmdline({ ...spec, rng: true }, undefined), /(^| )matchlock\.rng=1( |$)/);
  });

  test("a guest needs virtio-rng only under KVM on a host CPU without RDRAND", async () => {
    const cpu = (flags: string) => async () => `processor\t: 0\nflags\t\t: fpu ${flags} sse\n`;
    assert.equal(await guestNeedsRng("tcg", cpu("")), false, "TCG's -cpu max emulates RDRAND");
    assert.equal(await guestNeedsRng("kvm", cpu("rdrand rdseed")), false);
    assert.equal(await guestNeedsRng("kvm", cpu("rdseed")), true);
    assert.equal(await guestNeedsRng("kvm", cpu("nordrand_x")), true, "whole flags only");
    const unreadable = async (): Promise<string> => {
      throw new Error("EACCES");
    };
    assert.equal(await guestNeedsRng("kvm", unreadable), true, "unknown: keep the device");
  });

  test("the agent port is a virtserialport named agent on a client socket", () => {
    const a = qemuArgv(spec, paths, undefined).join(" ");
    assert.match(a, /socket,id=agent,path=\/tmp\/vm\/agent\.sock /);
    assert.match(a, /virtserialport,chardev=agent,name=agent/);
    assert.match(a, /-mon chardev=qmp,mode=control/);
    assert.doesNotMatch(a, /vfs/, "no vfs port unless host folders are asked for");
  });

  test("host folders add a second port, vfs, on its own client socket", () => {
    const a = qemuArgv({ ...spec, vfs: true }, paths, undefined).join(" ");
    assert.match(a, /virtio-serial-device,max_ports=3/);
    assert.match(a, /socket,id=vfs,path=\/tmp\/vm\/vfs\.sock /);
    assert.match(a, /virtserialport,chardev=vfs,name=vfs/);
  });

  test("a snapshot template's RAM is a shared file; a clone maps it private and waits for its state", () => {
    const tpl = qemuArgv({ ...spec, ram: { file: "/s/k,1/ram", shared: true } }, paths, undefined);
    assert.match(tpl[tpl.indexOf("-M") + 1] as string, /,memory-backend=ram$/);
    assert.equal(
      tpl[tpl.indexOf("-object") + 1],
      "memory-backend-file,id=ram,size=256M,mem-path=/s/k,,1/ram,share=on",
    );
    assert.ok(!tpl.includes("-incoming"));
    const clone = qemuArgv(
      { ...spec, ram: { file: "/s/k/ram", shared: false }, restoreFrom: "/s/k/state" },
      paths,
      undefined,
    );
    assert.match(clone.join(" "), /mem-path=\/s\/k\/ram,share=off/);
    assert.equal(clone[clone.indexOf("-incoming") + 1], "defer");
    assert.ok(!clone.includes("-kernel") && !clone.includes("-append"), "a restore loads no kernel");
    // Apart from the RAM file's sharing, the kernel and -incoming, the clone's devices are the template's.
    const strip = (a: string[]) =>
      a
        .join(" ")
        .replace(/share=\w+/, "")
        .replace(/ -kernel \S+ -initrd \S+ -append .*? -chardev/, " -chardev")
        .replace(" -incoming defer", "");
    assert.equal(strip(clone).replace("/s/k/ram", "/s/k,,1/ram"), strip(tpl));
  });

  test("the device signature ignores host paths and TAP names, and sees every device", () => {
    const nic = { tap: "fc-00000001", mac: "02:00:00:00:00:01" };
    const tpl = deviceSignature(
      qemuArgv({ ...spec, nic, ram: { file: "/s/k/ram", shared: true } }, paths, { khz: 1 }),
    );
    const clonePaths = { ...paths, agentSocket: "/other/agent.sock", consoleLog: "/other/console.log" };
    const clone = deviceSignature(
      qemuArgv(
        {
          ...spec,
          dir: "/other",
          disks: [spec.disks[0] as DiskSpec, { path: "/other/upper.ext4", readonly: false }],
          nic: { ...nic, tap: "fc-00000002" },
          ram: { file: "/s/k/ram", shared: false },
          restoreFrom: "/s/k/state",
        },
        clonePaths,
        { khz: 1 },
      ),
    );
    assert.equal(clone, tpl);
    assert.match(tpl, /-device virtio-net-device/);
    const withRng = deviceSignature(
      qemuArgv({ ...spec, nic, rng: true, ram: { file: "/s/k/ram", shared: false } }, paths, { khz: 1 }),
    );
    assert.notEqual(withRng, tpl, "an extra device is another signature");
    const noNic = deviceSignature(
      qemuArgv({ ...spec, ram: { file: "/s/k/ram", shared: false } }, paths, { khz: 1 }),
    );
    assert.notEqual(noNic, tpl);
  });
});
