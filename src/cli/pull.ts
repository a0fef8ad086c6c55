import type { Command } from "commander";
import { paths } from "../api/paths.ts";
import { pullProgress } from "./progress.ts";

/** `matchlock pull IMAGE`: fetch an image from its registry into the store. */
export function registerPull(program: Command): void {
  program
    .command("pull")
    .summary("pull an image from a registry (Docker Registry v2 / OCI distribution)")
    .description(
      "Fetch IMAGE (normalised as Docker does: alpine → docker.io/library/alpine:latest; @sha256: digests are\n" +
        "verified) for linux/amd64, store its blobs by digest, and build its base disk. Credentials come from\n" +
        "~/.docker/config.json (`auths`). Loopback registries use plain HTTP; others need HTTPS unless --insecure.\n" +
        "Progress bars on a terminal, quiet otherwise.",
    )
    .argument("<image>")
    .option("--force", "download again even if the image is here (blobs already stored are reused)")
    .option("-t, --tag <tag>", "also tag the pulled image locally as TAG")
    .option("--insecure", "allow plain HTTP to a registry that is not on loopback")
    .action(async (ref: string, flags: { force?: boolean; tag?: string; insecure?: boolean }) => {
      const { ImageStore } = await import("../image/store.ts"); // loaded only for this command
      const store = new ImageStore(paths());
      const progress = pullProgress();
      try {
        const r = await store.pull(ref, {
          ...(flags.insecure ? { insecure: true } : {}),
          onProgress: progress.onProgress,
        });
        progress.stop();
        if (flags.tag) store.tagLocal(r.tag, flags.tag);
        for (const s of r.skipped) process.stderr.write(`  dropped ${s}\n`);
        process.stdout.write(
          `${r.tag} ${r.digest} (manifest ${r.manifestDigest}, ${(r.downloaded / 1e6).toFixed(1)} MB downloaded)\n`,
        );
      } finally {
        progress.stop();
        store.close();
      }
    });
}
