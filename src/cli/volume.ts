import type { Command } from "commander";
import { paths } from "../api/paths.ts";
import { positiveInt } from "./parse.ts";
import { table } from "./table.ts";

/** `matchlock volume create|ls|rm`: named ext4 volumes that outlive VMs (`run --disk @NAME:/path`). */

const DEFAULT_VOLUME_MB = 1024;

/** The volumes and state.db, loaded when a command runs: `matchlock --help` never opens SQLite. */
async function load() {
  const [volumes, { openState }] = await Promise.all([
    import("../sandbox/volumes.ts"),
    import("../state/store.ts"),
  ]);
  return { ...volumes, openState };
}
export function registerVolumeCommands(program: Command): void {
  const volume = program
    .command("volume")
    .summary("named disks that outlive VMs")
    .description(
      "Named ext4 volumes in ~/.matchlock/volumes, sparse (they take host disk space as they fill); `gc`\n" +
        "and `prune` never touch them.\n" +
        "Attach one with `matchlock run --disk @NAME:/guest/path[:ro]`; what the guest writes there stays\n" +
        "for the next VM. QEMU refuses a second VM writing a volume that one already has.",
    );
  volume
    .command("create")
    .summary("create an empty volume")
    .argument("<name>", "letters, digits, '.', '_' and '-'")
    .option("--size <MB>", "size in MB (sparse)", positiveInt, DEFAULT_VOLUME_MB)
    .action(async (name: string, flags: { size: number }) => {
      const { createVolume } = await load();
      const path = await createVolume(name, flags.size, paths());
      process.stdout.write(`${path}\n`);
    });
  volume
    .command("ls")
    .summary("list volumes")
    .option("--json", "one JSON array")
    .action(async (flags: { json?: boolean }) => {
      const { listVolumes } = await load();
      const vols = await listVolumes(paths());
      if (flags.json) {
        process.stdout.write(`${JSON.stringify(vols, null, 2)}\n`);
        return;
      }
      const rows = vols.map((v) => [
        v.name,
        `${v.size_mb} MB`,
        `${(v.used_bytes / 1024 / 1024).toFixed(1)} MB`,
        v.path,
      ]);
      process.stdout.write(`${table([["NAME", "SIZE", "USED", "PATH"], ...rows])}\n`);
    });
  volume
    .command("cp")
    .summary("copy a volume into a new one")
    .argument("<src>", "an existing volume")
    .argument("<dst>", "the new volume's name")
    .action(async (src: string, dst: string) => {
      const { copyVolume, openState } = await load();
      const p = paths();
      const s = openState(p);
      try {
        process.stdout.write(`${await copyVolume(src, dst, p, s)}\n`);
      } finally {
        s.close();
      }
    });
  volume
    .command("rm")
    .summary("remove volumes no running VM has")
    .argument("<names...>")
    .action(async (names: string[]) => {
      const { removeVolume, openState } = await load();
      const p = paths();
      const s = openState(p);
      try {
        for (const name of names) await removeVolume(name, p, s);
      } finally {
        s.close();
      }
    });
}
