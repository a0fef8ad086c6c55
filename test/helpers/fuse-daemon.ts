import { join } from "node:path";
import { HostFsProvider } from "../../src/vfs/host-fs.ts";
import { buildWorkspace } from "../../src/vfs/index.ts";
import { MemoryProvider } from "../../src/vfs/memory.ts";
import { OverlayProvider } from "../../src/vfs/overlay.ts";
import type { Provider } from "../../src/vfs/provider.ts";
import { ReadOnlyProvider } from "../../src/vfs/readonly.ts";
import { MountRouter } from "../../src/vfs/router.ts";
import { FuseServer } from "../../src/vfs/server.ts";
import { detach, type ProviderSpec, serveDevFuse } from "./host-fuse.ts";

/** The child of host-fuse.ts's mountInChild: `node fuse-daemon.ts <mountpoint> <spec json>`. */

async function build(spec: ProviderSpec): Promise<Provider> {
  switch (spec.kind) {
    case "memory":
      return new MemoryProvider();
    case "host_fs": {
      const p = new HostFsProvider(spec.root);
      return spec.readonly ? new ReadOnlyProvider(p) : p;
    }
    case "overlay":
      return new OverlayProvider(
        new ReadOnlyProvider(new HostFsProvider(spec.lower)),
        new HostFsProvider(spec.upper),
      );
    case "workspace":
      return buildWorkspace({
        workspace: spec.workspace,
        mounts: spec.mounts,
        overlayUpper: (i) => join(spec.upperBase, `mount-${i}`),
        ...(spec.interception ? { interception: spec.interception } : {}),
        onEvent: (e) => process.stderr.write(`event ${JSON.stringify(e)}\n`),
      });
    case "router": {
      const mounts = [];
      for (const m of spec.mounts) mounts.push({ path: m.guestPath, provider: await build(m.spec) });
      return new MountRouter(mounts);
    }
  }
}

const [mountpoint, json, serverJson] = process.argv.slice(2);
if (!mountpoint || !json) throw new Error("usage: fuse-daemon.ts <mountpoint> <spec> [server options]");
const server = new FuseServer({
  provider: await build(JSON.parse(json) as ProviderSpec),
  ...(JSON.parse(serverJson ?? "{}") as { entryTimeout?: number; attrTimeout?: number }),
});
const served = serveDevFuse(server, mountpoint);
// The test process died or is done with us: never leave a dead mount behind.
const bail = () => {
  detach(mountpoint);
  setTimeout(() => process.exit(0), 2000).unref();
};
process.stdin.on("end", bail);
// Commands from the test, one per line: `inval <path>` → notifications to the kernel.
let pendingInput = "";
process.stdin.on("data", (d: Buffer) => {
  pendingInput += d.toString();
  for (let nl = pendingInput.indexOf("\n"); nl >= 0; nl = pendingInput.indexOf("\n")) {
    const line = pendingInput.slice(0, nl);
    pendingInput = pendingInput.slice(nl + 1);
    if (line.startsWith("inval ")) {
      served.notify(server.invalidate(line.slice(6)));
      process.stdout.write("invalidated\n");
    }
  }
});
process.stdin.on("error", bail);
process.stdin.resume();
process.on("SIGTERM", bail);
process.stdout.write("ready\n");
await served.done;
await server.close();
process.exit(0);
