import type { Command } from "commander";
import type { OverlayChange } from "../sandbox/overlay-changes.ts";
import { collect } from "./parse.ts";

/**
 * `matchlock diff ID` and `matchlock apply ID`: review what a VM changed in its overlay mounts and
 * write chosen changes back to the host folders (src/sandbox/overlay-changes.ts). Both read the VM
 * dir, so they work on a running VM and on a stopped one kept with --rm=false.
 */

const MARK: Record<OverlayChange["kind"], string> = { added: "A", modified: "M", deleted: "D" };

/** What the commands run on, loaded when one runs (state.db, the diff library): not for --help. */
async function load() {
  const [{ locateVm }, changes] = await Promise.all([
    import("./vm-records.ts"),
    import("../sandbox/overlay-changes.ts"),
  ]);
  return { locateVm, ...changes };
}

function line(c: OverlayChange): string {
  const type = c.type === "file" ? "" : ` (${c.type})`;
  const conflict = c.conflict ? `   ! ${c.conflict}` : "";
  return `${MARK[c.kind]} ${c.guestPath}${type}${conflict}`;
}

export function registerChangeCommands(program: Command): void {
  program
    .command("diff")
    .summary("show what a VM changed in its overlay mounts")
    .description(
      "List what the guest added (A), modified (M) and deleted (D) in its overlay mounts (-v HOST:GUEST,\n" +
        "the default mode), with a unified diff of each changed text file. A change marked ! would\n" +
        "overwrite a host file that changed since the guest first touched it; `matchlock apply` skips\n" +
        "those unless --force. Works on running VMs and on stopped ones kept with --rm=false.",
    )
    .argument("<id>", "the VM")
    .option("--path <path>", "only changes at or under this guest or host path (repeatable)", collect, [])
    .option("--name-only", "the list without the text diffs")
    .option("--json", "one JSON array of changes")
    .action(async (id: string, flags: { path: string[]; nameOnly?: boolean; json?: boolean }) => {
      const { locateVm, overlayChanges, selected, textDiff } = await load();
      const { dir } = await locateVm(id);
      const changes = (await overlayChanges(dir)).filter((c) => selected(c, flags.path));
      if (flags.json) {
        process.stdout.write(`${JSON.stringify(changes, null, 2)}\n`);
        return;
      }
      if (changes.length === 0) {
        process.stderr.write("no changes in overlay mounts\n");
        return;
      }
      for (const c of changes) process.stdout.write(`${line(c)}\n`);
      if (flags.nameOnly) return;
      for (const c of changes) {
        const patch = await textDiff(c);
        if (patch) process.stdout.write(`\n${patch}`);
      }
    });

  program
    .command("apply")
    .summary("write a VM's overlay changes back to the host folders")
    .description(
      "Write what the guest changed in its overlay mounts back to the host: each file atomically\n" +
        "(a temporary file, then rename) with its mode; deletions too. A host file that changed since\n" +
        "the guest first touched it is skipped unless --force, and nothing is written through a symlink\n" +
        "on the host. Exit code 1 if any selected change was not applied.",
    )
    .argument("<id>", "the VM")
    .option("--path <path>", "only changes at or under this guest or host path (repeatable)", collect, [])
    .option("--force", "overwrite host files that changed since the guest first touched them")
    .option("--dry-run", "say what would be applied, change nothing")
    .action(async (id: string, flags: { path: string[]; force?: boolean; dryRun?: boolean }) => {
      const { locateVm, applyOverlayChanges } = await load();
      const { dir } = await locateVm(id);
      const results = await applyOverlayChanges(dir, {
        paths: flags.path,
        ...(flags.force ? { force: true } : {}),
        ...(flags.dryRun ? { dryRun: true } : {}),
      });
      if (results.length === 0) process.stderr.write("no changes to apply\n");
      let failed = 0;
      for (const r of results) {
        const c = r.change;
        if (r.applied) process.stdout.write(`applied ${MARK[c.kind]} ${c.hostPath}\n`);
        else {
          if (!flags.dryRun) failed++;
          process.stdout.write(
            `${flags.dryRun ? "would apply" : "skipped"} ${MARK[c.kind]} ${c.hostPath}${flags.dryRun && !c.conflict ? "" : `: ${r.reason}`}\n`,
          );
        }
      }
      if (failed > 0) process.exitCode = 1;
    });
}
