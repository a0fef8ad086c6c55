import type { Dirent, Stats } from "node:fs";
import {
  chmod,
  copyFile,
  lstat,
  mkdir,
  open,
  readdir,
  readFile,
  readlink,
  rename,
  rmdir,
  symlink,
  unlink,
} from "node:fs/promises";
import { join } from "node:path";
import { createTwoFilesPatch } from "diff";
import { InvalidArgumentError, messageOf } from "../api/errors.ts";
import { OPAQUE, WHITEOUT_PREFIX } from "../vfs/overlay.ts";
import { type BaseRecord, OVERLAYS_FILE, type OverlayRecord, overlayPaths } from "./host-folders.ts";

/**
 * Review and apply (issue #13): what the guest changed in its overlay mounts, read from the VM dir
 * (so it works on a stopped VM kept with `--rm=false`), and writing chosen changes back to the host
 * folders. Each file is written atomically (a temporary file in the same folder, then rename) with
 * its mode; a host file that changed since the guest first touched it (size, mtime or inode differ
 * from the base recorded then) is a conflict, refused unless forced. Nothing on the host is followed
 * through a symlink: a link on the way to a target refuses that change.
 */

export type ChangeKind = "added" | "modified" | "deleted";
export type EntryType = "file" | "dir" | "link" | "other";

export interface OverlayChange {
  kind: ChangeKind;
  type: EntryType;
  /** Where the guest saw it, e.g. /workspace/repo/src/main.c. */
  guestPath: string;
  /** The host file it changes: `hostDir` + `rel`. */
  hostPath: string;
  /** The mount's host folder (for a single file, its parent). */
  hostDir: string;
  /** Inside the mount, with a leading slash. */
  rel: string;
  /** The guest's version (absent for deletions). */
  upperPath?: string;
  /** Why applying it could lose a host change, if it could. */
  conflict?: string;
}

function typeOf(st: Stats | Dirent): EntryType {
  return st.isFile() ? "file" : st.isDirectory() ? "dir" : st.isSymbolicLink() ? "link" : "other";
}

async function tryLstat(path: string): Promise<Stats | undefined> {
  try {
    return await lstat(path);
  } catch {
    return undefined;
  }
}

/**
 * Whether every folder on the way from `hostDir` to `rel` is a real directory (no symlink): only
 * then is the host path inside the folder. A path behind a host symlink is treated as absent, so
 * nothing outside the folder is ever read, compared or written.
 */
async function insideFolder(hostDir: string, rel: string): Promise<boolean> {
  let at = hostDir;
  for (const part of rel.split("/").filter(Boolean).slice(0, -1)) {
    at = join(at, part);
    const st = await tryLstat(at);
    if (!st?.isDirectory()) return false;
  }
  return true;
}

/** lstat of a path inside the folder; undefined when absent or behind a host symlink. */
async function hostLstat(hostDir: string, rel: string): Promise<Stats | undefined> {
  return (await insideFolder(hostDir, rel)) ? tryLstat(join(hostDir, rel)) : undefined;
}

/** Byte-equal files, read a piece at a time. */
async function sameContent(a: string, b: string): Promise<boolean> {
  const [fa, fb] = await Promise.all([open(a, "r"), open(b, "r")]);
  try {
    const ba = Buffer.alloc(1 << 20);
    const bb = Buffer.alloc(1 << 20);
    for (;;) {
      const [ra, rb] = await Promise.all([fa.read(ba, 0, ba.length, null), fb.read(bb, 0, bb.length, null)]);
      if (ra.bytesRead !== rb.bytesRead) return false;
      if (ra.bytesRead === 0) return true;
      if (!ba.subarray(0, ra.bytesRead).equals(bb.subarray(0, rb.bytesRead))) return false;
    }
  } finally {
    await fa.close();
    await fb.close();
  }
}

async function readOverlays(vmDir: string): Promise<OverlayRecord[]> {
  try {
    return JSON.parse(await readFile(join(vmDir, "vfs", OVERLAYS_FILE), "utf8")) as OverlayRecord[];
  } catch {
    return [];
  }
}

async function readBases(file: string): Promise<Map<string, BaseRecord>> {
  const out = new Map<string, BaseRecord>();
  let text = "";
  try {
    text = await readFile(file, "utf8");
  } catch {
    return out;
  }
  for (const line of text.split("\n")) {
    if (line === "") continue;
    try {
      const r = JSON.parse(line) as BaseRecord;
      if (!out.has(r.path)) out.set(r.path, r);
    } catch {}
  }
  return out;
}

