import { appendFileSync } from "node:fs";
import { mkdir, open, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { hostFoldersRequested, type ImageConfig, type SandboxConfig } from "../api/config.ts";
import { MatchlockError, messageOf, VmNotRunningError } from "../api/errors.ts";
import { fileEvent, type NetworkEvent } from "../api/events.ts";
import { newVmId } from "../api/ids.ts";
import { paths as defaultPaths, type Paths, vmDir } from "../api/paths.ts";
import {
  AgentClient,
  DEFAULT_GRACE_MS,
  type ExecHandle,
  type ExecIO,
  type FileWriter,
  type OutputSink,
  type TcpIO,
  type TcpStream,
  terminateExec,
} from "../guest/agent-client.ts";
import type { DirEntry, ExecRequest } from "../guest/protocol.ts";
import { makeUpperDisk } from "../image/ext4.ts";
import type { PullProgress } from "../image/registry.ts";
import { type ResolvedImage, resolveImage } from "../image/resolve.ts";
import { routedSubnets } from "../net/host-net.ts";
import type { AllowList } from "../net/host-policy.ts";
import { guestKernelArg, type NetworkPlan, planNetwork, VmNetwork } from "../net/vm-network.ts";
import type { Resources } from "../state/lifecycle.ts";
import { procStartTime, selfIdentity } from "../state/procs.ts";
import { writeRuntimeFile } from "../state/runtime-file.ts";
import { openState, type StateStore } from "../state/store.ts";
import type { Accel, RunningVm, VmBackend, VmExit } from "../vm/backend.ts";
import { QemuBackend, qemuPaths } from "../vm/qemu/machine.ts";
import { waitReady } from "./agent-ready.ts";
import { finishCleanup } from "./cleanup.ts";
import { mergeEnv, validateCommand, validateWorkdir } from "./command.ts";
import { writeEtcFiles } from "./etc-files.ts";
import { EVENTS_FILE, EventLog } from "./event-log.ts";
import { prepareExtraDisks } from "./extra-disks.ts";
import { crashPoint, faultAt } from "./faults.ts";
import { installGuestCa } from "./guest-ca.ts";
import { HostFolders } from "./host-folders.ts";
import { prepareNetworkPolicy } from "./network-policy.ts";
import { type PauseState, VmPause } from "./pause.ts";
import { PhaseTimer } from "./phase-timer.ts";
import { type PortBinding, type PortForward, PortForwarder } from "./port-forward.ts";
import { discardClone, type Prestart, type PrestartedClone } from "./prestart.ts";
import { RelayServer } from "./relay.ts";
import {
  adoptClone,
  bootContext,
  evictionNote,
  findOrBuildTemplate,
  prepareClone,
  restoreSpec,
  snapshotMaxBytes,
  type TemplateLookup,
  templateInputs,
  templateKey,
  variantOf,
} from "./snapshots.ts";

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
  /**
   * The command the caller will run first, given the image's config. It is checked (size, NUL
   * bytes, working directory) as soon as the image is known, before anything is created or booted.
   */
  firstCommand?: (image: ImageConfig) => ExecOptions | undefined;
  /** Boot cold even when a snapshot could be restored (`--cold`; also MATCHLOCK_COLD=1). */
  cold?: boolean;
  /** Clones made ahead of time (an idle rpc server's): one of this sandbox's kind is adopted. */
  prestart?: Prestart;
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

// Declared with terminateExec, so that the CLI's flag defaults need not load this module.
export { DEFAULT_GRACE_MS };

export class Sandbox {
  readonly id: string;
  readonly dir: string;
  readonly config: SandboxConfig;
  readonly image: ResolvedImage;
  readonly imageConfig: ImageConfig;
  readonly accel: Accel;
  readonly hostname: string;
  /**
   * Aborted when the sandbox ends on its own: `resources.lifetime_seconds` ran out, or the VM died
   * without being asked to stop. The reason says which; the owner then stops the work and closes.
   */
  readonly deadline: AbortSignal;
  private deathCause: string | undefined;
  private readonly vm: RunningVm;
  private readonly agent: AgentClient;
  private readonly cancelDeadline: () => void;
  /** Settles once we know whether the VM's exit was its own doing (the `died` reason) or ours. */
  private readonly exitChecked: Promise<string | undefined>;
  /** QEMU exited while nobody was closing the sandbox (set at once; `died` follows). */
  private exitedOnItsOwn = false;
  private readonly state: StateStore;
  private readonly ownsState: boolean;
  private relay: RelayServer | undefined;
  /** Undefined with no network (`no_network`). */
  private readonly network: VmNetwork | undefined;
  private forwarder: PortForwarder | undefined;
  private closing: Promise<void> | undefined;
  /** Added to every command's env: intercept mode's CA variables and secret placeholders. */
  readonly networkEnv: Record<string, string>;
  /** Every network decision; `events.jsonl` in the VM dir and RPC `event` notifications. */
  readonly events: EventLog;
  /** Host folders served to the guest over FUSE; undefined when none were asked for. */
  private readonly folders: HostFolders | undefined;
  /** Pause and resume; made on first use (see `pausing`). */
  private pauser: VmPause | undefined;

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
    network: VmNetwork | undefined;
    networkEnv: Record<string, string>;
    events: EventLog;
    folders: HostFolders | undefined;
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
    this.network = init.network;
    this.networkEnv = init.networkEnv;
    this.events = init.events;
    this.folders = init.folders;
    const ctl = new AbortController();
    this.deadline = ctl.signal;
    const t = init.config.resources.lifetime_seconds;
    this.cancelDeadline =
      t !== undefined && t > 0
        ? longTimeout(
            () => ctl.abort(new MatchlockError("CANCELLED", `timeout: the ${t} s limit (--timeout) ran out`)),
            t * 1000,
          )
        : () => {};
    this.exitChecked = this.vm.exited.then(async (exit) => {
      if (this.closing) return undefined; // we asked it to stop
      this.exitedOnItsOwn = true;
      const why = await describeDeath(exit, this.vm.consoleLog);
      this.deathCause = why;
      ctl.abort(this.deathError(why));
      return why;
    });
  }

  static async create(opts: CreateOptions): Promise<Sandbox> {
    const p = opts.paths ?? defaultPaths();
    const progress = opts.onProgress ?? (() => {});
    const phases = new PhaseTimer();
    // From here on the config carries placeholders, never secret values (those live in the policy).
    const { config, policy, env: networkEnv } = await prepareNetworkPolicy(opts.config);
    const image = await resolveImage(p, config.image, {
      ...(opts.pull ? { pull: true } : {}),
      ...(opts.onPullProgress ? { onProgress: opts.onPullProgress } : {}),
    });
    const id = newVmId();
    const hostname = config.network.hostname || id;
    phases.mark("image");
    const imageConfig = { ...image.config, ...(config.image_config ?? {}) };
    const first = opts.firstCommand?.(imageConfig);
    if (first) validateCommand(execRequest(first, { hostname, imageConfig, config, networkEnv }));
    const boot = await bootContext(p, image, opts.accel);
    const { kernel, initramfs, accel } = boot;
    const blocker = restoreBlocker(opts, config);
    // A bad MATCHLOCK_SNAPSHOT_MAX_MB is refused before anything exists.
    const snapshotCap = blocker ? 0 : snapshotMaxBytes();
    const inputs = blocker ? undefined : await templateInputs(boot, variantOf(config));
    phases.mark("kernel");
    // A clone of this kind made ahead of time, if one is held: from here on it is ours to adopt or
    // discard (`unadopted` until its dir is this VM's; a failure before then must stop it).
    let pre: PrestartedClone | undefined;
    if (opts.prestart) {
      if (inputs) pre = await opts.prestart.take(templateKey(inputs));
      else void opts.prestart.discard(); // this create boots cold: a clone would only wait idle
      if (pre && faultAt("clone-dies-when-taken")) {
        process.kill(pre.vm.pid, "SIGKILL");
        await pre.vm.exited;
      }
    }
    let unadopted = pre;
    let notAdopted: string | undefined;
    const orDiscard = async <T>(step: () => T): Promise<T> => {
      try {
        return await step();
      } catch (e) {
        if (unadopted) await discardClone(unadopted);
        throw e;
      }
    };
    phases.mark("prestart");
    const bootTimeoutMs = opts.bootTimeoutMs ?? envBootTimeout() ?? (accel === "tcg" ? 60_000 : 20_000);
    const state = await orDiscard(() => opts.state ?? openState(p));
    const ownsState = opts.state === undefined;
    const dir = vmDir(id, p);
    const upper = join(dir, "upper.ext4");
    const qp = qemuPaths(dir);
    const relaySocket = join(dir, "relay.sock");
    await orDiscard(() => state.vms.insert(id, process.pid, image.ref, config));
    let plan: NetworkPlan | undefined;
    if (!config.network.no_network) {
      try {
        plan = planNetwork(id, state.subnets.allocate(id, await routedSubnets()), config.network.mtu);
      } catch (e) {
        state.vms.remove(id); // no subnet free: nothing was created, so nothing stays recorded
        if (ownsState) state.close();
        if (unadopted) await discardClone(unadopted);
        throw e;
      }
    }
    const owner = selfIdentity();
    // Every resource is named in the record before it exists; a crash from here on is reclaimable.
    const resources: Resources = {
      vm_dir: dir,
      disks: [upper],
      sockets: [
        qp.agentSocket,
        qp.qmpSocket,
        relaySocket,
        join(dir, "migrate.sock"), // a restoring QEMU's, for a moment
        ...(hostFoldersRequested(config) ? [qp.vfsSocket] : []),
      ],
      // An adopted clone's QEMU runs already; its command line names the dir it was made in.
      qemu: pre
        ? { pid: pre.vm.pid, start_time: procStartTime(pre.vm.pid) ?? 0, cmdline_marker: `${pre.dir}/` }
        : { cmdline_marker: `${dir}/` },
      owner,
      ...(plan
        ? {
            tap_name: plan.tap,
            firewall_table: plan.table,
            gateway_ip: plan.gateway,
            guest_ip: plan.guest,
            subnet_cidr: plan.subnet,
          }
        : {}),
    };
    await orDiscard(() => state.lifecycle.transition(id, "creating", { backend: "qemu", resources }));
    crashPoint("creating");
    phases.mark("record");

    let vm: RunningVm | undefined;
    let network: VmNetwork | undefined;
    let folders: HostFolders | undefined;
    const events = new EventLog(join(dir, EVENTS_FILE));
    let phase: "create" | "start" = "create";
    const recordQemu = (started: RunningVm): void => {
      const qemu = { pid: started.pid, start_time: procStartTime(started.pid) ?? 0 };
      writeRuntimeFile(dir, { owner, qemu, relay_socket: relaySocket });
      state.lifecycle.transition(id, "starting", {
        resources: { qemu: { ...qemu, cmdline_marker: `${pre && started === pre.vm ? pre.dir : dir}/` } },
      });
      crashPoint("starting");
    };
    try {
      if (pre) {
        // The clone's files become this VM's dir: QEMU's open disk and console log go along.
        try {
          await mkdir(p.vms, { recursive: true, mode: 0o700 });
          await rename(pre.dir, dir);
          pre.vm.relocate(dir);
          vm = pre.vm;
          crashPoint("adopted");
        } catch (e) {
          // Only a time saver (the VM dir on another file system, say): the VM is made as usual.
          notAdopted = `the clone made ahead of time could not be adopted (${messageOf(e)})`;
          await discardClone(pre);
          pre = undefined;
        }
        unadopted = undefined;
      }
      if (!pre) await mkdir(dir, { recursive: true, mode: 0o700 });
      if (plan) {
        progress(`network ${plan.subnet} on ${plan.tap}${policy ? " (intercept mode)" : ""}`);
        // Complete before QEMU starts. Setting it up while QEMU starts was measured slower (+20 ms
        // median): both are CPU work, on two cores that QEMU's own start-up already keeps busy.
        const netOpts = {
          config: config.network,
          owner,
          logFile: join(dir, "net.log"),
          ...(policy ? { intercept: policy } : {}),
          onEvent: (e: NetworkEvent) => events.emit(e),
        };
        try {
          network = await VmNetwork.start(plan, { ...netOpts, ...(pre?.tap ? { adoptTap: pre.tap } : {}) });
        } catch (e) {
          if (!pre || pre.alive()) throw e;
          // The clone died after it was taken, and its TAP went with it: the VM is made as usual.
          notAdopted = `the clone made ahead of time died before it was adopted (${messageOf(e)})`;
          await discardClone(pre);
          await rm(upper, { force: true }); // its disk, in this VM's dir now: the restore copies anew
          pre = undefined;
          vm = undefined;
          network = await VmNetwork.start(plan, netOpts);
        }
        if (pre && faultAt("clone-dies-when-adopted")) {
          process.kill(pre.vm.pid, "SIGKILL");
          await pre.vm.exited;
        }
        phases.mark("network");
      }
      if (hostFoldersRequested(config)) {
        folders = await HostFolders.prepare(config, dir, (f) => events.emit(fileEvent(f)));
      }
      const extraDisks = await prepareExtraDisks(config, folders?.workspace);
      phases.mark("folders");
      // Part of creating: a failure here (building the snapshot cannot fail the sandbox, but the
      // state store can) is a failed create.
      const backend = opts.backend ?? new QemuBackend({ cacheDir: p.cache });
      if (pre) state.snapshots.touch(pre.key);
      const found: TemplateLookup =
        pre !== undefined
          ? { template: pre.template, built: false }
          : inputs === undefined
            ? { template: undefined, reason: blocker ?? "" }
            : await findOrBuildTemplate(p, state, inputs, {
                backend,
                bootTimeoutMs,
                progress,
                maxBytes: snapshotCap,
              });
      phases.mark("snapshot");
      state.lifecycle.transition(id, "created");
      crashPoint("created");

      // What makes the VM itself: boot parameters for a cold boot, SET_IDENTITY for a clone.
      const identity = () => [
        `matchlock.hostname=${hostname}`,
        `matchlock.time=${(Date.now() / 1000).toFixed(3)}`,
        ...(plan ? [guestKernelArg(plan)] : []),
        ...(folders ? [folders.kernelArg] : []),
      ];

      phase = "start";
      state.lifecycle.transition(id, "starting");
      const bootLog = appendLine(join(dir, "boot.log"));
      const note = (line: string) => bootLog(`${new Date().toISOString()} ${line}`);
      const logAgent = appendLine(join(dir, "agent.log"));
      let agent: AgentClient | undefined;
      if (notAdopted) note(notAdopted);
      if (found.template) {
        for (const old of found.evicted ?? []) note(evictionNote(old));
        progress(`restoring ${id} from snapshot ${found.template.key} (${accel})`);
        try {
          if (pre) {
            vm = pre.vm; // restored already (and paused since); adopted above
            agent = pre.agent;
            agent.setLog(logAgent);
          } else {
            const { devices } = await prepareClone(found.template, dir, upper);
            phases.mark("clone");
            vm = await backend.start(
              restoreSpec(found.template, devices, { id, dir, upper, ...(plan ? { tap: plan.tap } : {}) }),
            );
            agent = new AgentClient(vm.agent, logAgent);
          }
          if (folders && vm.vfs) folders.serve(vm.vfs);
          recordQemu(vm);
          crashPoint("restoring");
          if (pre) await vm.resume();
          phases.mark("qemu");
          await adoptClone(agent, vm, identity(), bootTimeoutMs);
          phases.mark("identity");
          note(`restored from snapshot ${found.template.key}${pre ? " (a clone made ahead of time)" : ""}`);
        } catch (e) {
          // Any failure falls back to a cold boot; the reason stays in the VM's boot.log.
          note(`snapshot ${found.template.key} could not be restored (${messageOf(e)}); booting cold`);
          progress(`snapshot restore failed (${messageOf(e)}); booting cold`);
          agent?.close();
          agent = undefined;
          await vm?.stop(0).catch(() => {});
          vm = undefined;
        }
      } else {
        note(`cold boot: ${found.reason}`);
      }
      if (!vm || !agent) {
        await rm(upper, { force: true }); // a failed restore's copy
        await rm(qp.consoleLog, { force: true });
        // A clone made ahead of time took its TAP (its QEMU's, not persistent) with it.
        if (pre && network) await network.recreateTap();
        await makeUpperDisk(p.cache, upper, config.resources.disk_size_mb);
        phases.mark("disk");
        progress(`booting ${id} (${accel})`);
        vm = await backend.start({
          id,
          dir,
          kernel,
          initramfs,
          kernelArgs: [
            ...identity(),
            `matchlock.rootfstype=${image.fstype}`,
            ...extraDisks.map((d) => d.kernelArg),
          ],
          cpus: config.resources.cpus,
          memoryMb: config.resources.memory_mb,
          disks: [
            { path: image.rootfs, readonly: true },
            { path: upper, readonly: false },
            ...extraDisks.map((d) => d.disk),
          ],
          accel,
          ...(network ? { nic: network.nic } : {}),
          ...(folders ? { vfs: true } : {}),
        });
        agent = new AgentClient(vm.agent, logAgent);
        if (folders && vm.vfs) folders.serve(vm.vfs);
        recordQemu(vm);
        phases.mark("qemu");
        await waitReady(agent, vm, bootTimeoutMs);
        phases.mark("boot");
      }
      const sandbox = new Sandbox({
        id,
        dir,
        config,
        image,
        accel,
        hostname,
        vm,
        agent,
        state,
        ownsState,
        network,
        networkEnv,
        events,
        folders,
      });
      await writeEtcFiles(agent, {
        hostname,
        addHosts: config.network.add_hosts,
        ...(network ? { gateway: network.plan.gateway } : {}),
      });
      phases.mark("etc");
      if (policy) {
        await installGuestCa(agent, policy.ca.certPem);
        phases.mark("ca");
      }
      sandbox.relay = await RelayServer.listen(relaySocket, sandbox);
      state.lifecycle.transition(id, "running");
      crashPoint("running");
      phases.mark("running");
      note(`ready in ${phases.summary()}`);
      return sandbox;
    } catch (e) {
      // A failed create removes everything it made, records and all: like a failed `docker run --rm`.
      state.lifecycle.transition(id, phase === "create" ? "create_failed" : "start_failed", {
        error: messageOf(e),
      });
      await vm?.stop(0).catch(() => {});
      await network?.close().catch(() => {});
      await folders?.close().catch(() => {});
      await finishCleanup(state, id, { removeDir: true, removeRecords: true }).catch(() => {});
      if (ownsState) state.close();
      throw e;
    }
  }

  /**
   * Starts a command. Its env, cwd and user default from the image config, as in Docker. A bad
   * command (relative working directory, too large, NUL bytes) throws InvalidArgumentError here.
   * If the VM dies under (or before) the command, `done` rejects saying how it died.
   */
  exec(opts: ExecOptions, io: ExecIO = {}): ExecHandle {
    this.refuseIfPaused();
    const req = execRequest(opts, this);
    let handle: ExecHandle;
    try {
      handle = this.agent.exec(req, io);
    } catch (e) {
      if (!this.agent.failed) throw e;
      handle = goneHandle(e); // the VM went away before the command could start: say how, below
    }
    const done = handle.done.catch(async (e: unknown): Promise<never> => {
      const why = this.agent.failed ? await this.deathReason() : undefined;
      throw why === undefined ? e : this.deathError(why, e);
    });
    done.catch(() => {}); // observed by whoever awaits it; never an unhandled rejection
    return {
      stream: handle.stream,
      writeStdin: (d) => handle.writeStdin(d),
      endStdin: () => handle.endStdin(),
      resize: (rows, cols) => handle.resize(rows, cols),
      signal: (signo) => handle.signal(signo),
      done,
    };
  }

  /** Why the VM died on its own (QEMU killed, guest kernel panic…); undefined while it lives or if we stopped it. */
  get died(): string | undefined {
    return this.deathCause;
  }

  /** The error for a VM that died under its work: one line saying how. */
  deathError(why: string, cause?: unknown): MatchlockError {
    return new MatchlockError(
      "VM_FAILED",
      `VM ${this.id} died: ${why}`,
      cause === undefined ? {} : { cause },
    );
  }

  /**
   * Why the VM died on its own, or undefined if it lives or we stopped it. The agent channel closes
   * a moment before QEMU's exit is reported, so this waits briefly for the exit.
   */
  async deathReason(waitMs = 2000): Promise<string | undefined> {
    if (this.deathCause !== undefined || this.closing) return this.deathCause;
    let timer: NodeJS.Timeout | undefined;
    const r = await Promise.race([
      this.exitChecked,
      new Promise<undefined>((resolve) => {
        timer = setTimeout(() => resolve(undefined), waitMs);
      }),
    ]);
    clearTimeout(timer);
    return r;
  }

  /** SIGTERM to the command's process group, then SIGKILL if it is still running after `graceMs`. */
  async terminate(handle: ExecHandle, graceMs = DEFAULT_GRACE_MS): Promise<void> {
    if (this.agent.failed) return;
    await terminateExec(handle, graceMs);
  }

  // The guest operations below refuse a paused VM (VmPausedError) rather than wait for a resume;
  // the async ones reject, never throw, so that every caller sees the refusal the same way.

  async writeFile(path: string, data: Buffer, mode?: number): Promise<void> {
    this.refuseIfPaused();
    return this.agent.writeFile(path, data, mode);
  }

  /** A guest file in memory; one larger than `limit` (default 64 MiB) is refused. */
  async readFile(path: string, limit?: number): Promise<Buffer> {
    this.refuseIfPaused();
    return this.agent.readFile(path, limit);
  }

  /** A guest file of any size, streamed to `sink` under flow control. */
  async readFileStream(path: string, sink: OutputSink): Promise<void> {
    this.refuseIfPaused();
    return this.agent.readFileStream(path, sink);
  }

  openWrite(path: string, mode?: number): FileWriter {
    this.refuseIfPaused();
    return this.agent.openWrite(path, mode);
  }

  async listFiles(path: string): Promise<DirEntry[]> {
    this.refuseIfPaused();
    return this.agent.listDir(path);
  }

  ping(): Promise<void> {
    return this.agent.ping();
  }

  /**
   * A TCP connection to a port on the guest's loopback, over the agent channel (no NIC needed).
   * Refused while paused: a forwarded port's new connections are reset, established ones wait.
   */
  async tcpConnect(port: number, io: TcpIO): Promise<TcpStream> {
    this.refuseIfPaused();
    return this.agent.tcpConnect(port, io);
  }

  /** Forwards host ports into the guest until the sandbox closes. */
  async portForward(forwards: PortForward[], addresses?: string[]): Promise<PortBinding[]> {
    this.refuseIfPaused();
    this.forwarder ??= new PortForwarder((port, io) => this.tcpConnect(port, io));
    return this.forwarder.add(forwards, addresses);
  }

  /** Whether the VM is paused (`pause`). */
  get paused(): boolean {
    return this.pauser?.paused ?? false;
  }

  /**
   * Freezes the guest (QMP `stop`): its processes, clock and timers stand still and QEMU uses no
   * CPU for it, while memory, disks, the network's host side and every connection stay. Recorded
   * in the lifecycle (list shows `paused`). Guest operations are refused until `resume`; commands
   * already running simply wait. Idempotent. The lifetime limit (`--timeout`) keeps running: a
   * paused VM still holds all its host resources.
   */
  pause(): Promise<PauseState> {
    return this.pausing().change(true);
  }

  /** Lets a paused guest run again from where it stopped. Idempotent. */
  resume(): Promise<PauseState> {
    return this.pausing().change(false);
  }

  private refuseIfPaused(): void {
    this.pauser?.refuseIfPaused();
  }

  private pausing(): VmPause {
    this.pauser ??= new VmPause({
      id: this.id,
      vm: this.vm,
      record: (since) => this.state.lifecycle.setPaused(this.id, since),
      refusal: (closing) => {
        if (this.deathCause !== undefined) return this.deathError(this.deathCause);
        return this.closing && !closing ? new VmNotRunningError(this.id, "stopping") : undefined;
      },
      failure: async (e) => {
        const why = await this.deathReason();
        return why === undefined ? e : this.deathError(why, e);
      },
    });
    return this.pauser;
  }

  get vmPid(): number {
    return this.vm.pid;
  }

  /**
   * Adds hosts to the VM's allow-list at run time: DNS, the proxy and plain TCP see the change at
   * once (they share one list). Returns the newly added and the whole list, as Matchlock's RPC does.
   */
  allowListAdd(hosts: readonly string[]): { added: string[]; allowed_hosts: string[] } {
    const allow = this.allowList();
    const added = allow.add(hosts);
    return { added, allowed_hosts: allow.patterns };
  }

  /** Removes hosts from the allow-list; new requests and connections are refused at once. */
  allowListDelete(hosts: readonly string[]): { removed: string[]; allowed_hosts: string[] } {
    const allow = this.allowList();
    const removed = allow.remove(hosts);
    return { removed, allowed_hosts: allow.patterns };
  }

  private allowList(): AllowList {
    const allow = this.network?.intercept?.allow;
    if (!allow) {
      // -32000 over RPC, as Matchlock answers for a VM without its proxy.
      throw new MatchlockError(
        "VM_FAILED",
        `VM ${this.id} has no allowlist: its network is not in intercept mode`,
        {
          hint: "start it with --network-intercept (or --allow-host/--secret) to change its allow-list at run time",
        },
      );
    }
    return allow;
  }

  /**
   * What the guest wrote to its extra disks may still be in its page cache, and the VM is stopped,
   * not shut down: a `sync` first (at most 2 s, as Matchlock), so volumes keep their data. The upper
   * disk needs none (it goes with the VM) and host folders are written through.
   */
  private async syncWritableDisks(): Promise<void> {
    if (!this.config.extra_disks.some((d) => !d.readonly) || this.deathCause !== undefined) return;
    let timer: NodeJS.Timeout | undefined;
    try {
      const h = this.exec({ argv: ["sync"], tty: false, stdin: false });
      await Promise.race([
        h.done,
        new Promise((resolve) => {
          timer = setTimeout(resolve, 2000);
        }),
      ]);
    } catch {
      // a VM that cannot sync is stopped anyway
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Stops the VM and reclaims its host resources, recording each step. With `remove` (the default,
   * `--rm`) the VM dir and its records go too; without it the VM stays listed as stopped, with its
   * logs, until `matchlock rm`. Safe to call more than once.
   */
  close(opts: { remove?: boolean; graceMs?: number } = {}): Promise<void> {
    this.closing ??= (async () => {
      const remove = opts.remove ?? true;
      this.cancelDeadline();
      this.relay?.close();
      this.forwarder?.close();
      // A paused guest could neither end its commands gracefully nor sync its disks: let it run.
      // Queued behind a pause in flight, so none can be left in place (a no-op when not paused).
      await this.pauser?.change(false, { closing: true }).catch(() => {});
      await this.network?.close().catch(() => {});
      this.state.lifecycle.transition(this.id, "stopping");
      crashPoint("stopping");
      await this.syncWritableDisks();
      this.agent.close();
      // A VM that died on its own is recorded as a failure with its cause, and listed as crashed:
      // a SIGKILLed QEMU or a kernel panic must not look like a normal stop.
      const died = this.exitedOnItsOwn ? await this.exitChecked : undefined;
      try {
        await this.vm.stop(opts.graceMs);
        if (died === undefined) this.state.lifecycle.transition(this.id, "stopped");
        else this.state.lifecycle.transition(this.id, "stop_failed", { error: `the VM died: ${died}` });
      } catch (e) {
        this.state.lifecycle.transition(this.id, "stop_failed", { error: messageOf(e) });
      }
      // After the VM: its last requests may still be answered until QEMU is gone.
      await this.folders?.close().catch(() => {});
      this.state.vms.setStatus(this.id, died === undefined ? "stopped" : "crashed");
      try {
        await finishCleanup(this.state, this.id, { removeDir: remove, removeRecords: remove });
      } finally {
        if (this.ownsState) this.state.close();
      }
    })();
    return this.closing;
  }
}

/** The handle of a command that never started because the agent channel was already gone. */
function goneHandle(e: unknown): ExecHandle {
  const done = Promise.reject(e instanceof Error ? e : new Error(String(e)));
  done.catch(() => {});
  return {
    stream: 0,
    writeStdin: () => Promise.resolve(),
    endStdin: () => {},
    resize: () => {},
    signal: () => {},
    done,
  };
}

/** What a command needs from its sandbox to become an EXEC request. */
interface ExecContext {
  hostname: string;
  imageConfig: ImageConfig;
  config: SandboxConfig;
  networkEnv: Record<string, string>;
}

/** The EXEC request for a command: env, cwd and user default from the image config, as in Docker. */
export function execRequest(opts: ExecOptions, ctx: ExecContext): ExecRequest {
  const env = { ...(opts.env ?? {}) };
  if (opts.tty && env.TERM === undefined && ctx.config.env.TERM === undefined) env.TERM = "xterm";
  return {
    argv: opts.argv,
    // Matchlock's order: image, sandbox, CA variables and placeholders, then the command's own.
    env: mergeEnv({ HOSTNAME: ctx.hostname }, ctx.imageConfig.env, ctx.config.env, ctx.networkEnv, env),
    cwd: opts.cwd ? validateWorkdir(opts.cwd) : ctx.imageConfig.working_dir || "/",
    user: opts.user ?? ctx.imageConfig.user ?? "",
    tty: opts.tty ?? false,
    stdin: opts.stdin ?? false,
    mkdirCwd: true,
    ...(opts.rows === undefined ? {} : { rows: opts.rows }),
    ...(opts.cols === undefined ? {} : { cols: opts.cols }),
  };
}

/** The longest delay a Node timer takes; past it, setTimeout fires after 1 ms instead. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * setTimeout for any delay: a `--timeout` of 25 days or more would overflow one timer and fire at
 * once, so shorter timers are chained until the due time (measured on the monotonic clock).
 * Returns a cancel function. The timers are unref'd: they never keep the process alive.
 */
export function longTimeout(fn: () => void, ms: number, maxChunk = MAX_TIMER_MS): () => void {
  if (Number.isNaN(ms)) throw new RangeError("longTimeout: the delay is NaN");
  const due = performance.now() + ms;
  let timer: NodeJS.Timeout | undefined;
  const arm = (): void => {
    const left = due - performance.now();
    if (left <= 0) {
      timer = undefined;
      fn();
      return;
    }
    timer = setTimeout(arm, Math.min(Math.ceil(left), maxChunk));
    timer.unref();
  };
  arm();
  return () => clearTimeout(timer);
}

/** How much of the console log's end is searched for a kernel panic. */
const CONSOLE_TAIL_BYTES = 64 * 1024;

/** The end of the console log, read without loading it all (the guest decides how big it is). */
async function consoleTail(path: string): Promise<string> {
  try {
    const fh = await open(path, "r");
    try {
      const { size } = await fh.stat();
      const len = Math.min(size, CONSOLE_TAIL_BYTES);
      const buf = Buffer.alloc(len);
      const { bytesRead } = await fh.read(buf, 0, len, size - len);
      return buf.subarray(0, bytesRead).toString("utf8");
    } finally {
      await fh.close();
    }
  } catch {
    return "";
  }
}

/**
 * Why a VM that nobody asked to stop is gone, in one phrase. The guest reboots on a panic
 * (`panic=-1`) and `-no-reboot` turns that into a clean QEMU exit, so the console log tells a panic
 * from a shutdown.
 */
export async function describeDeath(exit: VmExit, consoleLog: string): Promise<string> {
  if (exit.signal) return `QEMU was killed by ${exit.signal}`;
  const panic = /Kernel panic - not syncing: ?([^\r\n]*)/g;
  let last: string | undefined;
  for (const m of (await consoleTail(consoleLog)).matchAll(panic)) last = m[1];
  if (last !== undefined) return `the guest kernel panicked${last ? ` (${last.trim().slice(0, 200)})` : ""}`;
  if (exit.code === 0) return "the guest powered off or rebooted on its own";
  return `QEMU exited with code ${exit.code}`;
}

function envBootTimeout(): number | undefined {
  const v = process.env.MATCHLOCK_BOOT_TIMEOUT;
  if (!v) return undefined;
  const s = Number(v);
  if (!Number.isFinite(s) || s <= 0)
    throw new MatchlockError("INVALID_ARGUMENT", `MATCHLOCK_BOOT_TIMEOUT=${v} is not a number of seconds`);
  return s * 1000;
}

/** Why this sandbox boots cold instead of from a snapshot; undefined when it can be restored. */
function restoreBlocker(opts: CreateOptions, config: SandboxConfig): string | undefined {
  if (opts.cold) return "--cold";
  if (process.env.MATCHLOCK_COLD === "1") return "MATCHLOCK_COLD=1";
  if ((config.extra_disks ?? []).length > 0) return "extra disks are attached at boot";
  return undefined;
}

/** Appends lines to a VM log file; a full disk loses the line, never the VM. */
function appendLine(path: string): (line: string) => void {
  return (line) => {
    try {
      appendFileSync(path, `${line}\n`);
    } catch {}
  };
}
