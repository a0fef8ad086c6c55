import { existsSync } from "node:fs";
import Database from "better-sqlite3";
import { parseSandboxConfig } from "../api/config.ts";
import { paths } from "../api/paths.ts";
import { loadLibc } from "../host/libc.ts";

/**
 * What a `create` would load the first time, loaded while `matchlock rpc` waits idle for its first
 * request (the SDK's spare child waits there for seconds): so that create pays none of it. The
 * sandbox module itself is loaded before the server starts reading (server.ts imports it); these
 * are what it loads lazily, measured with a module-load trace of a create.
 *
 * Then it rehearses create's host-side steps without making anything (below), for V8.
 *
 * Only while idle: each step first checks `busy` and stops once a request has come in, so a child
 * that is sent `create` at once (a Client without a spare) gets no extra work before it; a step
 * that is already running finishes first (an import in flight is shared with create's own; a
 * rehearsal takes ~10 ms at most). Failures are ignored: the create that needs the module reports
 * them.
 */
const STEPS: ReadonlyArray<() => unknown> = [
  // koffi and libc (the disk clone's sparse copy, the VFS): ~6–18 ms, loaded synchronously on first use.
  () => loadLibc(),
  // better-sqlite3's native addon, loaded by the first Database (the VM record): ~3 ms. In memory: no file.
  () => new Database(":memory:").close(),
  // The config schema's code paths, for the JIT: pure.
  () => parseSandboxConfig({}),
  // Intercept mode's CA (@peculiar/x509, ~200 files): ~100–150 ms of every create with a network
  // policy (allowed hosts, secrets, hooks).
  () => import("../net/mitm-ca.ts"),
  // Intercept mode's proxy (TLS, HTTP, the hooks): ~50 ms, loaded by such creates only.
  () => import("../net/proxy.ts"),
  // The image store, for any image but the default: ~15–25 ms.
  () => import("../image/store.ts"),
  // Rehearsals of create's host-side steps, for V8 (a fresh process's first create spent ~30 ms
  // more in them than later ones; with these, an SDK create measured 342 → 327 ms p50): a DNS
  // server and a TCP relay on loopback, opened and closed at once; `nft` and `ip route` run as
  // create runs them (read only); state.db read, where an earlier create made one.
  () =>
    import("../net/dns.ts").then(async ({ DnsServer }) => {
      const dns = await DnsServer.listen({
        address: "127.0.0.1",
        localHosts: new Map(),
        upstreams: [],
        refuses: () => undefined,
      });
      await dns.close();
    }),
  () =>
    import("../net/tcp-relay.ts").then(async ({ TcpRelay }) => {
      const relay = await TcpRelay.listen({
        address: "127.0.0.1",
        originalDestination: async () => undefined,
        refuses: () => undefined,
      });
      relay.close();
    }),
  () =>
    import("../host/command.ts").then(({ runCommand }) =>
      runCommand("nft", ["--version"], { allowFailure: true }),
    ),
  () => import("../net/host-net.ts").then(({ routedSubnets }) => routedSubnets()),
  async () => {
    const p = paths();
    const { openState, stateDbPath } = await import("../state/store.ts");
    if (!existsSync(stateDbPath(p))) return; // nothing is created here
    const state = openState(p);
    try {
      state.snapshots.list();
      state.vms.list();
    } finally {
      state.close();
    }
  },
];

/** A turn of the event loop, so a request that arrived is seen before the next step. */
const tick = () => new Promise<void>((r) => setImmediate(r));

export async function warmUp(busy: () => boolean): Promise<void> {
  for (const step of STEPS) {
    await tick();
    if (busy()) return;
    try {
      await step();
    } catch {}
  }
}
