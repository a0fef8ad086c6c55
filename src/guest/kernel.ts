import { existsSync } from "node:fs";
import { copyFile, mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import * as zlib from "node:zlib";
import { MatchlockError, NotSetUpError } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { runCommand } from "../host/command.ts";
import { readJson, scratchDir } from "../host/fsutil.ts";

/**
 * The guest kernel: Debian's cloud kernel, fetched with `apt-get download`, its bzImage unpacked to
 * the ELF vmlinux (boots through PVH on `microvm`, no decompression in the guest), plus the modules
 * the guest needs, in dependency order.
 */

export const KERNEL_PACKAGE = "linux-image-cloud-amd64";

/** Modules the guest loads (their dependencies are added). Built-in drivers need no entry. */
export const GUEST_MODULES = [
  "virtio_mmio",
  "virtio_blk",
  "virtio_console",
  "overlay",
  "virtio-rng",
  "virtio_net",
  "fuse",
];

export interface KernelInfo {
  version: string;
  vmlinux: string;
  /** Module files in load order. */
  modules: string[];
}

interface KernelStamp {
  version: string;
  modules: string[];
  wanted: string[];
}

export function kernelRoot(p: Paths): string {
  return join(p.kernels, "current");
}

/** The installed kernel, or the MATCHLOCK_KERNEL override (then no modules: its drivers must be built in). */
export async function loadKernel(p: Paths, env: NodeJS.ProcessEnv = process.env): Promise<KernelInfo> {
  const root = kernelRoot(p);
  const stamp = await readJson<KernelStamp>(join(root, "kernel.json"));
  const override = env.MATCHLOCK_KERNEL;
  if (override) {
    if (!existsSync(override))
      throw new MatchlockError("INVALID_ARGUMENT", `MATCHLOCK_KERNEL=${override}: no such file`);
    return {
      version: "custom",
      vmlinux: override,
      modules: stamp ? stamp.modules.map((m) => join(root, "modules", m)) : [],
    };
  }
  if (!stamp || !existsSync(join(root, "vmlinux")))
    throw new NotSetUpError("the guest kernel is not installed");
  return {
    version: stamp.version,
    vmlinux: join(root, "vmlinux"),
    modules: stamp.modules.map((m) => join(root, "modules", m)),
  };
}

/** Fetches and unpacks the kernel unless the installed one already has every wanted module. */
export async function installKernel(p: Paths, log: (line: string) => void): Promise<"installed" | "cached"> {
  const root = kernelRoot(p);
  const stamp = await readJson<KernelStamp>(join(root, "kernel.json"));
  if (
    stamp &&
    existsSync(join(root, "vmlinux")) &&
    GUEST_MODULES.every((m) => stamp.wanted.includes(m)) &&
    stamp.modules.every((m) => existsSync(join(root, "modules", m)))
  ) {
    return "cached";
  }
  await mkdir(p.kernels, { recursive: true });
  const work = await scratchDir(p.kernels, "kernel");
  try {
    log(`downloading ${KERNEL_PACKAGE} with apt-get`);
    const meta = await aptDownload(KERNEL_PACKAGE, work);
    const depends = (await runCommand("dpkg-deb", ["-f", meta, "Depends"])).stdout.toString().trim();
    const real = /^(linux-image-[^\s,(]+)/.exec(depends)?.[1];
    if (!real)
      throw new MatchlockError(
        "SETUP_FAILED",
        `${KERNEL_PACKAGE} depends on no linux-image package ("${depends}")`,
      );
    log(`downloading ${real}`);
    const deb = await aptDownload(real, work);
    const tree = join(work, "tree");
    await runCommand("dpkg", ["-x", deb, tree]);
    const boot = join(tree, "boot");
    const vmlinuz = (await readdir(boot)).find((f) => f.startsWith("vmlinuz-"));
    if (!vmlinuz) throw new MatchlockError("SETUP_FAILED", `${real} contains no /boot/vmlinuz-*`);
    const version = vmlinuz.slice("vmlinuz-".length);
    const out = join(work, "out");
    await mkdir(join(out, "modules"), { recursive: true });
    log(`unpacking kernel ${version}`);
    await writeFile(join(out, "vmlinux"), await extractVmlinux(join(boot, vmlinuz)));
    const modules = await collectModules(join(tree, "lib", "modules", version), join(out, "modules"));
    const newStamp: KernelStamp = { version, modules, wanted: GUEST_MODULES };
    await writeFile(join(out, "kernel.json"), `${JSON.stringify(newStamp, null, 2)}\n`);
    const old = `${root}.old-${process.pid}`;
    if (existsSync(root)) await rename(root, old);
    await rename(out, root);
    await rm(old, { recursive: true, force: true });
    return "installed";
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

async function aptDownload(pkg: string, dir: string): Promise<string> {
  const before = new Set(await readdir(dir));
  await runCommand("apt-get", ["download", "-q", pkg], { cwd: dir }).catch((e: unknown) => {
    throw new MatchlockError("SETUP_FAILED", `apt-get download ${pkg} failed`, {
      cause: e,
      hint: "run `apt-get update` and check that Debian's repositories are reachable",
    });
  });
  const file = (await readdir(dir)).find((f) => !before.has(f) && f.endsWith(".deb"));
  if (!file) throw new MatchlockError("SETUP_FAILED", `apt-get download ${pkg} produced no .deb`);
  return join(dir, file);
}

/**
 * bzImage → ELF vmlinux. The x86 boot header (boot protocol ≥ 2.08) says where the compressed
 * payload is and how long; its magic says how it is compressed.
 */
export async function extractVmlinux(bzImagePath: string): Promise<Buffer> {
  const img = await readFile(bzImagePath);
  if (img.subarray(0, 4).toString("latin1") === "\x7fELF") return img; // already an ELF
  if (img.length < 0x260 || img.subarray(0x202, 0x206).toString("latin1") !== "HdrS") {
    throw new MatchlockError("SETUP_FAILED", `${basename(bzImagePath)} is neither an ELF nor a bzImage`);
  }
  const setupSects = img[0x1f1] || 4;
  const start = (setupSects + 1) * 512 + img.readUInt32LE(0x248);
  const payload = img.subarray(start, start + img.readUInt32LE(0x24c));
  let elf: Buffer;
  const magic = payload.subarray(0, 4).toString("hex");
  // The kernel build appends the uncompressed size (4 bytes) after an LZ4 payload; lz4 rejects it.
  if (magic === "02214c18")
    elf = (await runCommand("lz4", ["-dc"], { input: payload.subarray(0, -4) })).stdout;
  else if (magic.startsWith("1f8b")) elf = zlib.gunzipSync(payload);
  else if (magic === "28b52ffd") elf = zlib.zstdDecompressSync(payload);
  else if (magic.startsWith("fd377a58")) elf = (await runCommand("xz", ["-dc"], { input: payload })).stdout;
  else throw new MatchlockError("SETUP_FAILED", `unknown kernel payload compression (magic ${magic})`);
  if (elf.subarray(0, 4).toString("latin1") !== "\x7fELF") {
    throw new MatchlockError("SETUP_FAILED", "the unpacked kernel payload is not an ELF file");
  }
  return elf;
}

/** Copies GUEST_MODULES and their dependencies, named `NN-name.ko` in load order. */
async function collectModules(modRoot: string, dest: string): Promise<string[]> {
  const files = new Map<string, string>();
  for await (const f of walk(join(modRoot, "kernel"))) {
    const m = /^(.*)\.ko(\.xz|\.zst|\.gz)?$/.exec(basename(f));
    if (m?.[1]) files.set(normalizeModName(m[1]), f);
  }
  const order: string[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = async (name: string): Promise<void> => {
    const key = normalizeModName(name);
    if (state.get(key) === "done") return;
    if (state.get(key) === "visiting")
      throw new MatchlockError("SETUP_FAILED", `module dependency cycle at ${name}`);
    const file = files.get(key);
    if (!file)
      throw new MatchlockError("SETUP_FAILED", `kernel module ${name} is missing from the kernel package`);
    state.set(key, "visiting");
    const deps = (await runCommand("modinfo", ["-F", "depends", file])).stdout.toString().trim();
    for (const d of deps.split(",").filter(Boolean)) await visit(d);
    state.set(key, "done");
    order.push(key);
  };
  for (const m of GUEST_MODULES) await visit(m);
  const names: string[] = [];
  for (const [i, key] of order.entries()) {
    const src = files.get(key) as string;
    const name = `${String(i).padStart(2, "0")}-${key}.ko`;
    const out = join(dest, name);
    if (src.endsWith(".ko")) await copyFile(src, out);
    else if (src.endsWith(".xz")) await writeFile(out, (await runCommand("xz", ["-dc", src])).stdout);
    else if (src.endsWith(".zst")) await writeFile(out, zlib.zstdDecompressSync(await readFile(src)));
    else await writeFile(out, zlib.gunzipSync(await readFile(src)));
    names.push(name);
  }
  return names;
}

/** Module names treat `-` and `_` alike. */
function normalizeModName(n: string): string {
  return n.replaceAll("-", "_");
}

async function* walk(dir: string): AsyncGenerator<string> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const full = join(dir, e.name);
    if (e.isDirectory()) yield* walk(full);
    else yield full;
  }
}
