import { createHash, randomBytes } from "node:crypto";
import { existsSync, readdirSync, statSync } from "node:fs";
import { copyFile, mkdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { delimiter, join } from "node:path";
import { hostFoldersRequested, type SandboxConfig } from "../api/config.ts";
import { MatchlockError, messageOf } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { AgentClient } from "../guest/agent-client.ts";
import { loadInitramfs } from "../guest/initramfs.ts";
import { loadKernel } from "../guest/kernel.ts";
import type { ExecRequest } from "../guest/protocol.ts";
import { copySparse } from "../host/sparse.ts";
import { makeEmptyExt4 } from "../image/ext4.ts";
import type { ResolvedImage } from "../image/resolve.ts";
import { findProcesses, isAlive, selfIdentity } from "../state/procs.ts";
import type { TemplateRow } from "../state/snapshots.ts";
import type { StateStore } from "../state/store.ts";
import type { Accel, RunningVm, VmBackend, VmSpec } from "../vm/backend.ts";
import { chooseAccel } from "../vm/qemu/accel.ts";
import { QEMU_BINARY } from "../vm/qemu/argv.ts";
import { hostTscKhz } from "../vm/qemu/tsc.ts";
import { waitReady } from "./agent-ready.ts";
import { writeEtcFiles } from "./etc-files.ts";
import { crashPoint } from "./faults.ts";

/**
 * Snapshot templates (fast starts). A template is a VM booted once to an idle agent and saved: its
 * RAM in a file, its device state, its upper disk. A new sandbox restores a clone of it instead of
 * booting: QEMU maps the RAM file private (copy-on-write, loaded lazily), loads the device state and
 * continues, on a byte-identical copy of the upper disk (a fresh one corrupts silently: the guest's
 * cached metadata would not match it). The agent then makes the clone an individual (SET_IDENTITY):
 * fresh entropy, clock, hostname, address, host folders.
 *
 * One template per set of inputs (kernel, initramfs with the agent, image, QEMU, accelerator, TSC,
 * memory, CPUs, disk size, NIC or not, host folders or not), keyed by their digest, so a changed
 * input is a new key and never a stale restore. Templates live in `~/.matchlock/snapshots/<key>/`,
 * recorded in state.db (`snapshot_templates`) before their files exist, so `gc` removes the remains
 * of a build that crashed. A template never runs again after its snapshot: clones map its RAM file,
 * and a write into it would show through in every clone.
 */

/** Bumped when what a template holds changes shape (QEMU arguments, agent boot parameters). */
const TEMPLATE_FORMAT = 3;
/** Every clone keeps its template's MAC (it is in the device state); each VM has its own TAP. */
export const TEMPLATE_MAC = "02:6d:6c:00:00:02";
const RAM_FILE = "ram";
const STATE_FILE = "state";
const UPPER_FILE = "upper.ext4";
/** The template VM's device signature (`RunningVm.devices`): what a clone's must equal. */
const DEVICES_FILE = "devices";
/** Snapshots on disk beyond this are evicted, least recently used first (MATCHLOCK_SNAPSHOT_MAX_MB). */
const DEFAULT_MAX_MB = 2048;
/** How long a restored agent has to answer; a healthy restore answers in well under a second. */
const RESTORE_ANSWER_MS = 15_000;

export interface TemplateVariant {
  memoryMb: number;
  cpus: number;
  diskMb: number;
  /** A virtio-net NIC (the sandbox has a network). */
  nic: boolean;
  /** The `vfs` port and the fuse module (host folders). */
  vfs: boolean;
}

/** The template a sandbox with this config restores from. */
export function variantOf(config: SandboxConfig): TemplateVariant {
  return {
    memoryMb: config.resources.memory_mb,
    cpus: config.resources.cpus,
    diskMb: config.resources.disk_size_mb,
    nic: !config.network.no_network,
    vfs: hostFoldersRequested(config),
  };
}

export interface TemplateInputs extends TemplateVariant {
  format: number;
  qemu: string;
  kernel: string;
  initramfs: string;
  image: { ref: string; rootfs: string; fstype: string };
  accel: Accel;
  tscKhz: number;
  /** The template's boot parameters; a clone's QEMU is started with the same command line. */
  kernelArgs: string[];
}

export interface Template {
  key: string;
  dir: string;
  inputs: TemplateInputs;
  ram: string;
  state: string;
  upper: string;
}

export function snapshotsDir(p: Paths): string {
  return join(p.home, "snapshots");
}

/**
 * PATH:size:mtime:inode: changes whenever the file is rebuilt (our builders write a new file and
 * rename it into place).
 */
function fileId(path: string): string {
  const s = statSync(path);
  return `${path}:${s.size}:${Math.round(s.mtimeMs)}:${s.ino}`;
}

function pathOf(id: string): string {
  return id.split(":").slice(0, -3).join(":");
}

function qemuId(): string {
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    const path = join(dir || ".", QEMU_BINARY);
    if (existsSync(path)) return fileId(path);
  }
  return QEMU_BINARY;
}

