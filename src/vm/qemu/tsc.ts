import { readFile } from "node:fs/promises";
import { runCommand } from "../../host/command.ts";
import { readJson, writeFileAtomic } from "../../host/fsutil.ts";

/**
 * The host's TSC frequency in kHz, for the guest's `tsc_early_khz` under TCG. Sources, best first:
 * the kernel's sysfs value, its boot log, then /proc/cpuinfo (a current clock, right on VMs and
 * constant-TSC hosts). 0 when nothing says.
 *
 * Reading the boot log means spawning `dmesg` (~15 ms of every VM start), so the answer is kept in
 * `cacheFile` (tsc.json in the cache dir) with the host's boot id: the frequency is fixed until the
 * host reboots, and a reboot changes the id.
 */
let cached: Promise<number> | undefined;

export function hostTscKhz(cacheFile?: string): Promise<number> {
  cached ??= tscKhz(cacheFile);
  return cached;
}

/** Where the frequency is read from; tests replace them. */
export interface TscSources {
  sysfs(): Promise<string>;
  bootId(): Promise<string>;
  dmesg(): Promise<string>;
  cpuinfo(): Promise<string>;
}

export const HOST_TSC_SOURCES: TscSources = {
  sysfs: () => readFile("/sys/devices/system/cpu/cpu0/tsc_freq_khz", "utf8"),
  bootId: () => readFile("/proc/sys/kernel/random/boot_id", "utf8"),
  dmesg: async () => (await runCommand("dmesg", [], { allowFailure: true })).stdout.toString(),
  cpuinfo: () => readFile("/proc/cpuinfo", "utf8"),
};

interface TscCache {
  boot_id: string;
  khz: number;
}

/** hostTscKhz without the in-process memo. */
export async function tscKhz(cacheFile: string | undefined, src = HOST_TSC_SOURCES): Promise<number> {
  const sysfs = Number.parseInt(await src.sysfs().catch(() => ""), 10);
  if (sysfs > 0) return sysfs; // as cheap as the cache, and the kernel's own word
  const bootId = (await src.bootId().catch(() => "")).trim();
  if (cacheFile && bootId) {
    const c = await readJson<TscCache>(cacheFile);
    if (c?.boot_id === bootId && Number.isInteger(c.khz) && c.khz > 0) return c.khz;
  }
  const khz = await probe(src);
  if (cacheFile && bootId && khz > 0) {
    // Only a time saver: a cache dir that cannot be written costs the probe next time, nothing else.
    const entry: TscCache = { boot_id: bootId, khz };
    await writeFileAtomic(cacheFile, `${JSON.stringify(entry)}\n`).catch(() => {});
  }
  return khz;
}

async function probe(src: TscSources): Promise<number> {
  const log = await src.dmesg().catch(() => "");
  const fromLog =
    /tsc: Refined TSC clocksource calibration: ([\d.]+) MHz/.exec(log) ??
    /tsc: Detected ([\d.]+) MHz/.exec(log);
  if (fromLog?.[1]) return Math.round(Number.parseFloat(fromLog[1]) * 1000);
  const m = /^cpu MHz\s*:\s*([\d.]+)/m.exec(await src.cpuinfo().catch(() => ""));
  if (m?.[1]) return Math.round(Number.parseFloat(m[1]) * 1000);
  return 0;
}
