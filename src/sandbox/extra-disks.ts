import { open, stat } from "node:fs/promises";
import { isAbsolute, resolve } from "node:path";
import type { SandboxConfig } from "../api/config.ts";
import { InvalidArgumentError, messageOf } from "../api/errors.ts";
import type { DiskSpec } from "../vm/backend.ts";
import { checkGuestPath } from "./host-folders.ts";

/**
 * Extra disks (`extra_disks`, `run --disk`): ext4 images — volumes or the user's own files — attached
 * as virtio-blk devices after the image and the upper disk (vdc, vdd, …) and mounted by the agent
 * where the config says (boot parameter `matchlock.disk`). Two VMs writing one image would corrupt
 * it: QEMU's image locking refuses the second, and the boot error says so.
 */

/** Linux virtio-blk names after vda (image) and vdb (upper); the agent takes at most this many. */
export const MAX_EXTRA_DISKS = 20;
const EXT_MAGIC_OFFSET = 1080;

export interface ExtraDisk {
  disk: DiskSpec;
  /** The agent's boot parameter for it. */
  kernelArg: string;
}

async function checkExt4(path: string): Promise<void> {
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(path);
  } catch (e) {
    throw new InvalidArgumentError(`disk ${path}: ${messageOf(e)}`);
  }
  if (!st.isFile()) throw new InvalidArgumentError(`disk ${path} is not a file (an ext4 image is)`);
  const fh = await open(path, "r");
  try {
    const b = Buffer.alloc(2);
    await fh.read(b, 0, 2, EXT_MAGIC_OFFSET);
    if (b.readUInt16LE(0) !== 0xef53) {
      throw new InvalidArgumentError(
        `disk ${path} is not an ext2/3/4 image`,
        "make one with `matchlock volume create NAME`, or mkfs.ext4 on a file",
      );
    }
  } finally {
    await fh.close();
  }
}

/** Checks the config's extra disks; `workspace` is where host folders are mounted, if any. */
export async function prepareExtraDisks(
  config: SandboxConfig,
  workspace: string | undefined,
): Promise<ExtraDisk[]> {
  const disks = config.extra_disks;
  if (disks.length > MAX_EXTRA_DISKS) {
    throw new InvalidArgumentError(`${disks.length} extra disks: at most ${MAX_EXTRA_DISKS}`);
  }
  const mounts = new Set<string>();
  const out: ExtraDisk[] = [];
  for (const [i, d] of disks.entries()) {
    const mount = checkGuestPath("disk mount", d.guest_mount);
    if (mounts.has(mount)) throw new InvalidArgumentError(`two disks are mounted at ${mount}`);
    mounts.add(mount);
    if (
      workspace !== undefined &&
      (mount === workspace || mount.startsWith(`${workspace}/`) || workspace.startsWith(`${mount}/`))
    ) {
      throw new InvalidArgumentError(
        `disk mount ${mount} overlaps the workspace ${workspace} (one would hide the other)`,
      );
    }
    const path = isAbsolute(d.host_path) ? d.host_path : resolve(d.host_path);
    await checkExt4(path);
    const readonly = d.readonly === true;
    out.push({
      disk: { path, readonly },
      kernelArg: `matchlock.disk=vd${String.fromCharCode(99 + i)}:${mount}:${readonly ? "ro" : "rw"}`,
    });
  }
  return out;
}
