import type { Paths } from "../api/paths.ts";
import { isDefaultRef, type ResolvedImage, requireDefaultImage } from "./default-image.ts";
import type { PullProgress } from "./registry.ts";

export type { ResolvedImage };

/**
 * Resolves `--image` for one VM start: the default image, else the image store (local tag →
 * registry cache → pull). The store, its tar and registry code are loaded only when an image other
 * than the default is asked for, so a plain `run` does not pay for them at start-up.
 */
export async function resolveImage(
  p: Paths,
  ref: string | undefined,
  opts: { pull?: boolean; onProgress?: (p: PullProgress) => void; localOnly?: boolean } = {},
): Promise<ResolvedImage> {
  if (ref === undefined || isDefaultRef(ref)) return requireDefaultImage(p);
  const { ImageStore } = await import("./store.ts");
  const store = new ImageStore(p);
  const { localOnly, ...rest } = opts;
  try {
    return await store.resolve(ref, { ...rest, allowPull: !localOnly });
  } finally {
    store.close();
  }
}
