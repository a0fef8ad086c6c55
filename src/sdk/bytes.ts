/** What the SDK takes as file content or input: text (UTF-8) or bytes. */
export type BinaryLike = string | Buffer | Uint8Array | ArrayBuffer;

export function isBinaryLike(x: unknown): x is BinaryLike {
  return typeof x === "string" || x instanceof Uint8Array || x instanceof ArrayBuffer;
}

export function toBuffer(c: BinaryLike): Buffer {
  if (typeof c === "string") return Buffer.from(c, "utf8");
  if (Buffer.isBuffer(c)) return c;
  return Buffer.from(c instanceof ArrayBuffer ? new Uint8Array(c) : c);
}
