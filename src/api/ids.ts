import { randomBytes } from "node:crypto";
import { InvalidArgumentError } from "./errors.ts";

/** VM ids: `vm-` + 8 lowercase hex characters (PROTOCOLS.md), the form Matchlock creates too. */
const VM_ID = /^vm-[0-9a-f]{8}$/;

export function newVmId(): string {
  return `vm-${randomBytes(4).toString("hex")}`;
}

export function isVmId(s: string): boolean {
  return VM_ID.test(s);
}

/**
 * The one gate for an id a user (or a record) hands us: it becomes a path (`~/.matchlock/vms/<id>`,
 * the relay socket in it), so anything but the exact id format — `../x`, `/abs`, NUL, a newline — is
 * refused before it reaches the file system. Returns the id unchanged.
 */
export function parseVmId(id: string): string {
  if (isVmId(id)) return id;
  throw new InvalidArgumentError(
    `invalid VM id "${printable(id)}": a VM id is vm- followed by 8 hex digits (like vm-0a1b2c3d)`,
    "`matchlock list` shows the VMs",
  );
}

const SHOWN_CHARS = 64;

/**
 * `s` made safe to echo on a terminal: control, format (bidi overrides, zero-width) and separator
 * characters become escapes, so a hostile id cannot rewrite the line it is printed on; long ones are cut.
 */
export function printable(s: string): string {
  const chars = [...s];
  const shown = chars.slice(0, SHOWN_CHARS).map(escapeChar).join("");
  return chars.length > SHOWN_CHARS ? `${shown}…(${chars.length} characters)` : shown;
}

function escapeChar(c: string): string {
  if (c === "\\" || c === '"') return `\\${c}`;
  if (!/[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}]/u.test(c)) return c;
  const code = c.codePointAt(0) ?? 0;
  return code <= 0xff ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u{${code.toString(16)}}`;
}