export interface TemplateContext {
  /** The cache dir (the TSC frequency is cached there, as the QEMU backend does). */
  cacheDir: string;
  kernel: string;
  initramfs: string;
  image: ResolvedImage;
  accel: Accel;
}

/**
 * The kernel, initramfs and accelerator a sandbox of this image boots with, as create picks them
 * (`forcedAccel`: `--accel`): what a cold boot uses, and what a template's inputs start from.
 */
export async function bootContext(
  p: Paths,
  image: ResolvedImage,
  forcedAccel?: string,
): Promise<TemplateContext> {
  const kernel = (await loadKernel(p)).vmlinux;
  const initramfs = await loadInitramfs(p);
  const { accel } = await chooseAccel(join(p.cache, "accel.json"), { kernel, initramfs }, forcedAccel);
  return { cacheDir: p.cache, kernel, initramfs, image, accel };
}

export async function templateInputs(
  ctx: TemplateContext,
  variant: TemplateVariant,
): Promise<TemplateInputs> {
  return {
    format: TEMPLATE_FORMAT,
    qemu: qemuId(),
    kernel: fileId(ctx.kernel),
    initramfs: fileId(ctx.initramfs),
    image: { ref: ctx.image.ref, rootfs: fileId(ctx.image.rootfs), fstype: ctx.image.fstype },
    accel: ctx.accel,
    tscKhz: ctx.accel === "tcg" ? await hostTscKhz(join(ctx.cacheDir, "tsc.json")) : 0,
    ...variant,
    kernelArgs: [
      `matchlock.rootfstype=${ctx.image.fstype}`,
      ...(variant.nic ? ["matchlock.net=up"] : []),
      ...(variant.vfs ? ["matchlock.fuse=1"] : []),
    ],
  };
}

export function templateKey(inputs: TemplateInputs): string {
  return createHash("sha256").update(JSON.stringify(inputs)).digest("hex").slice(0, 16);
}

function template(key: string, dir: string, inputs: TemplateInputs): Template {
  return {
    key,
    dir,
    inputs,
    ram: join(dir, RAM_FILE),
    state: join(dir, STATE_FILE),
    upper: join(dir, UPPER_FILE),
  };
}

function templateOf(row: TemplateRow): Template {
  return template(row.key, row.dir, JSON.parse(row.inputs_json) as TemplateInputs);
}

/** The spec both the template and its clones run with: the same devices in the same order. */
function vmSpec(t: Template, run: { id: string; dir: string; upper: string; tap?: string }): VmSpec {
  const i = t.inputs;
  return {
    id: run.id,
    dir: run.dir,
    kernel: pathOf(i.kernel),
    initramfs: pathOf(i.initramfs),
    kernelArgs: i.kernelArgs,
    cpus: i.cpus,
    memoryMb: i.memoryMb,
    disks: [
      { path: pathOf(i.image.rootfs), readonly: true },
      { path: run.upper, readonly: false },
    ],
    accel: i.accel,
    ...(i.nic && run.tap ? { nic: { tap: run.tap, mac: TEMPLATE_MAC } } : {}),
    ...(i.vfs ? { vfs: true } : {}),
  };
}

