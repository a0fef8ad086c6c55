import type { SandboxConfigInput } from "../api/config.ts";
import {
  type CompiledNetworkHook,
  compileNetworkInterception,
  type NetworkHookFunc,
  type NetworkHookRule,
} from "./network-hooks.ts";
import {
  type CompiledVfsInterception,
  compileVfsInterception,
  type VFSInterceptionConfig,
} from "./vfs-hooks.ts";

/**
 * The immutable sandbox builder: every `with…` returns a new Sandbox, so a base definition can be
 * shared and specialised without surprises. `options()` is the wire config of PROTOCOLS.md §3 — the
 * same type the server validates.
 */

export interface MountOptions {
  type?: "memory" | "host_fs" | "overlay";
  hostPath?: string;
  readonly?: boolean;
}

export interface ImageConfigOptions {
  user?: string;
  workingDir?: string;
  entrypoint?: string[];
  cmd?: string[];
  env?: Record<string, string>;
}

export interface PortForwardSpec {
  localPort: number;
  remotePort: number;
}

/** Matchlock's `withNetworkInterception` argument: rules, each static or with a `hook` callback. */
export interface NetworkInterceptionConfig {
  rules?: NetworkHookRule[];
}

/** Which requests a callback added with onNetworkRequest / onNetworkResponse sees (all when empty). */
export interface NetworkHookFilter {
  name?: string;
  hosts?: string[];
  methods?: string[];
  path?: string;
  timeoutMs?: number;
}

/** Matchlock's `withVFSInterception` argument (our earlier name for VFSInterceptionConfig). */
export type VfsInterceptionConfig = VFSInterceptionConfig;

/** What a builder carries besides the create config. */
export interface SandboxExtras {
  /** Port forwards the client sets up right after create (not part of the create config). */
  portForwards?: readonly PortForwardSpec[];
  portForwardAddresses?: readonly string[];
  /** Network hook rules; the callbacks among them are served by the client (not JSON). */
  networkHookRules?: readonly NetworkHookRule[];
  /** VFS interception as given (callbacks are functions, not JSON); compiled into the config by options(). */
  vfsInterception?: VFSInterceptionConfig | undefined;
}

type Net = NonNullable<SandboxConfigInput["network"]>;
type Vfs = NonNullable<SandboxConfigInput["vfs"]>;

export class Sandbox {
  private readonly config: SandboxConfigInput;
  /** Port forwards the client sets up right after create (not part of the create config). */
  readonly portForwards: readonly PortForwardSpec[];
  readonly portForwardAddresses: readonly string[];
  /** Network hook rules in the order given (static ones and callbacks). */
  readonly networkHookRules: readonly NetworkHookRule[];
  /** The withVFSInterception config (static rules and local callbacks), if any. */
  readonly vfsInterception: VFSInterceptionConfig | undefined;

  /** `image` omitted: the default image built by `matchlock setup`. */
  constructor(image?: string, config: SandboxConfigInput = {}, extras: SandboxExtras = {}) {
    this.config = structuredClone(image === undefined ? config : { ...config, image });
    this.portForwards = Object.freeze([...(extras.portForwards ?? [])]);
    this.portForwardAddresses = Object.freeze([...(extras.portForwardAddresses ?? [])]);
    this.networkHookRules = Object.freeze([...(extras.networkHookRules ?? [])]);
    this.vfsInterception = extras.vfsInterception;
  }

  /**
   * The create config (a copy). Hook rules are in `network.interception` with their callback ids;
   * `callback_socket` is filled in by the client that serves the callbacks. VFS rules: the static
   * ones in `vfs.interception` (with `emit_events` when there are local after hooks), the local
   * callbacks never.
   */
  options(): SandboxConfigInput {
    const config = structuredClone(this.config);
    if (this.networkHookRules.length > 0) {
      config.network = { ...config.network, interception: this.networkHooks().wire };
    }
    if (this.vfsInterception !== undefined) {
      const { wire } = this.vfsHooks();
      const { interception: _replaced, ...vfs } = config.vfs ?? {};
      if (wire) config.vfs = { ...vfs, interception: wire };
      else if (config.vfs) config.vfs = vfs;
    }
    return config;
  }

  /** The VFS wire config and local hooks (compiled anew: callbacks are functions, not data). */
  vfsHooks(): CompiledVfsInterception {
    return compileVfsInterception(this.vfsInterception);
  }

  /** The wire rules and the callbacks by id (compiled anew: callbacks are functions, not data). */
  networkHooks(): { wire: NonNullable<Net["interception"]>; callbacks: Map<string, CompiledNetworkHook> } {
    return compileNetworkInterception(this.networkHookRules);
  }

