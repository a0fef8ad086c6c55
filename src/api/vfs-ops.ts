/**
 * The file operations VFS interception rules name (Matchlock's `VFSHookOp`), one list for the
 * server's rules (src/vfs/intercept.ts) and the SDK's local hooks (src/sdk/vfs-hooks.ts), so an op
 * the server knows is one the SDK accepts and the reverse.
 */

export const VFS_OPS = [
  "stat",
  "readdir",
  "open",
  "create",
  "mkdir",
  "chmod",
  "remove",
  "remove_all",
  "rename",
  "symlink",
  "readlink",
  "read",
  "write",
  "close",
  "sync",
  "truncate",
] as const;
export type VfsOp = (typeof VFS_OPS)[number];

/** Spellings Matchlock accepts besides the canonical ones. */
const VFS_OP_ALIASES: Readonly<Record<string, VfsOp>> = { read_dir: "readdir", removeall: "remove_all" };

/** The canonical op for a name a rule gives (an alias included), or undefined for an unknown one. */
export function canonicalVfsOp(name: string): VfsOp | undefined {
  const op = VFS_OP_ALIASES[name] ?? name;
  return (VFS_OPS as readonly string[]).includes(op) ? (op as VfsOp) : undefined;
}