function filesPresent(t: Template): boolean {
  return [t.ram, t.state, t.upper, join(t.dir, DEVICES_FILE)].every((f) => existsSync(f));
}

/** The template with this key if it is ready and its files are there; it neither builds nor touches. */
export function readyTemplate(state: StateStore, key: string): Template | undefined {
  const row = state.snapshots.get(key);
  if (row?.status !== "ready") return undefined;
  const t = templateOf(row);
  return filesPresent(t) ? t : undefined;
}

/** `sh -c true` as RPC exec runs a command: what a template (and a clone made ahead) runs once. */
export const SHELL_TRUE: ExecRequest = {
  argv: ["/bin/sh", "-c", "true"],
  env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
  cwd: "/",
  user: "",
  tty: false,
  stdin: false,
  mkdirCwd: false,
};

export type TemplateLookup =
  | { template: Template; built: boolean; evicted?: TemplateRow[] }
  | { template: undefined; reason: string };

/**
 * The ready template for these inputs, building it first when there is none. Nobody waits for
 * another process's build: that sandbox boots cold this once.
 */
export async function findOrBuildTemplate(
  p: Paths,
  state: StateStore,
  inputs: TemplateInputs,
  opts: {
    backend: VmBackend;
    bootTimeoutMs: number;
    progress: (m: string) => void;
    /** The cap on all snapshots' disk use (`snapshotMaxBytes`): a new one evicts older ones. */
    maxBytes: number;
  },
): Promise<TemplateLookup> {
  const key = templateKey(inputs);
  const row = state.snapshots.get(key);
  if (row?.status === "ready") {
    const t = templateOf(row);
    if (filesPresent(t)) {
      state.snapshots.touch(key);
      return { template: t, built: false };
    }
    await removeTemplate(state, row); // files gone (removed by hand): rebuild
  } else if (row) {
    if (isAlive({ pid: row.owner_pid, start_time: row.owner_start_time }))
      return { template: undefined, reason: "its snapshot is being built by another process" };
    await removeTemplate(state, row); // a build that crashed
  }
  const dir = join(snapshotsDir(p), key);
  if (!state.snapshots.claim(key, inputs.image.ref, dir, selfIdentity(), inputs)) {
    return { template: undefined, reason: "its snapshot is being built by another process" };
  }
  opts.progress(`building a snapshot of ${inputs.image.ref} for fast starts (once per image and size)`);
  const t = template(key, dir, inputs);
  try {
    await buildTemplate(t, opts);
    state.snapshots.markReady(key, await diskBytes(dir));
    const evicted = await evictTemplates(state, opts.maxBytes, key);
    for (const old of evicted) opts.progress(evictionNote(old));
    return { template: t, built: true, evicted };
  } catch (e) {
    await rm(dir, { recursive: true, force: true }).catch(() => {});
    state.snapshots.remove(key);
    return { template: undefined, reason: `building its snapshot failed: ${messageOf(e)}` };
  }
}