/** Why the host copy at `hostPath` is not what the guest based its change on, if it is not. */
async function conflictOf(
  base: BaseRecord | undefined,
  hostDir: string,
  rel: string,
): Promise<string | undefined> {
  if (base === undefined) return undefined; // nothing recorded (a VM from before bases were kept)
  const now = (await insideFolder(hostDir, rel))
    ? await lstat(join(hostDir, rel), { bigint: true }).catch(() => undefined)
    : undefined;
  if ("absent" in base) return now ? "created on the host since the guest made it" : undefined;
  if (!now) return "deleted on the host since the guest changed it";
  if (base.type === "dir" && now.isDirectory()) return undefined;
  if (String(now.ino) !== base.ino || Number(now.size) !== base.size || String(now.mtimeNs) !== base.mtime_ns)
    return "changed on the host since the guest first changed it";
  return undefined;
}

/** Every change of one overlay mount. */
async function mountChanges(vmDir: string, o: OverlayRecord): Promise<OverlayChange[]> {
  const { upper, base } = overlayPaths(vmDir, o.index);
  const bases = await readBases(base);
  const out: OverlayChange[] = [];
  const guestOf = (rel: string) =>
    o.file !== undefined ? o.guest_path : `${o.guest_path.replace(/\/$/, "")}${rel === "/" ? "" : rel}`;
  const add = async (kind: ChangeKind, type: EntryType, rel: string, upperPath?: string) => {
    const hostPath = join(o.host_dir, rel);
    const conflict = await conflictOf(bases.get(rel), o.host_dir, rel);
    out.push({
      kind,
      type,
      guestPath: guestOf(rel),
      hostPath,
      hostDir: o.host_dir,
      rel,
      ...(upperPath === undefined ? {} : { upperPath }),
      ...(conflict === undefined ? {} : { conflict }),
    });
  };
  /** Everything under an added directory is added too. */
  const addAll = async (rel: string) => {
    for (const e of await readdir(join(upper, rel), { withFileTypes: true })) {
      if (e.name.startsWith(WHITEOUT_PREFIX)) continue;
      const child = `${rel === "/" ? "" : rel}/${e.name}`;
      await add("added", typeOf(e), child, join(upper, child));
      if (e.isDirectory()) await addAll(child);
    }
  };
  const walk = async (rel: string, lowerListed: boolean) => {
    let entries: Dirent[];
    try {
      entries = await readdir(join(upper, rel), { withFileTypes: true });
    } catch {
      return;
    }
    const opaque = entries.some((e) => e.name === OPAQUE);
    const seen = new Set<string>();
    for (const e of entries) {
      if (e.name === OPAQUE || e.name.startsWith(`${WHITEOUT_PREFIX}${WHITEOUT_PREFIX}`)) continue;
      const prefix = rel === "/" ? "" : rel;
      if (e.name.startsWith(WHITEOUT_PREFIX)) {
        const name = e.name.slice(WHITEOUT_PREFIX.length);
        const child = `${prefix}/${name}`;
        if (o.file !== undefined && child !== `/${o.file}`) continue;
        seen.add(name);
        const low = lowerListed ? await hostLstat(o.host_dir, child) : undefined;
        if (low) await add("deleted", typeOf(low), child);
        continue;
      }
      const child = `${prefix}/${e.name}`;
      if (o.file !== undefined && child !== `/${o.file}`) continue;
      seen.add(e.name);
      const up = join(upper, child);
      const low = lowerListed ? await hostLstat(o.host_dir, child) : undefined;
      const type = typeOf(e);
      if (e.isDirectory()) {
        if (!low?.isDirectory()) {
          await add(low ? "modified" : "added", "dir", child, up);
          await addAll(child);
        } else await walk(child, true);
        continue;
      }
      if (!low) {
        await add("added", type, child, up);
        continue;
      }
      const st = await lstat(up);
      let same = typeOf(low) === type && (low.mode & 0o7777) === (st.mode & 0o7777);
      if (same && type === "file")
        same = low.size === st.size && (await sameContent(up, join(o.host_dir, child)));
      if (same && type === "link") same = (await readlink(up)) === (await readlink(join(o.host_dir, child)));
      if (!same) await add("modified", type, child, up);
    }
    // An opaque directory hides every lower entry it does not have itself.
    if (opaque && lowerListed) {
      const lowerEntries = await readdir(join(o.host_dir, rel), { withFileTypes: true }).catch(() => []);
      for (const e of lowerEntries) {
        if (seen.has(e.name)) continue;
        await add("deleted", typeOf(e), `${rel === "/" ? "" : rel}/${e.name}`);
      }
    }
  };
  await walk("/", true);
  return out;
}

/** What the guest changed in every overlay mount of the VM whose dir this is. */
export async function overlayChanges(vmDir: string): Promise<OverlayChange[]> {
  const out: OverlayChange[] = [];
  for (const o of await readOverlays(vmDir)) out.push(...(await mountChanges(vmDir, o)));
  return out;
}

