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
   * Guest RAM in a file instead of anonymous memory. `shared`: the guest's writes reach the file (a
   * snapshot template); otherwise the file is mapped private, copy-on-write (a clone of a template).
   */
  ram?: { file: string; shared: boolean };
  /** Restore instead of booting: load the device state saved by `RunningVm.snapshot` and continue. */
  restoreFrom?: string;
  /**
   * With `restoreFrom`: the `devices` of the VM the state was saved from. A VM whose devices differ
   * is not started (a state loaded into other devices can go wrong without an error).
   */
  restoreDevices?: string;
  /**
   * With `restoreFrom`: leave the restored guest paused (a clone made ahead of time, see
   * sandbox/prestart.ts); `resume()` lets it run.
   */
  paused?: boolean;
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
  /** Machine, CPU, memory and devices, in order, without host paths: what a saved state must match. */
  readonly devices: string;
  /** Settles when the VM process has exited. */
  readonly exited: Promise<VmExit>;
  /** The last lines the hypervisor and the guest console printed, for error messages. */
  diagnostics(): Promise<string>;
  /**
   * Pauses the guest for good and saves its device state to `stateFile`; RAM in a shared file
   * (`VmSpec.ram`) is left out, the file is the snapshot's memory. The VM must never run again
   * (clones map its RAM file): the caller stops it.
   */
  snapshot(stateFile: string): Promise<void>;
  /**
   * Freezes the guest's vCPUs (QMP `stop`): nothing runs in the guest and the hypervisor uses no CPU
   * for it, while its memory, devices and host-side connections stay as they are. Resolves once the
   * vCPUs are stopped.
   */
  pause(): Promise<void>;
  /** Lets a paused guest run again (QMP `cont`) from where it stopped. */
  resume(): Promise<void>;
  /**
   * The VM dir was renamed to `dir` (a clone made ahead of time, adopted by a sandbox): logs are read
   * and written there from now on. Files the hypervisor holds open stay open through the rename.
   */
  relocate(dir: string): void;
  /** Stops the VM (graceful quit, then kill after `graceMs`) and waits for it to exit. */
  stop(graceMs?: number): Promise<void>;
}

export interface VmBackend {
  readonly name: string;
  start(spec: VmSpec): Promise<RunningVm>;
}