async function buildTemplate(
  t: Template,
  opts: { backend: VmBackend; bootTimeoutMs: number },
): Promise<void> {
  await rm(t.dir, { recursive: true, force: true });
  await mkdir(t.dir, { recursive: true, mode: 0o700 });
  await makeEmptyExt4(t.upper, t.inputs.diskMb);
  crashPoint("snapshot-building");
  // The template's NIC needs a TAP: QEMU creates one (not persistent: it goes with QEMU), never up
  // and with no address, so the template has no network at all; clones get their VM's own TAP.
  const tap = `mlt-${t.key.slice(0, 11)}`;
  const vm = await opts.backend.start({
    ...vmSpec(t, { id: `template-${t.key}`, dir: t.dir, upper: t.upper, tap }),
    kernelArgs: [...t.inputs.kernelArgs, `matchlock.time=${Math.floor(Date.now() / 1000)}`],
    ram: { file: t.ram, shared: true },
  });
  const agent = new AgentClient(vm.agent);
  try {
    await waitReady(agent, vm, opts.bootTimeoutMs);
    // Placeholders, so a clone overwrites files already in its upper layer instead of copying them
    // up from the image: less guest code to run (untranslated under TCG) before a clone is ready.
    await writeEtcFiles(agent, {
      hostname: "localhost",
      addHosts: [],
      ...(t.inputs.nic ? { gateway: "127.0.0.1" } : {}),
    });
    // And run the image's shell once (as RPC exec does), so that its pages and the loader's are in
    // the snapshot's page cache: a clone's first command then reads nothing from the disk, which is
    // slow under TCG. An image without /bin/sh just skips this.
    await agent.exec(SHELL_TRUE).done.catch(() => {});
    await agent.ping(); // the agent is in its loop, idle: nothing is in flight when the state is saved
    await vm.snapshot(t.state);
    await writeFile(join(t.dir, DEVICES_FILE), vm.devices, { mode: 0o600 });
    crashPoint("snapshot-saved");
  } finally {
    agent.close();
    await vm.stop(0); // SIGKILL: it must never run again
  }
  for (const f of ["agent.sock", "qmp.sock", "vfs.sock"]) await rm(join(t.dir, f), { force: true });
}

async function diskBytes(dir: string): Promise<number> {
  let total = 0;
  for (const f of readdirSync(dir)) {
    const s = await stat(join(dir, f)).catch(() => undefined);
    if (s?.isFile()) total += s.blocks * 512;
  }
  return total;
}

/** The clone's spec: the template's devices, this VM's sockets, disk and TAP, the template's RAM file. */
export function restoreSpec(
  t: Template,
  devices: string,
  run: { id: string; dir: string; upper: string; tap?: string },
): VmSpec {
  return {
    ...vmSpec(t, run),
    ram: { file: t.ram, shared: false },
    restoreFrom: t.state,
    restoreDevices: devices,
  };
}

/**
 * Prepares a clone's files in its VM dir: a byte-identical copy of the template's upper disk, and
 * its console log, which starts with the template's boot (the boot the clone continues from).
 */
export async function prepareClone(t: Template, vmDir: string, upper: string): Promise<{ devices: string }> {
  const devices = await readFile(join(t.dir, DEVICES_FILE), "utf8");
  await copySparse(t.upper, upper);
  await copyFile(join(t.dir, "console.log"), join(vmDir, "console.log")).catch(() => {});
  return { devices };
}

/**
 * Makes a freshly restored clone this VM: SET_IDENTITY with 64 bytes of host entropy and the VM's
 * own boot parameters, and waits for its answer (no READY comes after a restore).
 */
export async function adoptClone(
  agent: AgentClient,
  vm: RunningVm,
  params: string[],
  bootTimeoutMs: number,
): Promise<void> {
  // The boot deadline (MATCHLOCK_BOOT_TIMEOUT) bounds a restore too.
  const limitMs = Math.min(RESTORE_ANSWER_MS, bootTimeoutMs);
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      // Its RESULT is the first word from the restored agent: no ping first (one round trip less).
      agent.setIdentity(randomBytes(64), params),
      vm.exited.then((e): never => {
        throw new MatchlockError("VM_FAILED", `the restored VM exited (${e.signal ?? `code ${e.code}`})`);
      }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new MatchlockError("VM_FAILED", `the restored VM did not answer within ${limitMs / 1000} s`),
            ),
          limitMs,
        );
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

export function evictionNote(old: TemplateRow): string {
  return `removed the least recently used snapshot ${old.key} (${old.image}) to stay within MATCHLOCK_SNAPSHOT_MAX_MB`;
}

