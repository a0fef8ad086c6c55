import { homedir } from "node:os";
import { join } from "node:path";
import { parseVmId } from "./ids.ts";

/**
 * Where matchlock keeps things (PROTOCOLS.md "Paths"). `MATCHLOCK_HOME` and `MATCHLOCK_CACHE`
 * move them, which tests use to stay out of the user's real directories.
 */
export interface Paths {
  /** ~/.matchlock: state.db and the VM dirs. */
  readonly home: string;
  /** ~/.matchlock/vms: one 0700 dir per VM. */
  readonly vms: string;
  /** ~/.cache/matchlock: kernels, images, the guest agent, probes. */
  readonly cache: string;
  readonly kernels: string;
  readonly images: string;
  /** The guest agent binary and the initramfs built from it. */
  readonly guest: string;
}

export function paths(env: NodeJS.ProcessEnv = process.env): Paths {
  const home = env.MATCHLOCK_HOME ?? join(homedir(), ".matchlock");
  const cache = env.MATCHLOCK_CACHE ?? join(homedir(), ".cache", "matchlock");
  return {
    home,
    vms: join(home, "vms"),
    cache,
    kernels: join(cache, "kernels"),
    images: join(cache, "images"),
    guest: join(cache, "guest"),
  };
}

/** A VM's dir. The id is checked here too, as the last line of defence: it becomes a path. */
export function vmDir(id: string, p: Paths = paths()): string {
  return join(p.vms, parseVmId(id));
}
