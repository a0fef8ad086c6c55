import { randomBytes } from "node:crypto";
import { constants, existsSync } from "node:fs";
import { access, mkdir, statfs } from "node:fs/promises";
import { arch, platform } from "node:os";
import { join } from "node:path";
import { messageOf } from "../api/errors.ts";
import { NODE_ENGINES, nodeSupported } from "../api/node-support.ts";
import type { Paths } from "../api/paths.ts";
import { agentBinaryPath } from "../guest/agent-build.ts";
import { initramfsPath } from "../guest/initramfs.ts";
import { loadKernel } from "../guest/kernel.ts";
import { hasCommand, runCommand } from "../host/command.ts";
import { readJson } from "../host/fsutil.ts";
import { HOST_PACKAGES, missingPackages } from "../host/packages.ts";
import { DEFAULT_IMAGE, loadDefaultImage } from "../image/default-image.ts";
import { droppingInputChains, ruleset } from "../net/host-net.ts";
import { checkState, STATE_RECOVER_HINT, stateDbPath } from "../state/store.ts";
import { kvmUsable } from "../vm/qemu/accel.ts";

/** The checks of `matchlock diagnose` (its command: diagnose.ts). */

export type Status = "ok" | "warn" | "fail";

interface Check {
  name: string;
  status: Status;
  detail: string;
  fix?: string;
}

async function safe(name: string, fn: () => Promise<Check>): Promise<Check> {
  try {
    return await fn();
  } catch (e) {
    return { name, status: "fail", detail: messageOf(e) };
  }
}

const SETUP_FIX = "matchlock setup";

/** state.db: the file checks and SQLite's quick_check, without changing the database. */
function stateDbCheck(p: Paths): Check {
  const path = stateDbPath(p);
  const health = checkState(p);
  if (health.status === "missing")
    return { name: "state db", status: "ok", detail: `${path} not created yet` };
  if (health.status === "ok") return { name: "state db", status: "ok", detail: `${path}: ${health.detail}` };
  return {
    name: "state db",
    status: "fail",
    detail: `${path} is unusable: ${health.problem}`,
    fix: STATE_RECOVER_HINT.replace(/\s*\n\s*/g, " "),
  };
}

