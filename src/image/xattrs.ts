import { hasCommand, runCommand } from "../host/command.ts";
import type { RecordedXattr } from "./apply.ts";

/**
 * Puts the image's extended attributes on the staged tree, so `mkfs.ext4 -d` copies them into the
 * base disk. Only names that mean something to a guest without SELinux: file capabilities (ping
 * and friends) and user.* attributes. Node has no xattr API; `setfattr --restore` from Debian's
 * `attr` does them all in one process.
 */

const KEEP = (name: string) => name === "security.capability" || name.startsWith("user.");

/** Returns the attributes it could not apply, as "path: reason". */
export async function applyXattrs(stagingDir: string, xattrs: RecordedXattr[]): Promise<string[]> {
  const wanted = xattrs.filter((x) => KEEP(x.name));
  const dropped = xattrs.filter((x) => !KEEP(x.name)).map((x) => `${x.path}: xattr ${x.name} not kept`);
  if (wanted.length === 0) return dropped;
  if (!(await hasCommand("setfattr"))) {
    return [
      ...dropped,
      ...wanted.map((x) => `${x.path}: xattr ${x.name} not applied (setfattr missing: apt-get install attr)`),
    ];
  }
  // getfattr's dump format; a backslash in a name is written as its octal escape.
  const dump = wanted
    .map((x) => `# file: ${x.path.replaceAll("\\", "\\134")}\n${x.name}=0x${x.value.toString("hex")}\n`)
    .join("\n");
  await runCommand("setfattr", ["-h", "--restore=-"], { cwd: stagingDir, input: `${dump}\n` });
  return dropped;
}
