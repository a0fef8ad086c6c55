import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, open, rename, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { MatchlockError } from "../api/errors.ts";
import { runCommand } from "../host/command.ts";
import { copySparse } from "../host/sparse.ts";

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

/**
 * A VM's empty upper disk: a sparse copy of a blank ext4 of that size kept in `cacheDir`, made with
 * mkfs once. Copying its few MB of metadata costs less than running mkfs for every VM, and every
 * copy is byte-identical (the file system UUID included, which nothing shares across VMs).
 */
export async function makeUpperDisk(cacheDir: string, out: string, sizeMb: number): Promise<void> {
  const blank = join(cacheDir, "upper", `blank-${sizeMb}.ext4`);
  if (!existsSync(blank)) {
    await mkdir(dirname(blank), { recursive: true });
    const tmp = `${blank}.${process.pid}.${randomBytes(4).toString("hex")}`;
    try {
      await makeEmptyExt4(tmp, sizeMb);
      await rename(tmp, blank); // atomic: a concurrent maker's copy is as good as ours
    } finally {
      await rm(tmp, { force: true });
    }
  }
  await copySparse(blank, out);
}
