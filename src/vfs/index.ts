import { chmod, chown, mkdir, stat } from "node:fs/promises";
import { basename, dirname } from "node:path";
import { HostFsProvider } from "./host-fs.ts";
import { type FileEvent, InterceptProvider, type VfsRule } from "./intercept.ts";
import { MemoryProvider } from "./memory.ts";
import { type BaseRecorder, OverlayProvider } from "./overlay.ts";
import { FsError, type Provider } from "./provider.ts";
import { ReadOnlyProvider } from "./readonly.ts";
import { type Mount, MountRouter } from "./router.ts";
import { SingleFileProvider } from "./single-file.ts";

/**
 * The VFS layer's entry point: builds the provider tree of one VM's workspace from its config
 * (`vfs.workspace` + `vfs.mounts`, the shapes of src/api/config.ts, restated here because lower layers
 * do not import upper ones) and hands it to a FuseServer. See docs/vfs.md.
 */

export { FuseServer, type FuseServerOptions } from "./server.ts";
export { type StreamOptions, serveStream } from "./stream.ts";
export type { FileEvent, Mount, Provider, VfsRule };
export {
  HostFsProvider,
  InterceptProvider,
  MemoryProvider,
  MountRouter,
  OverlayProvider,
  ReadOnlyProvider,
  SingleFileProvider,
};

export interface MountConfig {
  type: "memory" | "host_fs" | "overlay";
  host_path?: string;
  readonly?: boolean;
}

export interface WorkspaceConfig {
  /** The guest path the FUSE file system is mounted at (e.g. /workspace). */
  workspace: string;
  /** Guest path → mount, every path at or below the workspace. */
  mounts: Record<string, MountConfig>;
  /** A fresh per-VM directory for the n-th overlay mount's upper layer (created 0700 here). */
  overlayUpper: (index: number) => string;
  /** Told what the host had at each path the guest changes in the n-th overlay, before the change. */
  overlayBase?: (index: number) => BaseRecorder;
  /** `vfs.interception`: rules checked before operations, file events after. */
  interception?: { rules?: VfsRule[]; emit_events?: boolean };
  onEvent?: (event: FileEvent) => void;
}

/** The guest path relative to the workspace, as a router path ("/" for the workspace itself). */
export function routerPath(workspace: string, guestPath: string): string {
  const ws = workspace.replace(/\/+$/, "") || "/";
  const g = guestPath.replace(/\/+$/, "") || "/";
  if (g === ws) return "/";
  if (ws === "/") return g;
  if (!g.startsWith(`${ws}/`))
    throw new FsError("EINVAL", `mount ${guestPath} is not inside the workspace ${workspace}`);
  return g.slice(ws.length);
}

/**
 * Guest path → n of the n-th overlay mount, in the config's order: the one numbering of the overlays'
 * upper directories and base logs (`overlayUpper`, `overlayBase`), which the sandbox's record of
 * overlays for diff/apply must match.
 */
export function overlayIndexes(mounts: Record<string, MountConfig>): Map<string, number> {
  const out = new Map<string, number>();
  for (const [guestPath, m] of Object.entries(mounts)) if (m.type === "overlay") out.set(guestPath, out.size);
  return out;
}

/**
 * One mount's provider. A host_path that is a file (not a folder) is a single-file mount: the
 * provider of its parent directory, restricted to that one name.
 */
export async function providerFor(
  m: MountConfig,
  upper: () => Promise<string>,
  onBase?: BaseRecorder,
): Promise<Provider> {
  let p: Provider;
  if (m.type === "memory") {
    p = new MemoryProvider();
  } else {
    if (!m.host_path) throw new FsError("EINVAL", `${m.type} mount without host_path`);
    const file = !(await stat(m.host_path)).isDirectory();
    const dir = file ? dirname(m.host_path) : m.host_path;
    if (m.type === "host_fs") p = new HostFsProvider(dir);
    else {
      // The overlay's root is its upper directory: it takes the folder's mode and owner, so the
      // guest sees the folder as it is (the VM dir around it is private already).
      const upperDir = await upper();
      const root = await stat(dir);
      await chmod(upperDir, root.mode & 0o7777);
      await chown(upperDir, root.uid, root.gid);
      p = new OverlayProvider(
        new ReadOnlyProvider(new HostFsProvider(dir)),
        new HostFsProvider(upperDir),
        onBase,
      );
    }
    if (file) p = new SingleFileProvider(p, basename(m.host_path));
  }
  return m.readonly ? new ReadOnlyProvider(p) : p;
}

/**
 * The provider serving one workspace: the router of its mounts (synthesised directories between
 * them), behind the interception rules when there are any.
 */
export async function buildWorkspace(config: WorkspaceConfig): Promise<Provider> {
  const mounts: Mount[] = [];
  const overlays = overlayIndexes(config.mounts);
  try {
    for (const [guestPath, m] of Object.entries(config.mounts)) {
      const index = overlays.get(guestPath);
      const provider = await providerFor(
        m,
        async () => {
          if (index === undefined) throw new FsError("EINVAL", `${guestPath} is not an overlay mount`);
          const dir = config.overlayUpper(index);
          await mkdir(dir, { recursive: true, mode: 0o700 });
          return dir;
        },
        index === undefined ? undefined : config.overlayBase?.(index),
      );
      mounts.push({ path: routerPath(config.workspace, guestPath), provider });
    }
    const router = new MountRouter(mounts);
    const i = config.interception;
    if (!i || ((i.rules ?? []).length === 0 && !i.emit_events)) return router;
    return new InterceptProvider(router, {
      rules: i.rules ?? [],
      prefix: config.workspace,
      emitEvents: i.emit_events ?? false,
      ...(config.onEvent ? { onEvent: config.onEvent } : {}),
    });
  } catch (e) {
    for (const m of mounts) await m.provider.close?.();
    throw e;
  }
}