export async function runChecks(p: Paths): Promise<Check[]> {
  const checks: Array<Promise<Check>> = [
    safe("platform", async () => {
      const ok = platform() === "linux" && arch() === "x64";
      return {
        name: "platform",
        status: ok ? "ok" : "fail",
        detail: `${platform()}/${arch()}`,
        fix: "matchlock runs on x86-64 Linux",
      };
    }),
    safe("node", async () => ({
      name: "node",
      status: nodeSupported(process.versions.node) ? "ok" : "fail",
      detail: `v${process.versions.node}`,
      fix: `use Node.js ${NODE_ENGINES} (in a checkout, npm ci installs Node 24 in node_modules/.bin; run through npx or npm run)`,
    })),
    safe("packages", async () => {
      const missing = await missingPackages();
      return {
        name: "packages",
        status: missing.length === 0 ? "ok" : "fail",
        detail:
          missing.length === 0
            ? `${HOST_PACKAGES.map((h) => h.name).join(", ")}`
            : `missing ${missing.map((m) => `${m.name} (${m.why})`).join("; ")}`,
        fix: `${SETUP_FIX} (or apt-get install -y ${missing.map((m) => m.name).join(" ")})`,
      };
    }),
    safe("qemu", async () => {
      if (!(await hasCommand("qemu-system-x86_64"))) {
        return {
          name: "qemu",
          status: "fail",
          detail: "qemu-system-x86_64 not found",
          fix: "apt-get install qemu-system-x86",
        };
      }
      const m = (await runCommand("qemu-system-x86_64", ["-machine", "help"])).stdout.toString();
      const v =
        (await runCommand("qemu-system-x86_64", ["--version"])).stdout.toString().split("\n")[0] ?? "";
      return {
        name: "qemu",
        status: /^microvm\s/m.test(m) ? "ok" : "fail",
        detail: /^microvm\s/m.test(m)
          ? `${v.trim()}, microvm available`
          : `${v.trim()} has no microvm machine`,
        fix: "apt-get install qemu-system-x86 (7.2 or newer)",
      };
    }),
    safe("kvm", async () => {
      const accel = await readJson<{ accel: string; reason: string }>(join(p.cache, "accel.json"));
      if (!existsSync("/dev/kvm")) {
        return {
          name: "kvm",
          status: "warn",
          detail: "no /dev/kvm: VMs run under TCG (software emulation, slower boots)",
          fix: "enable virtualisation (VT-x/AMD-V) or nested virtualisation for this host",
        };
      }
      if (!(await kvmUsable())) {
        return {
          name: "kvm",
          status: "warn",
          detail: "/dev/kvm is not accessible: TCG will be used",
          fix: "run as root or join the kvm group",
        };
      }
      if (!accel)
        return { name: "kvm", status: "warn", detail: "/dev/kvm present, not probed yet", fix: SETUP_FIX };
      return {
        name: "kvm",
        status: accel.accel === "kvm" ? "ok" : "warn",
        detail: `${accel.accel} selected: ${accel.reason}`,
        fix: "force with MATCHLOCK_ACCEL=kvm|tcg; delete ~/.cache/matchlock/accel.json to probe again",
      };
    }),
    safe("kernel", async () => {
      const k = await loadKernel(p);
      return {
        name: "kernel",
        status: "ok",
        detail: `${k.version} (${k.modules.length} modules)`,
        fix: SETUP_FIX,
      };
    }),
    safe("guest agent", async () => {
      const ok = existsSync(agentBinaryPath(p)) && existsSync(initramfsPath(p));
      return {
        name: "guest agent",
        status: ok ? "ok" : "fail",
        detail: ok ? "agent and initramfs built" : "not built",
        fix: SETUP_FIX,
      };
    }),
    safe("default image", async () => {
      const img = await loadDefaultImage(p);
      return {
        name: "default image",
        status: img ? "ok" : "fail",
        detail: img ? DEFAULT_IMAGE : `${DEFAULT_IMAGE} is not built`,
        fix: SETUP_FIX,
      };
    }),
    safe("network: TAP", async () => {
      const tap = `fc-diag${randomBytes(2).toString("hex")}`;
      const r = await runCommand("ip", ["tuntap", "add", "dev", tap, "mode", "tap"], { allowFailure: true });
      if (r.code === 0) await runCommand("ip", ["link", "delete", "dev", tap], { allowFailure: true });
      return {
        name: "network: TAP",
        status: r.code === 0 ? "ok" : "fail",
        detail: r.code === 0 ? "a TAP device can be created" : `ip tuntap add failed: ${r.stderr.trim()}`,
        fix: "run as root (CAP_NET_ADMIN) with /dev/net/tun present (modprobe tun), or use --no-network",
      };
    }),
    safe("network: nftables", async () => {
      const spec = {
        tap: "fc-diag0000",
        gateway: "10.99.255.1",
        guest: "10.99.255.2",
        prefixLength: 24,
        mtu: 1500,
        owner: { pid: process.pid, start_time: 0 },
      };
      // -c: the kernel checks the transaction without applying it.
      const text = ruleset(spec, { dnsUdp: 1, dnsTcp: 2, tcp: 3 });
      const r = await runCommand("nft", ["-c", "-f", "-"], { input: text, allowFailure: true });
      return {
        name: "network: nftables",
        status: r.code === 0 ? "ok" : "fail",
        detail:
          r.code === 0 ? "a VM's table is accepted (inet family, nat and filter hooks)" : r.stderr.trim(),
        fix: "apt-get install nftables, run as root, and load nf_tables/nft_nat (modprobe nft_nat)",
      };
    }),
    safe("network: host firewall", async () => {
      const chains = await droppingInputChains();
      const c = chains[0];
      return {
        name: "network: host firewall",
        status: c ? "warn" : "ok",
        detail: c
          ? `input chain ${c.family} ${c.table} ${c.name} drops by default: guest traffic sent to matchlock on the gateway is dropped unless it accepts it`
          : "no input chain drops by default",
        ...(c ? { fix: `nft insert rule ${c.family} ${c.table} ${c.name} iifname "fc-*" accept` } : {}),
      };
    }),
    safe("state dir", async () => {
      await mkdir(p.home, { recursive: true, mode: 0o700 });
      await access(p.home, constants.W_OK);
      return { name: "state dir", status: "ok", detail: `${p.home} writable` };
    }),
    safe("state db", async () => stateDbCheck(p)),
    safe("disk space", async () => {
      await mkdir(p.cache, { recursive: true });
      const s = await statfs(p.cache);
      const free = (s.bavail * s.bsize) / 2 ** 30;
      return {
        name: "disk space",
        status: free >= 2 ? "ok" : free >= 0.5 ? "warn" : "fail",
        detail: `${free.toFixed(1)} GiB free under ${p.cache}`,
        fix: "free disk space: each VM's upper disk grows as the guest writes",
      };
    }),
  ];
  const results = await Promise.all(checks);
  for (const r of results) if (r.status !== "ok" && !r.fix) r.fix = SETUP_FIX;
  return results;
}
