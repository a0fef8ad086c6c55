import { readFile } from "node:fs/promises";
import type { Accel } from "../backend.ts";

/**
 * Whether a guest needs a virtio-rng device to seed its CRNG. The guest kernel seeds it from RDRAND
 * when the CPU has it ("random: crng init done" comes before any module is loaded); only without
 * RDRAND would getrandom() callers in the guest wait on slower entropy. The guest CPU is `-cpu max`:
 * under TCG QEMU emulates RDRAND for it, under KVM it has the host's, so the host's flags decide.
 */
export async function guestNeedsRng(accel: Accel, cpuinfo = readCpuinfo): Promise<boolean> {
  if (accel === "tcg") return false;
  const text = await cpuinfo().catch(() => "");
  const flags = /^flags\s*:(.*)$/m.exec(text)?.[1];
  return flags === undefined || !flags.split(/\s+/).includes("rdrand");
}

function readCpuinfo(): Promise<string> {
  return readFile("/proc/cpuinfo", "utf8");
}
