import { createRequire } from "node:module";

/**
 * The C library through koffi (the project's FFI: maintained, prebuilt per platform on npm), for
 * the system calls Node does not expose. One loaded handle for every user; each binds the functions
 * it needs with their C signatures. Throws if koffi cannot load here.
 */

export interface Libc {
  /** Binds `signature` (C syntax) to a JS function. */
  func(signature: string): (...args: unknown[]) => unknown;
  /** The calling thread's errno after the last bound call. */
  errno(): number;
}

let libc: Libc | undefined;

export function loadLibc(): Libc {
  if (libc) return libc;
  const koffi = createRequire(import.meta.url)("koffi") as {
    load(path: string): { func(sig: string): (...args: unknown[]) => unknown };
    errno(): number;
  };
  const c = koffi.load("libc.so.6");
  libc = { func: (sig) => c.func(sig), errno: () => koffi.errno() };
  return libc;
}
