import { open, rm } from "node:fs/promises";
import { MatchlockError } from "../api/errors.ts";
import { runCommand } from "../host/command.ts";

/** ext4 images made with Debian's mke2fs (1.47.0 takes a directory for `-d`, not a tarball). */

const MKFS = "mkfs.ext4";
/** No journal: the base is mounted read-only and an upper disk dies with its VM. */
const COMMON = ["-q", "-F", "-O", "^has_journal", "-m", "0", "-E", "lazy_itable_init=1,nodiscard"];

async function sparseFile(path: string, bytes: number): Promise<void> {
  const fh = await open(path, "wx", 0o600);
  try {
    await fh.truncate(bytes);
  } finally {
    await fh.close();
  }
}

/** Size of a tree in bytes as `du` sees it (blocks actually used). */
async function treeBytes(dir: string): Promise<number> {
  const out = (await runCommand("du", ["-s", "-B1", "--apparent-size", dir])).stdout.toString();
  return Number.parseInt(out, 10) || 0;
}

/**
 * A read-only base disk holding `dir`, with room for ext4's own metadata. `entries` (files, dirs,
 * links in the tree) sizes the inode table: the default ratio runs out on trees of small files.
 */
export async function makeExt4FromDir(
  dir: string,
  out: string,
  label: string,
  entries?: number,
): Promise<void> {
  const used = await treeBytes(dir);
  const inodes = entries === undefined ? undefined : Math.ceil(entries * 1.2) + 1024;
  const bytes =
    Math.ceil((used * 1.3 + (inodes ?? 0) * 256 + 16 * 1024 * 1024) / (1024 * 1024)) * 1024 * 1024;
  await sparseFile(out, bytes);
  try {
    await runCommand(MKFS, [
      ...COMMON,
      ...(inodes === undefined ? [] : ["-N", String(inodes)]),
      "-L",
      label,
      "-d",
      dir,
      out,
    ]);
  } catch (e) {
    await rm(out, { force: true });
    throw new MatchlockError("SETUP_FAILED", `could not build an ext4 image of ${dir}`, { cause: e });
  }
}

/** An empty sparse ext4 disk of `sizeMb` (a VM's writable upper layer): costs ~10 ms and a few MB. */
export async function makeEmptyExt4(out: string, sizeMb: number): Promise<void> {
  await sparseFile(out, sizeMb * 1024 * 1024);
  await runCommand(MKFS, [...COMMON, "-L", "upper", out], { errorCode: "VM_BOOT_FAILED" });
}