  private extras(patch: SandboxExtras = {}): SandboxExtras {
    return {
      portForwards: patch.portForwards ?? this.portForwards,
      portForwardAddresses: patch.portForwardAddresses ?? this.portForwardAddresses,
      networkHookRules: patch.networkHookRules ?? this.networkHookRules,
      vfsInterception: "vfsInterception" in patch ? patch.vfsInterception : this.vfsInterception,
    };
  }

  private with(patch: (c: SandboxConfigInput) => void): Sandbox {
    const next = structuredClone(this.config);
    patch(next);
    return new Sandbox(undefined, next, this.extras());
  }

  private net(patch: (n: Net) => void): Sandbox {
    return this.with((c) => {
      c.network ??= {};
      patch(c.network);
    });
  }

  private vfs(patch: (v: Vfs) => void): Sandbox {
    return this.with((c) => {
      c.vfs ??= {};
      patch(c.vfs);
    });
  }

  withImage(image: string): Sandbox {
    return this.with((c) => {
      c.image = image;
    });
  }

  /**
   * Start the image's ENTRYPOINT + CMD detached when the sandbox is created, output in `log()`
   * (Matchlock's `launch()` always asks for this; ours only when told, as it costs up to 500 ms).
   */
  withLaunchEntrypoint(): Sandbox {
    return this.with((c) => {
      c.launch_entrypoint = true;
    });
  }

  withPrivileged(): Sandbox {
    return this.with((c) => {
      c.privileged = true;
    });
  }

  withCPUs(cpus: number): Sandbox {
    return this.with((c) => {
      c.resources = { ...c.resources, cpus };
    });
  }

  withMemory(mb: number): Sandbox {
    return this.with((c) => {
      c.resources = { ...c.resources, memory_mb: mb };
    });
  }

  withDiskSize(mb: number): Sandbox {
    return this.with((c) => {
      c.resources = { ...c.resources, disk_size_mb: mb };
    });
  }

  /**
   * Matchlock's `timeout_seconds`: stored with the VM and not enforced, as in Matchlock (its SDK
   * sends 300 by default, and programs use sandboxes for longer). For a limit, use withLifetime.
   */
  withTimeout(seconds: number): Sandbox {
    return this.with((c) => {
      c.resources = { ...c.resources, timeout_seconds: seconds };
    });
  }

  /** Ours: the VM is closed when this many seconds have passed since create (the CLI's --timeout). */
  withLifetime(seconds: number): Sandbox {
    return this.with((c) => {
      c.resources = { ...c.resources, lifetime_seconds: seconds };
    });
  }

  withEnv(name: string, value: string): Sandbox {
    return this.with((c) => {
      c.env = { ...c.env, [name]: value };
    });
  }

  withEnvMap(env: Record<string, string>): Sandbox {
    return this.with((c) => {
      c.env = { ...c.env, ...env };
    });
  }

  withHostname(hostname: string): Sandbox {
    return this.net((n) => {
      n.hostname = hostname;
    });
  }

  withNoNetwork(): Sandbox {
    return this.net((n) => {
      n.no_network = true;
    });
  }

  withNetworkMTU(mtu: number): Sandbox {
    return this.net((n) => {
      n.mtu = mtu;
    });
  }

  withDNSServers(...servers: string[]): Sandbox {
    return this.net((n) => {
      n.dns_servers = [...(n.dns_servers ?? []), ...servers];
    });
  }

  withBlockPrivateIPs(enabled: boolean): Sandbox {
    return this.net((n) => {
      n.block_private_ips = enabled;
    });
  }

  /** Ours: let the guest reach these exact private, loopback or host addresses (`--allow-private-host`). */
  allowPrivateHost(...addresses: string[]): Sandbox {
    return this.net((n) => {
      n.allow_private_hosts = [...(n.allow_private_hosts ?? []), ...addresses];
    });
  }

  allowHost(...hosts: string[]): Sandbox {
    return this.net((n) => {
      n.allowed_hosts = [...(n.allowed_hosts ?? []), ...hosts];
    });
  }

  /**
   * Intercept mode with no allow-list (every host allowed, secrets still swapped, the allow-list
   * changeable at run time). Matchlock's `withNetworkInterception()` with no rules does the same.
   */
  withNetworkIntercept(): Sandbox {
    return this.net((n) => {
      n.intercept = true;
    });
  }

  /**
   * Matchlock's: intercept mode, plus network hook rules (added after any given before). A rule
   * with `hook` is a callback this program runs: the client serves it while the sandbox lives.
   */
  withNetworkInterception(config: NetworkInterceptionConfig = {}): Sandbox {
    const next = this.withNetworkIntercept();
    const rules = config.rules ?? [];
    if (rules.length === 0) return next;
    return new Sandbox(
      undefined,
      next.config,
      next.extras({ networkHookRules: [...this.networkHookRules, ...rules] }),
    );
  }

