import { join } from "node:path";
import type { Command } from "commander";
import { type Paths, paths } from "../api/paths.ts";
import type { Accel } from "../vm/backend.ts";

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
        "build the static guest agent and the initramfs, build the default image, probe the accelerator, and\n" +
        "save the default image's snapshot (fast starts).\n" +
        "Files land under ~/.cache/matchlock (MATCHLOCK_CACHE moves it). Run it as root. Safe to run again:\n" +
        "steps that are done are skipped.",
    )
    .option("--skip-packages", "do not check or install Debian packages")
    .action(async (flags: { skipPackages?: boolean }) => {
      await setup(flags.skipPackages === true);
    });
}

/** The default image's snapshot, so that the first `run` is already a fast one. */
async function buildDefaultSnapshot(p: Paths, accel: Accel, vmlinux: string): Promise<string> {
  const [
    { parseSandboxConfig },
    { loadInitramfs },
    { loadDefaultImage, DEFAULT_IMAGE },
    snapshots,
    { openState },
  ] = await Promise.all([
    import("../api/config.ts"),
    import("../guest/initramfs.ts"),
    import("../image/default-image.ts"),
    import("../sandbox/snapshots.ts"),
    import("../state/store.ts"),
  ]);
  const { findOrBuildTemplate, snapshotMaxBytes, templateInputs, variantOf } = snapshots;
  const { QemuBackend } = await import("../vm/qemu/machine.ts");
  const image = await loadDefaultImage(p);
  if (!image) return "skipped: no default image";
  const state = openState(p);
  try {
    const found = await findOrBuildTemplate(
      p,
      state,
      await templateInputs(
        { cacheDir: p.cache, kernel: vmlinux, initramfs: await loadInitramfs(p), image, accel },
        variantOf(parseSandboxConfig({})),
      ),
      {
        backend: new QemuBackend({ cacheDir: p.cache }),
        bootTimeoutMs: 120_000,
        progress: () => {},
        maxBytes: snapshotMaxBytes(),
      },
    );
    if (!found.template) return `not built (${found.reason}); runs boot cold until one is`;
    return `${DEFAULT_IMAGE} ${found.template.key} (${found.built ? "built" : "ok"})`;
  } finally {
    state.close();
  }
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

  const snap = await buildDefaultSnapshot(p, accel.accel, kernel.vmlinux);
  step("snapshot", snap);

  const secs = ((Date.now() - started) / 1000).toFixed(1);
  process.stderr.write(`ready in ${secs} s. Try: matchlock run -- echo hello\n`);
}
