import { constants, existsSync } from "node:fs";
import { access, mkdtemp, readFile, rm } from "node:fs/promises";
import { cpus, release, tmpdir } from "node:os";
import { join } from "node:path";
import { InvalidArgumentError } from "../../api/errors.ts";
import { readJson, writeFileAtomic } from "../../host/fsutil.ts";
import type { Accel } from "../backend.ts";
import { QemuBackend } from "./machine.ts";

/**
 * KVM when it really boots our kernel, TCG otherwise. `/dev/kvm` existing is not enough: on some
 * nested hosts it only runs para-virtualised guests and a normal kernel hangs. So we boot the guest
 * kernel once under KVM with a short deadline and cache the answer per host.
 */

export const PROBE_MARKER = "MATCHLOCK-PROBE-OK";
const PROBE_TIMEOUT_MS = 8000;

export function parseAccel(value: string, source: string): Accel {
  if (value === "kvm" || value === "tcg") return value;
  throw new InvalidArgumentError(`${source}: unknown accelerator "${value}" (use kvm or tcg)`);
}

interface AccelCache {
  key: string;
  accel: Accel;
  reason: string;
}

function hostKey(): string {
  return `${release()}|${cpus()[0]?.model ?? "?"}`;
}

export async function kvmUsable(): Promise<boolean> {
  try {
    await access("/dev/kvm", constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

export interface ProbeInput {
  kernel: string;
  initramfs: string;
}

export interface AccelChoice {
  accel: Accel;
  reason: string;
}

/** The accelerator to use: forced (flag or MATCHLOCK_ACCEL), cached, or probed now. */
export async function chooseAccel(
  cachePath: string,
  probe: ProbeInput,
  forced?: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<AccelChoice> {
  if (forced) return { accel: parseAccel(forced, "--accel"), reason: "forced by --accel" };
  if (env.MATCHLOCK_ACCEL)
    return { accel: parseAccel(env.MATCHLOCK_ACCEL, "MATCHLOCK_ACCEL"), reason: "MATCHLOCK_ACCEL" };
  const cached = await readJson<AccelCache>(cachePath);
  if (cached && cached.key === hostKey() && (cached.accel === "tcg" || (await kvmUsable()))) {
    return { accel: cached.accel, reason: `${cached.reason} (cached)` };
  }
  const choice = await probeAccel(probe);
  await writeFileAtomic(cachePath, `${JSON.stringify({ key: hostKey(), ...choice } satisfies AccelCache)}\n`);
  return choice;
}

export async function probeAccel(probe: ProbeInput): Promise<AccelChoice> {
  if (!existsSync("/dev/kvm")) return { accel: "tcg", reason: "/dev/kvm does not exist" };
  if (!(await kvmUsable())) return { accel: "tcg", reason: "/dev/kvm is not accessible" };
  const dir = await mkdtemp(join(tmpdir(), "matchlock-probe-"));
  try {
    const vm = await new QemuBackend().start({
      id: "probe",
      dir,
      kernel: probe.kernel,
      initramfs: probe.initramfs,
      kernelArgs: ["matchlock.probe=1"],
      cpus: 1,
      memoryMb: 128,
      disks: [],
      accel: "kvm",
    });
    const timer = setTimeout(() => {
      vm.stop(0).catch(() => {});
    }, PROBE_TIMEOUT_MS);
    await vm.exited;
    clearTimeout(timer);
    await vm.stop();
    const console = await readFile(join(dir, "console.log"), "utf8").catch(() => "");
    if (console.includes(PROBE_MARKER)) return { accel: "kvm", reason: "a KVM boot test succeeded" };
    return { accel: "tcg", reason: `a KVM boot test did not finish within ${PROBE_TIMEOUT_MS / 1000} s` };
  } catch {
    return { accel: "tcg", reason: "QEMU could not start a KVM guest" };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
