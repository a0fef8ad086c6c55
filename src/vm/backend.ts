import type { Duplex } from "node:stream";

/** What every VM backend (QEMU today) is asked to run, and what it hands back. */

export type Accel = "kvm" | "tcg";

export interface DiskSpec {
  path: string;
  readonly: boolean;
}

export interface VmSpec {
  id: string;
  /** The VM dir: sockets and the console log live here. */
  dir: string;
  kernel: string;
  initramfs: string;
  /** Extra kernel command-line words (matchlock.* boot parameters). */
  kernelArgs: string[];
  cpus: number;
  memoryMb: number;
  /** In order: vda, vdb, … */
  disks: DiskSpec[];
  accel: Accel;
  /** A virtio-net NIC on an existing TAP; none means the guest has only loopback. */
  nic?: { tap: string; mac: string };
  /** A second virtio-serial port, "vfs", for the guest's FUSE relay (host folders). */
  vfs?: boolean;
  /**
   * A virtio-rng device feeding the guest's CRNG. Unset: the backend decides (only a guest CPU
   * without RDRAND needs one); tests set it to exercise the device anyway.
   */
  rng?: boolean;
  /** Extra arguments for the hypervisor (tests and experiments; not part of any user interface). */
  extraArgs?: string[];
}

export interface VmExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface RunningVm {
  readonly pid: number;
  /** The `agent` channel, connected (the guest may still be booting). */
  readonly agent: Duplex;
  /** The `vfs` channel when the spec asked for one: raw FUSE messages both ways. */
  readonly vfs: Duplex | undefined;
  readonly consoleLog: string;
  /** Settles when the VM process has exited. */
  readonly exited: Promise<VmExit>;
  /** The last lines the hypervisor and the guest console printed, for error messages. */
  diagnostics(): Promise<string>;
  /** Stops the VM (graceful quit, then kill after `graceMs`) and waits for it to exit. */
  stop(graceMs?: number): Promise<void>;
}

export interface VmBackend {
  readonly name: string;
  start(spec: VmSpec): Promise<RunningVm>;
}
