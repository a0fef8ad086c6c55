import type { VmSpec } from "../backend.ts";

/** Builds the `qemu-system-x86_64 -M microvm` command line for a VM. Pure: unit-tested. */

export const QEMU_BINARY = "qemu-system-x86_64";

export interface QemuPaths {
  agentSocket: string;
  vfsSocket: string;
  qmpSocket: string;
  consoleLog: string;
}

export interface TscHints {
  /** Host TSC frequency in kHz; under TCG the guest's TSC runs at the host's rate. */
  khz: number;
}

/** Kernel command line. `quiet`: every console byte costs time under TCG. */
export function kernelCmdline(spec: VmSpec, tsc: TscHints | undefined): string {
  const words = [
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "reboot=t",
    "rdinit=/init",
    "i8042.noaux",
    "i8042.nokbd",
    // No boot-time self-tests of the kernel's crypto algorithms: they cost ~0.3 s of a TCG boot and
    // check the distribution kernel's own code, which does not change from boot to boot.
    "cryptomgr.notests=1",
  ];
  if (spec.rng) words.push("matchlock.rng=1"); // the agent loads virtio_rng only then
  if (spec.accel === "tcg" && tsc && tsc.khz > 0) {
    // Early TSC calibration fails at random on a busy host under TCG and the guest hangs; giving the
    // frequency and the delay-loop constant (HZ=250 in Debian kernels) skips both calibrations.
    words.push(
      `tsc_early_khz=${Math.round(tsc.khz)}`,
      `lpj=${Math.round((tsc.khz * 1000) / 250)}`,
      "tsc=reliable",
    );
  }
  words.push(...spec.kernelArgs);
  return words.join(" ");
}

/**
 * What a saved device state must match: machine, CPU, memory and every device in order, without the
 * host-side paths, sockets and TAP names that differ between a snapshot's template and its clones.
 * QEMU may load a state into a different device set without noticing (devices sit on numbered
 * virtio-mmio slots), so a restore compares this first.
 */
export function deviceSignature(argv: readonly string[]): string {
  const out: string[] = [];
  for (let i = 0; i < argv.length - 1; i++) {
    const flag = argv[i] as string;
    const value = argv[i + 1] as string;
    if (["-M", "-accel", "-cpu", "-smp", "-m", "-device"].includes(flag)) out.push(`${flag} ${value}`);
    else if (flag === "-object")
      out.push(
        `${flag} ${value
          .split(",")
          .filter((o) => !/^(mem-path|share)=/.test(o))
          .join(",")}`,
      );
    else if (flag === "-netdev")
      out.push(
        `${flag} ${value
          .split(",")
          .filter((o) => !o.startsWith("ifname="))
          .join(",")}`,
      );
  }
  return out.join("\n");
}

/** QEMU option values separate on commas; a literal comma is written twice. */
export function optValue(v: string): string {
  return v.replaceAll(",", ",,");
}

export function qemuArgv(spec: VmSpec, paths: QemuPaths, tsc: TscHints | undefined): string[] {
  const smp = Math.max(1, Math.ceil(spec.cpus));
  const args = [
    "-M",
    // rtc=on: without an RTC the kernel spends ~2 s (two 1 s timeouts) probing for one.
    `microvm,x-option-roms=off,rtc=on,isa-serial=on${spec.ram ? ",memory-backend=ram" : ""}`,
    "-accel",
    spec.accel,
    "-cpu",
    "max", // `-cpu host` fails on some nested hosts (MSR 0x10a); `max` is host-like under KVM too
    "-smp",
    String(smp),
    "-m",
    `${spec.memoryMb}M`,
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    // A restore loads a running guest: no kernel to load (QEMU would read the 50 MB ELF for nothing).
    ...(spec.restoreFrom === undefined
      ? ["-kernel", spec.kernel, "-initrd", spec.initramfs, "-append", kernelCmdline(spec, tsc)]
      : []),
    "-chardev",
    // append: a restored clone's log starts with its template's boot, copied in before QEMU starts.
    `file,id=console,path=${optValue(paths.consoleLog)},append=on`,
    "-serial",
    "chardev:console",
  ];
  spec.disks.forEach((d, i) => {
    const id = `disk${i}`;
    const ro = d.readonly ? ",readonly=on" : "";
    args.push("-drive", `id=${id},file=${optValue(d.path)},format=raw,if=none,cache=unsafe${ro}`);
    args.push("-device", `virtio-blk-device,drive=${id}`);
  });
  if (spec.nic) {
    // No vhost: /dev/vhost-net is absent on these hosts, and QEMU's own virtio-net is enough.
    args.push(
      "-netdev",
      `tap,id=net0,ifname=${optValue(spec.nic.tap)},script=no,downscript=no`,
      "-device",
      `virtio-net-device,netdev=net0,mac=${spec.nic.mac}`,
    );
  }
  // Only for a guest CPU without RDRAND (see rng.ts): with it the kernel's CRNG is ready long before
  // any module, and the device would only add a driver to load.
  if (spec.rng) args.push("-device", "virtio-rng-device");
  args.push(
    "-device",
    `virtio-serial-device,max_ports=${spec.vfs ? 3 : 2}`,
    "-chardev",
    `socket,id=agent,path=${optValue(paths.agentSocket)}`,
    "-device",
    "virtserialport,chardev=agent,name=agent",
    "-chardev",
    `socket,id=qmp,path=${optValue(paths.qmpSocket)}`,
    "-mon",
    "chardev=qmp,mode=control",
  );
  if (spec.vfs) {
    args.push(
      "-chardev",
      `socket,id=vfs,path=${optValue(paths.vfsSocket)}`,
      "-device",
      "virtserialport,chardev=vfs,name=vfs",
    );
  }
  if (spec.ram) {
    args.push(
      "-object",
      `memory-backend-file,id=ram,size=${spec.memoryMb}M,mem-path=${optValue(spec.ram.file)},share=${spec.ram.shared ? "on" : "off"}`,
    );
  }
  if (spec.restoreFrom !== undefined) args.push("-incoming", "defer");
  if (spec.extraArgs) args.push(...spec.extraArgs);
  return args;
}
