import { MatchlockError, NotSetUpError } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { DEFAULT_IMAGE, loadDefaultImage, type ResolvedImage } from "./default-image.ts";

export type { ResolvedImage };

/** Names that mean the default image built by `matchlock setup`. */
const DEFAULT_ALIASES = new Set([DEFAULT_IMAGE, "matchlock/default", "default"]);

/**
 * Finds the image a VM boots from. This version knows the default image only; pulling and importing
 * OCI images come with the image store.
 */
export async function resolveImage(p: Paths, ref: string | undefined): Promise<ResolvedImage> {
  if (ref === undefined || ref === "" || DEFAULT_ALIASES.has(ref)) {
    const img = await loadDefaultImage(p);
    if (!img) throw new NotSetUpError(`the default image ${DEFAULT_IMAGE} is not built`);
    return img;
  }
  throw new MatchlockError("IMAGE_NOT_FOUND", `image "${ref}" not found`, {
    hint: `this version runs only the default image (${DEFAULT_IMAGE}); omit --image to use it`,
  });
}
