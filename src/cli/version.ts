import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { Command } from "commander";

const pkgRoot = fileURLToPath(new URL("../../", import.meta.url));

export const VERSION: string = (
  JSON.parse(readFileSync(`${pkgRoot}package.json`, "utf8")) as { version: string }
).version;

function commit(): string {
  try {
    return execFileSync("git", ["-C", pkgRoot, "rev-parse", "--short", "HEAD"], {
      stdio: ["ignore", "pipe", "ignore"],
    })
      .toString()
      .trim();
  } catch {
    return "unknown";
  }
}

export function registerVersion(program: Command): void {
  program
    .command("version")
    .description("print the version and commit")
    .action(() => {
      process.stdout.write(`matchlock ${VERSION} (commit ${commit()})\n`);
    });
}
