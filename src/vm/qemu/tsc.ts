import { readFile } from "node:fs/promises";
import { runCommand } from "../../host/command.ts";

/**
 * The host's TSC frequency in kHz, for the guest's `tsc_early_khz` under TCG. Sources, best first:
 * the kernel's sysfs value, its boot log, then /proc/cpuinfo (a current clock, right on VMs and
 * constant-TSC hosts). 0 when nothing says.
 */
let cached: Promise<number> | undefined;

export function hostTscKhz(): Promise<number> {
  cached ??= probe();
  return cached;
}

async function probe(): Promise<number> {
  try {
    const v = Number.parseInt(await readFile("/sys/devices/system/cpu/cpu0/tsc_freq_khz", "utf8"), 10);
    if (v > 0) return v;
  } catch {}
  const log =
    (await runCommand("dmesg", [], { allowFailure: true }).catch(() => undefined))?.stdout.toString() ?? "";
  const fromLog =
    /tsc: Refined TSC clocksource calibration: ([\d.]+) MHz/.exec(log) ??
    /tsc: Detected ([\d.]+) MHz/.exec(log);
  if (fromLog?.[1]) return Math.round(Number.parseFloat(fromLog[1]) * 1000);
  try {
    const m = /^cpu MHz\s*:\s*([\d.]+)/m.exec(await readFile("/proc/cpuinfo", "utf8"));
    if (m?.[1]) return Math.round(Number.parseFloat(m[1]) * 1000);
  } catch {}
  return 0;
}