/** The cap on snapshots' disk use, in bytes, from MATCHLOCK_SNAPSHOT_MAX_MB (default 2048). */
export function snapshotMaxBytes(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.MATCHLOCK_SNAPSHOT_MAX_MB;
  if (v === undefined || v === "") return DEFAULT_MAX_MB * 1024 * 1024;
  const mb = Number(v);
  if (!Number.isFinite(mb) || mb < 0)
    throw new MatchlockError("INVALID_ARGUMENT", `MATCHLOCK_SNAPSHOT_MAX_MB=${v} is not a number of MiB`);
  return mb * 1024 * 1024;
}

/**
 * Removes ready templates, least recently used first, until those on disk take at most `maxBytes`;
 * `keep` (the one just built) always stays. Clones running from a removed template are unaffected:
 * their RAM mapping and disk copy outlive the files. A create that picked it a moment before falls
 * back to a cold boot.
 */
export async function evictTemplates(
  state: StateStore,
  maxBytes: number,
  keep: string,
): Promise<TemplateRow[]> {
  const ready = state.snapshots.list().filter((r) => r.status === "ready");
  let total = ready.reduce((n, r) => n + r.bytes, 0);
  const evicted: TemplateRow[] = [];
  const oldestFirst = ready
    .filter((r) => r.key !== keep)
    .sort((a, b) => a.last_used_at.localeCompare(b.last_used_at));
  for (const row of oldestFirst) {
    if (total <= maxBytes) break;
    await removeTemplate(state, row);
    total -= row.bytes;
    evicted.push(row);
  }
  return evicted;
}

/** Deletes a template's files and record; QEMU processes still building it are killed first. */
export async function removeTemplate(state: StateStore, row: TemplateRow): Promise<void> {
  if (row.status === "building") {
    for (const proc of findProcesses(`${row.dir}/`, /qemu-system/)) {
      try {
        process.kill(proc.pid, "SIGKILL");
      } catch {}
    }
  }
  await rm(row.dir, { recursive: true, force: true });
  state.snapshots.remove(row.key);
}

/**
 * Templates no longer usable: an input file is gone or changed, or this version of matchlock builds
 * templates of another shape (TEMPLATE_FORMAT). Their key is never asked for again.
 */
export function isStale(row: TemplateRow): boolean {
  return staleReason(row) !== undefined;
}

function staleReason(row: TemplateRow): string | undefined {
  const i = JSON.parse(row.inputs_json) as TemplateInputs;
  if (i.format !== TEMPLATE_FORMAT) return "made by another version of matchlock";
  const same = (id: string) => {
    try {
      return fileId(pathOf(id)) === id;
    } catch {
      return false;
    }
  };
  const current =
    same(i.kernel) && same(i.initramfs) && same(i.image.rootfs) && (i.qemu === QEMU_BINARY || same(i.qemu));
  return current ? undefined : "inputs changed";
}

/**
 * `gc`: builds whose process died, templates whose inputs changed, files of templates with no
 * record, and records whose files are gone. Returns what it removed.
 */
export async function sweepTemplates(
  state: StateStore,
  p: Paths,
): Promise<Array<{ key: string; why: string }>> {
  const removed: Array<{ key: string; why: string }> = [];
  const rows = state.snapshots.list();
  for (const row of rows) {
    let why: string | undefined;
    if (row.status === "building") {
      if (!isAlive({ pid: row.owner_pid, start_time: row.owner_start_time })) why = "build interrupted";
    } else if (!existsSync(row.dir)) why = "files missing";
    else why = staleReason(row);
    if (why) {
      await removeTemplate(state, row);
      removed.push({ key: row.key, why });
    }
  }
  const known = new Set(rows.map((r) => r.key));
  const dirs = existsSync(snapshotsDir(p)) ? readdirSync(snapshotsDir(p), { withFileTypes: true }) : [];
  for (const name of dirs) {
    if (!name.isDirectory() || known.has(name.name) || state.snapshots.get(name.name)) continue;
    await rm(join(snapshotsDir(p), name.name), { recursive: true, force: true });
    removed.push({ key: name.name, why: "not recorded" });
  }
  return removed;
}
