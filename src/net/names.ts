/**
 * Names of a VM's host network objects, kept from Matchlock so its documented diagnostics
 * (`ip link show fc-…`, `nft list table inet matchlock_fc-…`) work on ours.
 */

export const TAP_PREFIX = "fc-";
export const TABLE_PREFIX = "matchlock_";

/** `vm-0a1b2c3d` → `fc-0a1b2c3d` (IFNAMSIZ leaves 15 characters). */
export function tapName(vmId: string): string {
  return `${TAP_PREFIX}${vmId.slice(3, 11)}`;
}

/** The per-VM nftables table (family inet). */
export function tableName(tap: string): string {
  return `${TABLE_PREFIX}${tap}`;
}

/** `AA:FC:` + a 32-bit hash of the id (h = h*31 + c), as Matchlock derives it. */
export function macAddress(vmId: string): string {
  let h = 0;
  for (const c of vmId) h = (Math.imul(h, 31) + (c.codePointAt(0) ?? 0)) >>> 0;
  const bytes = [h >>> 24, (h >>> 16) & 0xff, (h >>> 8) & 0xff, h & 0xff];
  return ["AA", "FC", ...bytes.map((b) => b.toString(16).toUpperCase().padStart(2, "0"))].join(":");
}
