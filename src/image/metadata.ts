import { join } from "node:path";
import type { Paths } from "../api/paths.ts";
import { type Db, type ModuleMigrations, nowIso, openDb, stmt, writeTx } from "../state/db.ts";

/**
 * ~/.cache/matchlock/images/metadata.db: the `images` table of PROTOCOLS.md §4 plus our layer tables.
 * Blobs live as files named by digest; these tables say which images use which blobs, so `image gc`
 * can free what nothing uses.
 */

export const IMAGE_MIGRATIONS: ModuleMigrations = {
  module: "image",
  migrations: [
    {
      version: 1,
      name: "create_images",
      sql: `
CREATE TABLE IF NOT EXISTS images (
  scope TEXT NOT NULL,
  tag TEXT NOT NULL,
  digest TEXT NOT NULL,
  size INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  source TEXT NOT NULL DEFAULT '',
  rootfs_path TEXT NOT NULL DEFAULT '',
  oci_json TEXT NOT NULL DEFAULT '{}',
  updated_at TEXT NOT NULL,
  PRIMARY KEY (scope, tag)
);
CREATE INDEX IF NOT EXISTS idx_images_digest ON images(digest);`,
    },
    {
      version: 2,
      name: "create_blobs_and_layers",
      sql: `
CREATE TABLE IF NOT EXISTS blobs (
  digest TEXT PRIMARY KEY,
  size INTEGER NOT NULL,
  media_type TEXT NOT NULL DEFAULT '',
  created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS image_blobs (
  image_digest TEXT NOT NULL,
  position INTEGER NOT NULL,
  blob_digest TEXT NOT NULL REFERENCES blobs(digest),
  role TEXT NOT NULL,
  PRIMARY KEY (image_digest, position)
);
CREATE INDEX IF NOT EXISTS idx_image_blobs_blob ON image_blobs(blob_digest);`,
    },
  ],
};

export type Scope = "local" | "registry";

export interface ImageRow {
  scope: Scope;
  tag: string;
  digest: string;
  size: number;
  created_at: string;
  source: string;
  rootfs_path: string;
  oci_json: string;
  updated_at: string;
}

export interface BlobRef {
  digest: string;
  size: number;
  mediaType: string;
  role: "config" | "layer" | "manifest";
}

export function metadataPath(p: Paths): string {
  return join(p.images, "metadata.db");
}

export class ImageMetadata {
  readonly db: Db;

  constructor(p: Paths) {
    this.db = openDb(metadataPath(p), [IMAGE_MIGRATIONS]);
  }

  close(): void {
    this.db.close();
  }

  get(scope: Scope, tag: string): ImageRow | undefined {
    return stmt(this.db, "SELECT * FROM images WHERE scope = ? AND tag = ?").get(scope, tag) as
      | ImageRow
      | undefined;
  }

  list(): ImageRow[] {
    return stmt(this.db, "SELECT * FROM images ORDER BY tag, scope").all() as ImageRow[];
  }

  /** Records an image and the blobs it uses, in one transaction. */
  put(row: Omit<ImageRow, "created_at" | "updated_at">, blobs: BlobRef[]): void {
    const now = nowIso();
    writeTx(this.db, () => {
      for (const b of blobs) {
        stmt(
          this.db,
          "INSERT OR IGNORE INTO blobs(digest, size, media_type, created_at) VALUES (?, ?, ?, ?)",
        ).run(b.digest, b.size, b.mediaType, now);
      }
      stmt(this.db, "DELETE FROM image_blobs WHERE image_digest = ?").run(row.digest);
      blobs.forEach((b, i) => {
        stmt(
          this.db,
          "INSERT INTO image_blobs(image_digest, position, blob_digest, role) VALUES (?, ?, ?, ?)",
        ).run(row.digest, i, b.digest, b.role);
      });
      stmt(
        this.db,
        `INSERT INTO images(scope, tag, digest, size, created_at, source, rootfs_path, oci_json, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT(scope, tag) DO UPDATE SET digest = excluded.digest, size = excluded.size, source = excluded.source,
           rootfs_path = excluded.rootfs_path, oci_json = excluded.oci_json, updated_at = excluded.updated_at`,
      ).run(row.scope, row.tag, row.digest, row.size, now, row.source, row.rootfs_path, row.oci_json, now);
    });
  }

  setRootfs(digest: string, path: string): void {
    writeTx(this.db, () =>
      stmt(this.db, "UPDATE images SET rootfs_path = ?, updated_at = ? WHERE digest = ?").run(
        path,
        nowIso(),
        digest,
      ),
    );
  }

  remove(scope: Scope, tag: string): boolean {
    return writeTx(
      this.db,
      () => stmt(this.db, "DELETE FROM images WHERE scope = ? AND tag = ?").run(scope, tag).changes > 0,
    );
  }

  /** Blobs of an image, in order (config first, then layers bottom-up). */
  blobsOf(digest: string): BlobRef[] {
    return (
      stmt(
        this.db,
        `SELECT b.digest, b.size, b.media_type AS mediaType, ib.role FROM image_blobs ib JOIN blobs b ON b.digest = ib.blob_digest
         WHERE ib.image_digest = ? ORDER BY ib.position`,
      ).all(digest) as BlobRef[]
    ).map((r) => ({ ...r }));
  }

  /** Forgets image→blob links of images no tag points at, and blobs no image uses; returns the freed blobs. */
  collectGarbage(): { blobs: string[]; images: string[] } {
    return writeTx(this.db, () => {
      const images = (
        stmt(
          this.db,
          "SELECT DISTINCT image_digest FROM image_blobs WHERE image_digest NOT IN (SELECT digest FROM images)",
        ).all() as Array<{
          image_digest: string;
        }>
      ).map((r) => r.image_digest);
      stmt(this.db, "DELETE FROM image_blobs WHERE image_digest NOT IN (SELECT digest FROM images)").run();
      const blobs = (
        stmt(
          this.db,
          "SELECT digest FROM blobs WHERE digest NOT IN (SELECT blob_digest FROM image_blobs)",
        ).all() as Array<{
          digest: string;
        }>
      ).map((r) => r.digest);
      stmt(this.db, "DELETE FROM blobs WHERE digest NOT IN (SELECT blob_digest FROM image_blobs)").run();
      return { blobs, images };
    });
  }

  /** Image digests still tagged somewhere. */
  liveDigests(): Set<string> {
    return new Set(
      (stmt(this.db, "SELECT DISTINCT digest FROM images").all() as Array<{ digest: string }>).map(
        (r) => r.digest,
      ),
    );
  }
}
