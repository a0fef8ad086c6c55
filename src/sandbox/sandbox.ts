import { appendFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import type { ImageConfig, SandboxConfig } from "../api/config.ts";
import { MatchlockError, messageOf, VmBootError } from "../api/errors.ts";
import { newVmId } from "../api/ids.ts";
import { paths as defaultPaths, type Paths, vmDir } from "../api/paths.ts";
import {
  AgentClient,
  type ExecHandle,
  type ExecIO,
  type FileWriter,
  type OutputSink,
  type TcpIO,
  type TcpStream,
  terminateExec,
} from "../guest/agent-client.ts";
import { loadInitramfs } from "../guest/initramfs.ts";
import { loadKernel } from "../guest/kernel.ts";
import type { DirEntry } from "../guest/protocol.ts";
import { makeEmptyExt4 } from "../image/ext4.ts";
import type { PullProgress } from "../image/registry.ts";
import { type ResolvedImage, resolveImage } from "../image/resolve.ts";
import type { Resources } from "../state/lifecycle.ts";
import { procStartTime, selfIdentity } from "../state/procs.ts";
import { writeRuntimeFile } from "../state/runtime-file.ts";
import { openState, type StateStore } from "../state/store.ts";
import type { Accel, RunningVm, VmBackend } from "../vm/backend.ts";
import { chooseAccel } from "../vm/qemu/accel.ts";
import { QemuBackend, qemuPaths } from "../vm/qemu/machine.ts";
import { finishCleanup } from "./cleanup.ts";
import { mergeEnv } from "./command.ts";
import { crashPoint } from "./faults.ts";
import { type PortBinding, type PortForward, PortForwarder } from "./port-forward.ts";
import { RelayServer } from "./relay.ts";

/** One VM from create to close: the sandbox layer every front end (CLI, RPC) drives. */

export interface CreateOptions {
  config: SandboxConfig;
  /** Force an accelerator (`--accel`); otherwise MATCHLOCK_ACCEL, the cached probe, or a probe now. */
  accel?: string;
  /** How long the guest has to boot; default MATCHLOCK_BOOT_TIMEOUT seconds, else 60 s (TCG) / 20 s (KVM). */
  bootTimeoutMs?: number;
  onProgress?: (message: string) => void;
  paths?: Paths;
  backend?: VmBackend;
  /** An open state.db; by default the sandbox opens (and closes) its own. */
  state?: StateStore;
  /** Pull the image again even if it is in the store (`--pull`). */
  pull?: boolean;
  onPullProgress?: (p: PullProgress) => void;
}

export interface ExecOptions {
  argv: string[];
  /** Added on top of the image's and the sandbox's env. */
  env?: Record<string, string>;
  /** Default: the image's WorkingDir, else `/`. */
  cwd?: string;
  /** Default: the image's User, else root. */
  user?: string;
  tty?: boolean;
  stdin?: boolean;
  rows?: number;
  cols?: number;
}

/** Grace between SIGTERM and SIGKILL when a command is cancelled. */
export const DEFAULT_GRACE_MS = 3000;

export class Sandbox {
  readonly id: string;
  readonly dir: string;
  readonly config: SandboxConfig;
  readonly image: ResolvedImage;
  readonly imageConfig: ImageConfig;
  readonly accel: Accel;
  readonly hostname: string;
  /** Aborted when `resources.timeout_seconds` runs out (the owner then stops the work and closes). */
  readonly deadline: AbortSignal;
  private readonly vm: RunningVm;
  private readonly agent: AgentClient;
  private readonly deadlineTimer: NodeJS.Timeout | undefined;
  private readonly state: StateStore;
  private readonly ownsState: boolean;
  private relay: RelayServer | undefined;
  private forwarder: PortForwarder | undefined;
  private closing: Promise<void> | undefined;

  private constructor(init: {
    id: string;
    dir: string;
    config: SandboxConfig;
    image: ResolvedImage;
    accel: Accel;
    hostname: string;
    vm: RunningVm;
    agent: AgentClient;
    state: StateStore;
    ownsState: boolean;
  }) {
    this.id = init.id;
    this.dir = init.dir;
    this.config = init.config;
    this.image = init.image;
    this.imageConfig = { ...init.image.config, ...(init.config.image_config ?? {}) };
    this.accel = init.accel;
    this.hostname = init.hostname;
    this.vm = init.vm;
    this.agent = init.agent;
    this.state = init.state;
    this.ownsState = init.ownsState;
    const ctl = new AbortController();
    this.deadline = ctl.signal;
    const t = init.config.resources.timeout_seconds;
    if (t !== undefined && t > 0) {
      this.deadlineTimer = setTimeout(
        () => ctl.abort(new MatchlockError("CANCELLED", `timeout: the ${t} s limit (--timeout) ran out`)),
        t * 1000,
      );
      this.deadlineTimer.unref();
    }
  }

  static async create(opts: CreateOptions): Promise<Sandbox> {
    const p = opts.paths ?? defaultPaths();
    const progress = opts.onProgress ?? (() => {});
    const config = opts.config;
    const image = await resolveImage(p, config.image, {
      ...(opts.pull ? { pull: true } : {}),
      ...(opts.onPullProgress ? { onProgress: opts.onPullProgress } : {}),
    });
    const kernel = await loadKernel(p);
    const initramfs = await loadInitramfs(p);
    const { accel } = await chooseAccel(
      join(p.cache, "accel.json"),
      { kernel: kernel.vmlinux, initramfs },
      opts.accel,
    );
    const bootTimeoutMs = opts.bootTimeoutMs ?? envBootTimeout() ?? (accel === "tcg" ? 60_000 : 20_000);
    const state = opts.state ?? openState(p);
    const ownsState = opts.state === undefined;
    const id = newVmId();
    const hostname = config.network.hostname || id;
    const dir = vmDir(id, p);
    const upper = join(dir, "upper.ext4");
    const qp = qemuPaths(dir);
    const relaySocket = join(dir, "relay.sock");
    // Every resource is named in the record before it exists; a crash from here on is reclaimable.
    const resources: Resources = {
      vm_dir: dir,
      disks: [upper],
      sockets: [qp.agentSocket, qp.qmpSocket, relaySocket],
      qemu: { cmdline_marker: `${dir}/` },
      owner: selfIdentity(),
    };
    state.vms.insert(id, process.pid, image.ref, config);
    state.lifecycle.transition(id, "creating", { backend: "qemu", resources });
    crashPoint("creating");

    let vm: RunningVm | undefined;
    let phase: "create" | "start" = "create";
    try {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await makeEmptyExt4(upper, config.resources.disk_size_mb);
      state.lifecycle.transition(id, "created");
      crashPoint("created");

      phase = "start";
      state.lifecycle.transition(id, "starting");
      progress(`booting ${id} (${accel})`);
      vm = await (opts.backend ?? new QemuBackend()).start({
        id,
        dir,
        kernel: kernel.vmlinux,
        initramfs,
        kernelArgs: [
          `matchlock.hostname=${hostname}`,
          `matchlock.time=${Math.floor(Date.now() / 1000)}`,
          `matchlock.rootfstype=${image.fstype}`,
        ],
        cpus: config.resources.cpus,
        memoryMb: config.resources.memory_mb,
        disks: [
          { path: image.rootfs, readonly: true },
          { path: upper, readonly: false },
        ],
        accel,
      });
      const qemu = { pid: vm.pid, start_time: procStartTime(vm.pid) ?? 0 };
      writeRuntimeFile(dir, { owner: resources.owner, qemu, relay_socket: relaySocket });
      state.lifecycle.transition(id, "starting", {
        resources: { qemu: { ...qemu, cmdline_marker: `${dir}/` } },
      });
      crashPoint("starting");

      const agentLog = join(dir, "agent.log");
      const agent = new AgentClient(vm.agent, (line) => {
        try {
          appendFileSync(agentLog, `${line}\n`);
        } catch {}
      });
      await waitReady(agent, vm, bootTimeoutMs);
      const sandbox = new Sandbox({ id, dir, config, image, accel, hostname, vm, agent, state, ownsState });
      await sandbox.writeHostsFile();
      sandbox.relay = await RelayServer.listen(relaySocket, sandbox);
      state.lifecycle.transition(id, "running");
      crashPoint("running");
      return sandbox;
    } catch (e) {
      // A failed create removes everything it made, records and all: like a failed `docker run --rm`.
      state.lifecycle.transition(id, phase === "create" ? "create_failed" : "start_failed", {
        error: messageOf(e),
      });
      await vm?.stop(0).catch(() => {});
      await finishCleanup(state, id, { removeDir: true, removeRecords: true }).catch(() => {});
      if (ownsState) state.close();
      throw e;
    }
  }

  /** Starts a command. Its env, cwd and user default from the image config, as in Docker. */
  exec(opts: ExecOptions, io: ExecIO = {}): ExecHandle {
    const env = { ...(opts.env ?? {}) };
    if (opts.tty && env.TERM === undefined && this.config.env.TERM === undefined) env.TERM = "xterm";
    return this.agent.exec(
      {
        argv: opts.argv,
        env: mergeEnv({ HOSTNAME: this.hostname }, this.imageConfig.env, this.config.env, env),
        cwd: opts.cwd ?? (this.imageConfig.working_dir || "/"),
        user: opts.user ?? this.imageConfig.user ?? "",
        tty: opts.tty ?? false,
        stdin: opts.stdin ?? false,
        mkdirCwd: true,
        ...(opts.rows === undefined ? {} : { rows: opts.rows }),
        ...(opts.cols === undefined ? {} : { cols: opts.cols }),
      },
      io,
    );
  }

  /** SIGTERM to the command's process group, then SIGKILL if it is still running after `graceMs`. */
  async terminate(handle: ExecHandle, graceMs = DEFAULT_GRACE_MS): Promise<void> {
    if (this.agent.failed) return;
    await terminateExec(handle, graceMs);
  }

  writeFile(path: string, data: Buffer, mode?: number): Promise<void> {
    return this.agent.writeFile(path, data, mode);
  }

  /** A guest file in memory; one larger than `limit` (default 64 MiB) is refused. */
  readFile(path: string, limit?: number): Promise<Buffer> {
    return this.agent.readFile(path, limit);
  }

  /** A guest file of any size, streamed to `sink` under flow control. */
  readFileStream(path: string, sink: OutputSink): Promise<void> {
    return this.agent.readFileStream(path, sink);
  }

  openWrite(path: string, mode?: number): FileWriter {
    return this.agent.openWrite(path, mode);
  }

  listFiles(path: string): Promise<DirEntry[]> {
    return this.agent.listDir(path);
  }

  ping(): Promise<void> {
    return this.agent.ping();
  }

  /** A TCP connection to a port on the guest's loopback, over the agent channel (no NIC needed). */
  tcpConnect(port: number, io: TcpIO): Promise<TcpStream> {
    return this.agent.tcpConnect(port, io);
  }

  /** Forwards host ports into the guest until the sandbox closes. */
  portForward(forwards: PortForward[], addresses?: string[]): Promise<PortBinding[]> {
    this.forwarder ??= new PortForwarder((port, io) => this.agent.tcpConnect(port, io));
    return this.forwarder.add(forwards, addresses);
  }

  get vmPid(): number {
    return this.vm.pid;
  }

  /**
   * Stops the VM and reclaims its host resources, recording each step. With `remove` (the default,
   * `--rm`) the VM dir and its records go too; without it the VM stays listed as stopped, with its
   * logs, until `matchlock rm`. Safe to call more than once.
   */
  close(opts: { remove?: boolean } = {}): Promise<void> {
    this.closing ??= (async () => {
      const remove = opts.remove ?? true;
      clearTimeout(this.deadlineTimer);
      this.relay?.close();
      this.forwarder?.close();
      this.state.lifecycle.transition(this.id, "stopping");
      crashPoint("stopping");
      this.agent.close();
      try {
        await this.vm.stop();
        this.state.lifecycle.transition(this.id, "stopped");
      } catch (e) {
        this.state.lifecycle.transition(this.id, "stop_failed", { error: messageOf(e) });
      }
      this.state.vms.setStatus(this.id, "stopped");
      try {
        await finishCleanup(this.state, this.id, { removeDir: remove, removeRecords: remove });
      } finally {
        if (this.ownsState) this.state.close();
      }
    })();
    return this.closing;
  }

  private async writeHostsFile(): Promise<void> {
    let hosts = "";
    try {
      hosts = (await this.agent.readFile("/etc/hosts")).toString("utf8");
    } catch {}
    if (!new RegExp(`\\s${this.hostname.replaceAll(".", "\\.")}(\\s|$)`, "m").test(hosts)) {
      if (hosts.length > 0 && !hosts.endsWith("\n")) hosts += "\n";
      if (!/^127\.0\.0\.1\s/m.test(hosts)) hosts += "127.0.0.1\tlocalhost\n";
      hosts += `127.0.1.1\t${this.hostname}\n`;
      await this.agent.writeFile("/etc/hosts", Buffer.from(hosts), 0o644);
    }
    await this.agent.writeFile("/etc/hostname", Buffer.from(`${this.hostname}\n`), 0o644);
  }
}

function envBootTimeout(): number | undefined {
  const v = process.env.MATCHLOCK_BOOT_TIMEOUT;
  if (!v) return undefined;
  const s = Number(v);
  if (!Number.isFinite(s) || s <= 0)
    throw new MatchlockError("INVALID_ARGUMENT", `MATCHLOCK_BOOT_TIMEOUT=${v} is not a number of seconds`);
  return s * 1000;
}

async function waitReady(agent: AgentClient, vm: RunningVm, timeoutMs: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      agent.ready.catch(async (e: unknown): Promise<never> => {
        // The agent channel closed: the VM is going down. Report why, with its console.
        await Promise.race([vm.exited, new Promise((r) => setTimeout(r, 1000))]);
        throw new VmBootError(`the VM failed before its agent was ready (${(e as Error).message})`, {
          hint: await vm.diagnostics(),
        });
      }),
      vm.exited.then(async (e): Promise<never> => {
        const how = e.signal ? `was killed by ${e.signal}` : `exited (code ${e.code})`;
        throw new VmBootError(`the VM ${how} before its agent was ready`, { hint: await vm.diagnostics() });
      }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(async () => {
          reject(
            new VmBootError(`the VM did not boot within ${timeoutMs / 1000} s`, {
              hint: `${await vm.diagnostics()}\n(raise the limit with MATCHLOCK_BOOT_TIMEOUT=seconds)`.trim(),
            }),
          );
        }, timeoutMs);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
