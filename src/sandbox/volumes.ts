import { mkdir, readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { InvalidArgumentError } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { runCommand } from "../host/command.ts";
import { makeEmptyExt4 } from "../image/ext4.ts";
import type { StateStore } from "../state/store.ts";
import { effectiveStatus, isStoppedStatus } from "./reconcile.ts";

/**
 * Named volumes: sparse ext4 images in `~/.matchlock/volumes/NAME.ext4` that outlive VMs, attached
 * with `run --disk @NAME:/path` (an extra disk; see extra-disks.ts). A volume is removed only when no
 * running VM has it.
 */

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

export function volumesDir(p: Paths): string {
  return join(p.home, "volumes");
}

export function volumePath(name: string, p: Paths): string {
  if (!NAME.test(name) || name.endsWith(".")) {
    throw new InvalidArgumentError(
      `invalid volume name "${name.slice(0, 64)}"`,
      "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters",
    );
  }
  return join(volumesDir(p), `${name}.ext4`);
}

export async function createVolume(name: string, sizeMb: number, p: Paths): Promise<string> {
  const path = volumePath(name, p);
  if (await stat(path).catch(() => undefined)) {
    throw new InvalidArgumentError(`volume ${name} exists`, `matchlock volume rm ${name} first`);
  }
  await mkdir(volumesDir(p), { recursive: true, mode: 0o700 });
  try {
    await makeEmptyExt4(path, sizeMb);
  } catch (e) {
    await rm(path, { force: true });
    throw e;
  }
  return path;
}

export interface VolumeInfo {
  name: string;
  path: string;
  size_mb: number;
  /** Bytes the sparse image takes on the host disk. */
  used_bytes: number;
}

export async function listVolumes(p: Paths): Promise<VolumeInfo[]> {
  const names = await readdir(volumesDir(p)).catch(() => [] as string[]);
  const out: VolumeInfo[] = [];
  for (const f of names.filter((n) => n.endsWith(".ext4")).sort()) {
    const path = join(volumesDir(p), f);
    const st = await stat(path);
    out.push({
      name: f.slice(0, -5),
      path,
      size_mb: Math.round(st.size / 1024 / 1024),
      used_bytes: st.blocks * 512,
    });
  }
  return out;
}

/** The live VMs (running or paused: a paused VM keeps its disks open) that have this disk image attached. */
export function vmsUsing(path: string, s: StateStore): string[] {
  return s.vms
    .list()
    .filter((row) => !isStoppedStatus(effectiveStatus(row, s.lifecycle.current(row.id))))
    .filter((row) => {
      try {
        const config = JSON.parse(row.config_json) as { extra_disks?: Array<{ host_path?: string }> };
        return (config.extra_disks ?? []).some((d) => d.host_path === path);
      } catch {
        return false;
      }
    })
    .map((row) => row.id);
}

/** A new volume DST with SRC's contents (sparse copy); SRC must not be open for writing in a VM. */
export async function copyVolume(src: string, dst: string, p: Paths, s: StateStore): Promise<string> {
  const from = volumePath(src, p);
  const to = volumePath(dst, p);
  if (!(await stat(from).catch(() => undefined))) throw new InvalidArgumentError(`no volume ${src}`);
  if (await stat(to).catch(() => undefined)) throw new InvalidArgumentError(`volume ${dst} exists`);
  const users = vmsUsing(from, s);
  if (users.length > 0) {
    throw new InvalidArgumentError(
      `volume ${src} is attached to ${users.join(", ")}`,
      "stop those VMs first: a copy of a disk in use may be torn",
    );
  }
  try {
    await runCommand("cp", ["--sparse=always", from, to], { errorCode: "INVALID_ARGUMENT" });
  } catch (e) {
    await rm(to, { force: true });
    throw e;
  }
  return to;
}

export async function removeVolume(name: string, p: Paths, s: StateStore): Promise<void> {
  const path = volumePath(name, p);
  if (!(await stat(path).catch(() => undefined))) throw new InvalidArgumentError(`no volume ${name}`);
  const users = vmsUsing(path, s);
  if (users.length > 0) {
    throw new InvalidArgumentError(
      `volume ${name} is attached to ${users.join(", ")}`,
      "stop those VMs first",
    );
  }
  await rm(path);
}
