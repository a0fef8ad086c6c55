/**
 * One promise per writable for "it has room again": settles at its next `drain`, or when it closes
 * or fails (nothing will drain then, and nobody must wait forever). Shared by every writer waiting
 * on the same stream, so a burst of small writes adds three listeners, not three per write.
 */
const pending = new WeakMap<NodeJS.WritableStream, Promise<void>>();

export function whenWritable(out: NodeJS.WritableStream): Promise<void> {
  let p = pending.get(out);
  if (p) return p;
  p = new Promise<void>((resolve) => {
    const done = () => {
      out.off("drain", done);
      out.off("close", done);
      out.off("error", done);
      pending.delete(out);
      resolve();
    };
    out.on("drain", done);
    out.on("close", done);
    out.on("error", done);
  });
  pending.set(out, p);
  return p;
}