  /**
   * Ours: a callback on every request the filter matches, before it leaves (it may block it or
   * rewrite headers, query and path). It sees placeholders, never secret values.
   */
  onNetworkRequest(hook: NetworkHookFunc, filter: NetworkHookFilter = {}): Sandbox {
    return this.withNetworkInterception({ rules: [{ ...filter, phase: "before", hook }] });
  }

  /** Ours: a callback on every response the filter matches (block, headers, body). */
  onNetworkResponse(hook: NetworkHookFunc, filter: NetworkHookFilter = {}): Sandbox {
    return this.withNetworkInterception({ rules: [{ ...filter, phase: "after", hook }] });
  }

  addHost(host: string, ip: string): Sandbox {
    return this.net((n) => {
      n.add_hosts = [...(n.add_hosts ?? []), { host, ip }];
    });
  }

  /** The guest sees a placeholder; the host substitutes `value` only in requests to `hosts`. */
  addSecret(name: string, value: string, ...hosts: string[]): Sandbox {
    return this.net((n) => {
      n.secrets = { ...n.secrets, [name]: { value, hosts } };
    });
  }

  /**
   * Matchlock's VFS interception (replaces an earlier one). Static rules go to the server: `before`
   * rules allow or block (EPERM) the guest's operations in the host folders, `emitEvents` sends a
   * `file` event (ClientOptions.onEvent) after each. Rules with a callback run in this program
   * (src/sdk/vfs-hooks.ts, docs/vfs.md): `hook` / `dangerousHook` after the guest's operations,
   * `actionHook` / `mutateHook` before the client's own writeFile / readFile / listFiles. Rules are
   * checked when the sandbox is launched (or options() is called).
   */
  withVFSInterception(config: VFSInterceptionConfig): Sandbox {
    // A copy of the lists (callbacks kept by reference), so later changes to the caller's arrays do
    // not reach this builder; unknown keys are kept for compile to name.
    const copy: VFSInterceptionConfig =
      config !== null && typeof config === "object"
        ? {
            ...config,
            ...(Array.isArray(config.rules)
              ? { rules: config.rules.map((r) => (r !== null && typeof r === "object" ? { ...r } : r)) }
              : {}),
          }
        : config;
    return new Sandbox(undefined, this.config, this.extras({ vfsInterception: copy }));
  }

  withWorkspace(path: string): Sandbox {
    return this.vfs((v) => {
      v.workspace = path;
    });
  }

  mount(guestPath: string, m: MountOptions): Sandbox {
    return this.vfs((v) => {
      v.mounts = {
        ...v.mounts,
        [guestPath]: {
          type: m.type ?? "memory",
          ...(m.hostPath === undefined ? {} : { host_path: m.hostPath }),
          ...(m.readonly ? { readonly: true } : {}),
        },
      };
    });
  }

  mountHostDir(guestPath: string, hostPath: string): Sandbox {
    return this.mount(guestPath, { type: "host_fs", hostPath });
  }

  mountHostDirReadonly(guestPath: string, hostPath: string): Sandbox {
    return this.mount(guestPath, { type: "host_fs", hostPath, readonly: true });
  }

  mountMemory(guestPath: string): Sandbox {
    return this.mount(guestPath, { type: "memory" });
  }

  mountOverlay(guestPath: string, hostPath: string): Sandbox {
    return this.mount(guestPath, { type: "overlay", hostPath });
  }

  withUser(user: string): Sandbox {
    return this.withImageConfig({ user });
  }

  withEntrypoint(...entrypoint: string[]): Sandbox {
    return this.withImageConfig({ entrypoint });
  }

  withImageConfig(ic: ImageConfigOptions): Sandbox {
    return this.with((c) => {
      const cur = c.image_config ?? {};
      c.image_config = {
        ...cur,
        ...(ic.user ? { user: ic.user } : {}),
        ...(ic.workingDir ? { working_dir: ic.workingDir } : {}),
        ...(ic.entrypoint && ic.entrypoint.length > 0 ? { entrypoint: [...ic.entrypoint] } : {}),
        ...(ic.cmd && ic.cmd.length > 0 ? { cmd: [...ic.cmd] } : {}),
        ...(ic.env && Object.keys(ic.env).length > 0 ? { env: { ...ic.env } } : {}),
      };
    });
  }

  withPortForward(localPort: number, remotePort: number): Sandbox {
    return new Sandbox(
      undefined,
      this.config,
      this.extras({ portForwards: [...this.portForwards, { localPort, remotePort }] }),
    );
  }

  withPortForwardAddresses(...addresses: string[]): Sandbox {
    return new Sandbox(
      undefined,
      this.config,
      this.extras({ portForwardAddresses: [...this.portForwardAddresses, ...addresses] }),
    );
  }
}
