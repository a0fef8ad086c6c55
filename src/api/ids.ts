import { randomBytes } from "node:crypto";

/** VM ids: `vm-` + 8 hex characters (PROTOCOLS.md). */
export function newVmId(): string {
  return `vm-${randomBytes(4).toString("hex")}`;
}

export function isVmId(s: string): boolean {
  return /^vm-[0-9a-f]{8}$/.test(s);
}
