import { join } from "node:path";
import type { Command } from "commander";
import { paths } from "../api/paths.ts";

/**
 * `matchlock setup`: everything a fresh Debian host needs to run a sandbox, idempotent. Each step
 * checks what exists and says "ok" without touching it; a second run changes nothing.
 */

export function registerSetup(program: Command): void {
  program
    .command("setup")
    .summary("provision this host: packages, kernel, guest agent, initramfs, default image")
    .description(
      "Install what matchlock needs (Debian packages with apt-get, the cloud kernel with apt-get download),\n" +
        "build the static guest agent and the initramfs, build the default image, and probe the accelerator.\n" +
        "Files land under ~/.cache/matchlock (MATCHLOCK_CACHE moves it). Run it as root. Safe to run again:\n" +
        "steps that are done are skipped.",
    )
    .option("--skip-packages", "do not check or install Debian packages")
    .action(async (flags: { skipPackages?: boolean }) => {
      await setup(flags.skipPackages === true);
    });
}

function step(name: string, state: string): void {
  process.stderr.write(`  ✓ ${name.padEnd(22)} ${state}\n`);
}

async function setup(skipPackages: boolean): Promise<void> {
  // Loaded when setup runs, not for `matchlock --help`.
  const [
    { buildAgent },
    { buildInitramfs },
    { installKernel, loadKernel },
    packages,
    image,
    { chooseAccel },
  ] = await Promise.all([
    import("../guest/agent-build.ts"),
    import("../guest/initramfs.ts"),
    import("../guest/kernel.ts"),
    import("../host/packages.ts"),
    import("../image/default-image.ts"),
    import("../vm/qemu/accel.ts"),
  ]);
  const { aptInstall, missingPackages } = packages;
  const { buildDefaultImage, DEFAULT_IMAGE } = image;
  const p = paths();
  const log = (line: string) => process.stderr.write(`    … ${line}\n`);
  const started = Date.now();
  process.stderr.write(`matchlock setup (cache: ${p.cache})\n`);

  if (!skipPackages) {
    const missing = await missingPackages();
    if (missing.length > 0) {
      await aptInstall(
        missing.map((m) => m.name),
        log,
      );
      step("packages", `installed ${missing.map((m) => m.name).join(", ")}`);
    } else step("packages", "ok");
  }

  const kernelState = await installKernel(p, log);
  const kernel = await loadKernel(p, {});
  step("kernel", `${kernel.version} (${kernelState === "cached" ? "ok" : "installed"})`);

  const agentState = await buildAgent(p, log);
  step("guest agent", agentState === "cached" ? "ok" : "built");

  const initramfsState = await buildInitramfs(p, kernel);
  step("initramfs", initramfsState === "cached" ? "ok" : "built");

  const imageState = await buildDefaultImage(p, log);
  step("default image", `${DEFAULT_IMAGE} (${imageState === "cached" ? "ok" : "built"})`);

  const accel = await chooseAccel(
    join(p.cache, "accel.json"),
    { kernel: kernel.vmlinux, initramfs: join(p.guest, "initramfs.cpio") },
    undefined,
    { ...process.env, MATCHLOCK_ACCEL: "" },
  );
  step("accelerator", `${accel.accel}: ${accel.reason}`);

  const secs = ((Date.now() - started) / 1000).toFixed(1);
  process.stderr.write(`ready in ${secs} s. Try: matchlock run -- echo hello\n`);
}
