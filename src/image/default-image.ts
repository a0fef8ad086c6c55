import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, chown, mkdir, readFile, rename, rm, symlink, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { DEFAULT_PATH, type ImageConfig } from "../api/config.ts";
import { MatchlockError, NotSetUpError } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { runCommand } from "../host/command.ts";
import { readJson, scratchDir } from "../host/fsutil.ts";
import { makeExt4FromDir } from "./ext4.ts";

/**
 * The default image, used when `--image` is omitted: a small busybox userland from Debian's
 * busybox-static, so `matchlock setup` can give a working sandbox with no registry.
 */

export const DEFAULT_IMAGE = "matchlock/default:latest";
const BUSYBOX = "/bin/busybox";
const RECIPE_VERSION = 1; // bump when the layout below changes, so setup rebuilds it

export const DEFAULT_IMAGE_CONFIG: ImageConfig = {
  cmd: ["/bin/sh"],
  env: { PATH: DEFAULT_PATH },
  working_dir: "/",
};

const PASSWD = `root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
`;

const GROUP = `root:x:0:
daemon:x:1:
tty:x:5:
users:x:100:user
user:x:1000:
nogroup:x:65534:
`;

export function defaultImageDir(p: Paths): string {
  return join(p.images, "default");
}

interface DefaultStamp {
  recipe: number;
  busybox: string;
}

/** Builds the default image unless one from the same busybox and recipe exists. */
export async function buildDefaultImage(p: Paths, log: (line: string) => void): Promise<"built" | "cached"> {
  if (!existsSync(BUSYBOX)) {
    throw new MatchlockError("SETUP_FAILED", `${BUSYBOX} is missing`, {
      hint: "apt-get install busybox-static",
    });
  }
  const busybox = await readFile(BUSYBOX);
  const busyboxHash = createHash("sha256").update(busybox).digest("hex");
  const dir = defaultImageDir(p);
  const stamp = await readJson<DefaultStamp>(join(dir, "image.json"));
  if (
    stamp?.recipe === RECIPE_VERSION &&
    stamp.busybox === busyboxHash &&
    existsSync(join(dir, "rootfs.ext4"))
  ) {
    return "cached";
  }
  log(`building the default image ${DEFAULT_IMAGE} from busybox-static`);
  await mkdir(p.images, { recursive: true });
  const work = await scratchDir(p.images, "default");
  try {
    const root = join(work, "rootfs");
    await stageRootfs(root, busybox);
    const out = join(work, "out");
    await mkdir(out);
    await makeExt4FromDir(root, join(out, "rootfs.ext4"), "matchlock-default");
    await writeFile(join(out, "config.json"), `${JSON.stringify(DEFAULT_IMAGE_CONFIG, null, 2)}\n`);
    const newStamp: DefaultStamp = { recipe: RECIPE_VERSION, busybox: busyboxHash };
    await writeFile(join(out, "image.json"), `${JSON.stringify(newStamp)}\n`);
    await rm(dir, { recursive: true, force: true });
    await rename(out, dir);
    return "built";
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

async function stageRootfs(root: string, busybox: Buffer): Promise<void> {
  for (const d of [
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "etc",
    "dev",
    "proc",
    "sys",
    "run",
    "mnt",
    "var/tmp",
  ]) {
    await mkdir(join(root, d), { recursive: true, mode: 0o755 });
  }
  await mkdir(join(root, "tmp"));
  await chmod(join(root, "tmp"), 0o1777);
  await chmod(join(root, "var/tmp"), 0o1777);
  await mkdir(join(root, "root"), { mode: 0o700 });
  await mkdir(join(root, "home/user"), { recursive: true, mode: 0o755 });
  if (process.getuid?.() === 0) await chown(join(root, "home/user"), 1000, 1000);
  await writeFile(join(root, "bin/busybox"), busybox, { mode: 0o755 });
  // One symlink per applet, where busybox says it belongs (bin/sh, usr/bin/env, …).
  const list = (await runCommand(BUSYBOX, ["--list-full"])).stdout.toString().split("\n").filter(Boolean);
  for (const applet of list) {
    if (applet === "bin/busybox" || applet.includes("..")) continue;
    const link = join(root, applet);
    if (existsSync(link)) continue;
    await mkdir(dirname(link), { recursive: true });
    await symlink("/bin/busybox", link);
  }
  const etc = (name: string, text: string, mode = 0o644) =>
    writeFile(join(root, "etc", name), text, { mode });
  await etc("passwd", PASSWD);
  await etc("group", GROUP);
  await etc("shadow", "root:*:0:0:99999:7:::\nuser:*:0:0:99999:7:::\n", 0o600);
  await etc("hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
  await etc("hostname", "matchlock\n");
  await etc("resolv.conf", "");
  await etc(
    "os-release",
    'NAME="matchlock default (busybox)"\nID=matchlock-busybox\nPRETTY_NAME="matchlock default image"\n',
  );
  await etc("profile", 'export PS1="\\u@\\h:\\w\\$ "\n');
}

/** The image base disk and config the VM boots from. */
export interface ResolvedImage {
  ref: string;
  rootfs: string;
  fstype: "ext4";
  config: ImageConfig;
}

export async function loadDefaultImage(p: Paths): Promise<ResolvedImage | undefined> {
  const dir = defaultImageDir(p);
  const config = await readJson<ImageConfig>(join(dir, "config.json"));
  if (!config || !existsSync(join(dir, "rootfs.ext4"))) return undefined;
  return { ref: DEFAULT_IMAGE, rootfs: join(dir, "rootfs.ext4"), fstype: "ext4", config };
}

/** Names that mean the default image built by `matchlock setup`. */
const DEFAULT_ALIASES = new Set([DEFAULT_IMAGE, "matchlock/default", "default"]);

export function isDefaultRef(ref: string): boolean {
  return ref === "" || DEFAULT_ALIASES.has(ref);
}

export async function requireDefaultImage(p: Paths): Promise<ResolvedImage> {
  const img = await loadDefaultImage(p);
  if (!img) throw new NotSetUpError(`the default image ${DEFAULT_IMAGE} is not built`);
  return img;
}
