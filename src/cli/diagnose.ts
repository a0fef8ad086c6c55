import type { Command } from "commander";
import { paths } from "../api/paths.ts";
import type { Status } from "./diagnose-checks.ts";

/** `matchlock diagnose`: every prerequisite with ✓/⚠/✗ and a fix line; exit 1 if any is ✗. */

const MARK: Record<Status, string> = { ok: "✓", warn: "⚠", fail: "✗" };

export function registerDiagnose(program: Command): void {
  program
    .command("diagnose")
    .summary("check every prerequisite and say how to fix what is missing")
    .option("--json", "print the checks as JSON")
    .action(async (flags: { json?: boolean }) => {
      const { runChecks } = await import("./diagnose-checks.ts"); // state.db, images: not for --help
      const checks = await runChecks(paths());
      if (flags.json) process.stdout.write(`${JSON.stringify({ checks }, null, 2)}\n`);
      else {
        for (const c of checks) {
          process.stdout.write(`${MARK[c.status]} ${c.name}: ${c.detail}\n`);
          if (c.fix && c.status !== "ok") process.stdout.write(`    fix: ${c.fix}\n`);
        }
        const failed = checks.filter((c) => c.status === "fail").length;
        const warned = checks.filter((c) => c.status === "warn").length;
        process.stdout.write(
          `\n${failed} failed, ${warned} warnings, ${checks.length - failed - warned} ok\n`,
        );
      }
      if (checks.some((c) => c.status === "fail")) process.exitCode = 1;
    });
}
