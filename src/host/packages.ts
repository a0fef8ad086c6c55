import { MatchlockError } from "../api/errors.ts";
import { runCommand } from "./command.ts";

/** The Debian packages matchlock needs on the host, and installing the missing ones. */

export interface HostPackage {
  name: string;
  why: string;
}

export const HOST_PACKAGES: HostPackage[] = [
  { name: "qemu-system-x86", why: "runs the micro-VMs (qemu-system-x86_64 -M microvm)" },
  { name: "busybox-static", why: "the userland of the default image" },
  { name: "e2fsprogs", why: "mkfs.ext4 for image and VM disks" },
  { name: "lz4", why: "unpacks the kernel's LZ4 payload" },
  { name: "kmod", why: "modinfo, to order the guest's kernel modules" },
  { name: "gcc", why: "compiles the guest agent" },
  { name: "libc6-dev", why: "static C library for the guest agent" },
  { name: "binutils", why: "objcopy: strips the guest's kernel modules for a faster boot" },
  { name: "util-linux", why: "setpriv: QEMU dies with its owning process" },
  { name: "attr", why: "setfattr: images keep their file capabilities and xattrs" },
  { name: "iproute2", why: "ip: creates each VM's TAP device" },
  { name: "nftables", why: "nft: each VM's firewall table, which routes its traffic to matchlock" },
];

/** dpkg-query's own placeholder syntax (not a JS template). */
// biome-ignore lint/suspicious/noTemplateCurlyInString: dpkg-query format string
const DPKG_STATUS_FORMAT = "-f=${db:Status-Status}";

export async function isInstalled(pkg: string): Promise<boolean> {
  const r = await runCommand("dpkg-query", ["-W", DPKG_STATUS_FORMAT, pkg], {
    allowFailure: true,
  }).catch(() => undefined);
  return r?.code === 0 && r.stdout.toString().trim() === "installed";
}

export async function missingPackages(pkgs: HostPackage[] = HOST_PACKAGES): Promise<HostPackage[]> {
  const state = await Promise.all(pkgs.map(async (p) => ({ p, ok: await isInstalled(p.name) })));
  return state.filter((s) => !s.ok).map((s) => s.p);
}

/** apt-get install of `names`; runs `apt-get update` first, since a fresh machine has no lists. */
export async function aptInstall(names: string[], log: (line: string) => void): Promise<void> {
  if (process.getuid?.() !== 0) {
    throw new MatchlockError("SETUP_FAILED", `missing packages: ${names.join(", ")}`, {
      hint: `run \`matchlock setup\` as root, or: sudo apt-get install -y ${names.join(" ")}`,
    });
  }
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
  log("apt-get update");
  await runCommand("apt-get", ["update", "-q"], { env });
  log(`apt-get install ${names.join(" ")}`);
  await runCommand("apt-get", ["install", "-y", "-q", "--no-install-recommends", ...names], { env });
}