/** Whether a change is selected by `--path` values (guest paths, or host paths; a folder selects what is under it). */
export function selected(c: OverlayChange, paths: readonly string[]): boolean {
  if (paths.length === 0) return true;
  const under = (p: string, sel: string) => {
    const s = sel.replace(/\/+$/, "");
    return p === s || p.startsWith(`${s}/`);
  };
  return paths.some((p) => under(c.guestPath, p) || under(c.hostPath, p));
}

/** A unified diff of a changed text file (undefined for binary or large files, and non-files). */
export async function textDiff(c: OverlayChange): Promise<string | undefined> {
  const MAX = 1024 * 1024;
  const read = async (p: string | undefined) => {
    if (p === undefined) return "";
    const st = await tryLstat(p);
    if (!st?.isFile() || st.size > MAX) return undefined;
    const b = await readFile(p);
    return b.subarray(0, 8192).includes(0) ? undefined : b.toString("utf8");
  };
  if (c.type !== "file") return undefined;
  const inside = await insideFolder(c.hostDir, c.rel);
  const before = c.kind === "added" || !inside ? "" : await read(c.hostPath);
  const after = c.kind === "deleted" ? "" : await read(c.upperPath);
  if (before === undefined || after === undefined) return undefined;
  return createTwoFilesPatch(`host${c.guestPath}`, `guest${c.guestPath}`, before, after, "", "", {
    context: 3,
  });
}

export interface ApplyResult {
  change: OverlayChange;
  applied: boolean;
  /** Why it was not applied. */
  reason?: string;
}

async function applyOne(c: OverlayChange): Promise<void> {
  if (!(await insideFolder(c.hostDir, c.rel))) {
    throw new Error(
      `a symlink (or no folder) on the host is on the way to ${c.hostPath}; nothing is written through it`,
    );
  }
  const now = await tryLstat(c.hostPath);
  if (c.kind === "deleted") {
    if (!now) return;
    if (now.isDirectory()) await rmdir(c.hostPath);
    else await unlink(c.hostPath);
    return;
  }
  const up = await lstat(c.upperPath as string);
  if (c.type === "dir") {
    if (now && !now.isDirectory()) await unlink(c.hostPath);
    if (!now?.isDirectory()) await mkdir(c.hostPath, up.mode & 0o7777);
    else await chmod(c.hostPath, up.mode & 0o7777);
    return;
  }
  if (now?.isDirectory()) throw new Error(`${c.hostPath} is a directory on the host`);
  const tmp = join(
    c.hostDir,
    c.rel,
    `../.matchlock-apply-${process.pid}-${Math.random().toString(36).slice(2)}`,
  );
  try {
    if (c.type === "link") await symlink(await readlink(c.upperPath as string), tmp);
    else if (c.type === "file") {
      await copyFile(c.upperPath as string, tmp);
      await chmod(tmp, up.mode & 0o7777);
    } else throw new Error(`${c.guestPath} is a special file; not applied`);
    await rename(tmp, c.hostPath);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw e;
  }
}

/**
 * Applies the selected changes: directories first (parents before children), then files, then
 * deletions (children before parents). A conflict is skipped unless `force`; `dryRun` only says
 * what would happen.
 */
export async function applyOverlayChanges(
  vmDir: string,
  opts: { paths?: readonly string[]; force?: boolean; dryRun?: boolean } = {},
): Promise<ApplyResult[]> {
  const overlays = await readOverlays(vmDir);
  if (overlays.length === 0) {
    throw new InvalidArgumentError(
      "this VM has no overlay mounts: nothing to apply",
      "only -v … (overlay) mounts keep changes apart from the host",
    );
  }
  const changes = (await overlayChanges(vmDir)).filter((c) => selected(c, opts.paths ?? []));
  const order = (c: OverlayChange) => (c.kind === "deleted" ? 2 : c.type === "dir" ? 0 : 1);
  changes.sort((a, b) => {
    const d = order(a) - order(b);
    if (d !== 0) return d;
    return a.kind === "deleted" ? b.hostPath.localeCompare(a.hostPath) : a.hostPath.localeCompare(b.hostPath);
  });
  const results: ApplyResult[] = [];
  for (const c of changes) {
    if (c.conflict && !opts.force) {
      results.push({ change: c, applied: false, reason: `${c.conflict} (--force to overwrite)` });
      continue;
    }
    if (opts.dryRun) {
      results.push({ change: c, applied: false, reason: "dry run" });
      continue;
    }
    try {
      await applyOne(c);
      results.push({ change: c, applied: true });
    } catch (e) {
      results.push({ change: c, applied: false, reason: messageOf(e) });
    }
  }
  return results;
}
