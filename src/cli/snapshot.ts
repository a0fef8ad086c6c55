import type { Command } from "commander";
import { InvalidArgumentError } from "../api/errors.ts";
import type { TemplateRow } from "../state/snapshots.ts";
import { table } from "./table.ts";

/**
 * `matchlock snapshot ls|rm|gc`: the snapshot templates that make starts fast. Their work is loaded
 * when one runs: `matchlock --help` never opens SQLite.
 */
const load = async () => {
  const [snapshots, records] = await Promise.all([
    import("../sandbox/snapshots.ts"),
    import("./vm-records.ts"),
  ]);
  return { ...snapshots, withState: records.withState };
};

function describe(row: TemplateRow, isStale: (r: TemplateRow) => boolean): Record<string, unknown> {
  const i = JSON.parse(row.inputs_json) as {
    memoryMb?: number;
    cpus?: number;
    diskMb?: number;
    nic?: boolean;
    vfs?: boolean;
  };
  return {
    key: row.key,
    image: row.image,
    status: row.status === "ready" && isStale(row) ? "stale" : row.status,
    memory_mb: i.memoryMb,
    cpus: i.cpus,
    disk_size_mb: i.diskMb,
    network: i.nic,
    host_folders: i.vfs,
    bytes: row.bytes,
    created_at: row.created_at,
    last_used_at: row.last_used_at,
    dir: row.dir,
  };
}

export function registerSnapshotCommands(program: Command): void {
  const snapshot = program
    .command("snapshot")
    .summary("the snapshots that make starts fast")
    .description(
      "A snapshot is a VM booted once to an idle agent and saved (RAM file, device state, writable disk) in\n" +
        "~/.matchlock/snapshots. `run`, RPC `create` and the SDK restore a copy of it instead of booting, one\n" +
        "per image, memory, CPUs, disk size, network or not, folders or not. It is built on first use (and by\n" +
        "`setup` for the default image), and stale once the kernel, agent, image or QEMU changes (or a new\n" +
        "matchlock saves them another way): a new one is built then, and `snapshot gc` (or `gc`) removes the\n" +
        "old. Together they take at most\n" +
        "MATCHLOCK_SNAPSHOT_MAX_MB of disk (default 2048): a new one removes the least recently used first.",
    );
  snapshot
    .command("ls")
    .alias("list")
    .summary("list snapshots")
    .option("--json", "one JSON array")
    .action(async (flags: { json?: boolean }) => {
      const { withState, isStale, snapshotMaxBytes } = await load();
      await withState((s) => {
        const rows = s.snapshots.list().map((r) => describe(r, isStale));
        if (flags.json) {
          process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
          return;
        }
        const mb = (b: unknown) => `${((b as number) / 1024 / 1024).toFixed(1)} MB`;
        const lines = rows.map((r) => [
          String(r.key),
          String(r.image),
          String(r.status),
          `${r.memory_mb} MB, ${r.cpus} cpu${r.network ? ", net" : ""}${r.host_folders ? ", folders" : ""}`,
          mb(r.bytes),
          String(r.last_used_at || r.created_at),
        ]);
        process.stdout.write(`${table([["KEY", "IMAGE", "STATUS", "VM", "SIZE", "LAST USED"], ...lines])}\n`);
        const total = rows.reduce((n, r) => n + Number(r.bytes ?? 0), 0);
        process.stdout.write(
          `${mb(total)} in all; cap ${mb(snapshotMaxBytes())} (MATCHLOCK_SNAPSHOT_MAX_MB)\n`,
        );
      });
    });
  snapshot
    .command("rm")
    .alias("remove")
    .summary("remove snapshots (running VMs restored from them are not affected)")
    .argument("[keys...]", "snapshot keys (from `snapshot ls`)")
    .option("--image <ref>", "every snapshot of this image")
    .option("--all", "every snapshot")
    .action(async (keys: string[], flags: { image?: string; all?: boolean }) => {
      if (keys.length === 0 && !flags.image && !flags.all)
        throw new InvalidArgumentError("name the snapshots to remove", "give keys, --image REF or --all");
      const { withState, removeTemplate } = await load();
      await withState(async (s) => {
        const rows = s.snapshots.list();
        const chosen = rows.filter(
          (r) => flags.all || keys.includes(r.key) || (flags.image !== undefined && r.image === flags.image),
        );
        const unknown = keys.filter((k) => !rows.some((r) => r.key === k));
        for (const r of chosen) {
          await removeTemplate(s, r);
          process.stdout.write(`${r.key}\n`);
        }
        if (unknown.length > 0) throw new InvalidArgumentError(`no snapshot ${unknown.join(", ")}`);
      });
    });
  snapshot
    .command("gc")
    .summary("remove stale snapshots and the remains of interrupted builds")
    .action(async () => {
      const { withState, sweepTemplates } = await load();
      await withState(async (s, p) => {
        for (const r of await sweepTemplates(s, p)) process.stdout.write(`${r.key}  removed  ${r.why}\n`);
      });
    });
}
