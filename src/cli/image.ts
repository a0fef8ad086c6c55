import { closeSync, createReadStream, fstatSync, openSync } from "node:fs";
import type { Readable } from "node:stream";
import type { Command } from "commander";
import { InvalidArgumentError, MatchlockError, messageOf } from "../api/errors.ts";
import { paths } from "../api/paths.ts";
import type { ImageStore } from "../image/store.ts";
import { table } from "./table.ts";

/** `matchlock image import|ls|rm|gc`: the local image store. */

/** A removed image's snapshots go with it: nothing would restore them again. */
async function removeImageSnapshots(tag: string): Promise<void> {
  const [{ normalizeReference }, { removeTemplate }, { withState }] = await Promise.all([
    import("../image/reference.ts"),
    import("../sandbox/snapshots.ts"),
    import("./vm-records.ts"),
  ]);
  const ref = normalizeReference(tag);
  await withState(async (s) => {
    for (const row of s.snapshots.list()) if (row.image === ref) await removeTemplate(s, row);
  });
}

/** Opens the store for one command; loaded on demand, so other commands do not pay for it at start-up. */
async function withStore<T>(fn: (s: ImageStore) => Promise<T> | T): Promise<T> {
  const { ImageStore } = await import("../image/store.ts");
  const s = new ImageStore(paths());
  try {
    return await fn(s);
  } finally {
    s.close();
  }
}

/** `-i FILE`, opened now: a missing, unreadable or directory path is the user's error, not ours. */
function openArchive(file: string): Readable {
  let fd: number;
  try {
    fd = openSync(file, "r");
    if (fstatSync(fd).isDirectory()) {
      closeSync(fd);
      throw new InvalidArgumentError(`${file}: is a directory, not an image archive`);
    }
  } catch (e) {
    if (e instanceof InvalidArgumentError) throw e;
    throw new InvalidArgumentError(
      `${file}: ${(e as { code?: string }).code === "ENOENT" ? "no such file" : messageOf(e)}`,
    );
  }
  return createReadStream(file, { fd });
}

function mb(bytes: number): string {
  return bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : `${(bytes / 1e6).toFixed(1)} MB`;
}

export function registerImage(program: Command): void {
  const image = program.command("image").summary("manage local images: import, ls, rm, gc");

  image
    .command("import")
    .summary("import a docker-save or OCI-layout tar archive under TAG")
    .description(
      "Import an image archive — `docker save` output or an OCI image layout —\n" +
        "as a tar (plain, gzip or zstd) from stdin or -i FILE.\n" +
        "Layers are stored by digest (shared between images), applied with OCI whiteouts into a read-only\n" +
        "base disk, and checked: entries escaping the root, writes through symlinks, hardlinks out of the\n" +
        "tree, unencodable names and oversized archives are refused with the entry and the rule named;\n" +
        "device nodes are dropped.\n\n" +
        "  docker save app:latest | matchlock image import app:latest\n" +
        "  matchlock image import oci-app:1 -i app-oci-layout.tar",
    )
    .argument(
      "<tag>",
      "name to give the image (normalised as Docker does: app → docker.io/library/app:latest)",
    )
    .option("-i, --input <file>", "read the archive from this file instead of stdin")
    .action((tag: string, flags: { input?: string }) =>
      withStore(async (s) => {
        let input: Readable;
        if (flags.input) input = openArchive(flags.input);
        else {
          if (process.stdin.isTTY)
            throw new InvalidArgumentError("no archive: pipe one to stdin or use -i FILE");
          input = process.stdin;
        }
        const log = (line: string) => process.stderr.write(`  … ${line}\n`);
        const r = await s.importArchive(input, tag, flags.input ? `file:${flags.input}` : "stdin", log);
        for (const sk of r.skipped) process.stderr.write(`  dropped ${sk}\n`);
        process.stdout.write(`${r.tag} ${r.digest}\n`);
      }),
    );

  image
    .command("ls")
    .alias("list")
    .summary("list images")
    .option("--json", "a JSON array of {tag, scope, digest, size, created_at}, for scripts")
    .action((flags: { json?: boolean }) =>
      withStore(async (s) => {
        const { DEFAULT_IMAGE, loadDefaultImage } = await import("../image/default-image.ts");
        if (flags.json) {
          const builtin = (await loadDefaultImage(paths()))
            ? [{ tag: DEFAULT_IMAGE, scope: "builtin", digest: "", size: 0, created_at: "" }]
            : [];
          const images = s.list().map((i) => ({
            tag: i.tag,
            scope: i.scope,
            digest: i.digest,
            size: i.size,
            created_at: i.created_at,
          }));
          process.stdout.write(`${JSON.stringify([...builtin, ...images], null, 2)}\n`);
          return;
        }
        const rows = [["TAG", "SCOPE", "DIGEST", "SIZE", "CREATED"]];
        if (await loadDefaultImage(paths())) rows.push([DEFAULT_IMAGE, "builtin", "-", "-", "-"]);
        for (const i of s.list()) {
          rows.push([
            i.tag,
            i.scope,
            i.digest.slice(0, 19),
            mb(i.size),
            i.created_at.replace("T", " ").slice(0, 19),
          ]);
        }
        process.stdout.write(`${table(rows)}\n`);
      }),
    );

  image
    .command("rm")
    .alias("remove")
    .summary("remove image tags (their blobs are freed by `image gc`)")
    .argument("<tags...>")
    .action((tags: string[]) =>
      withStore(async (s) => {
        let missing = 0;
        for (const t of tags) {
          if (s.remove(t)) {
            process.stdout.write(`${t}\n`);
            await removeImageSnapshots(t);
          } else {
            process.stderr.write(`matchlock: no image ${t}\n`);
            missing++;
          }
        }
        if (missing > 0)
          throw new MatchlockError("IMAGE_NOT_FOUND", `${missing} of the images were not found`);
      }),
    );

  image
    .command("gc")
    .summary("free layer blobs and base disks no image uses")
    .action(() =>
      withStore(async (s) => {
        const r = await s.gc();
        process.stdout.write(`freed ${r.blobs} blobs and ${r.rootfs} base disks (${mb(r.bytes)})\n`);
      }),
    );
}
