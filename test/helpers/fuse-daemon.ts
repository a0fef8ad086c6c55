import { HostFsProvider } from "../../src/vfs/host-fs.ts";
import { MemoryProvider } from "../../src/vfs/memory.ts";
import type { Provider } from "../../src/vfs/provider.ts";
import { ReadOnlyProvider } from "../../src/vfs/readonly.ts";
import { FuseServer } from "../../src/vfs/server.ts";
import { type ProviderSpec, serveDevFuse } from "./host-fuse.ts";

/** The child of host-fuse.ts's mountInChild: `node fuse-daemon.ts <mountpoint> <spec json>`. */

async function build(spec: ProviderSpec): Promise<Provider> {
  switch (spec.kind) {
    case "memory":
      return new MemoryProvider();
    case "host_fs": {
      const p = new HostFsProvider(spec.root);
      return spec.readonly ? new ReadOnlyProvider(p) : p;
    }
    default:
      throw new Error(`unknown spec ${spec.kind}`);
  }
}

const [mountpoint, json] = process.argv.slice(2);
if (!mountpoint || !json) throw new Error("usage: fuse-daemon.ts <mountpoint> <spec>");
const server = new FuseServer({ provider: await build(JSON.parse(json) as ProviderSpec) });
const served = serveDevFuse(server, mountpoint);
process.stdout.write("ready\n");
await served.done;
await server.close();
process.exit(0);
