import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { MatchlockError } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { runCommand } from "../host/command.ts";
import { readJson, writeFileAtomic } from "../host/fsutil.ts";

/** Builds the static guest agent (guest/agent/*.c) with the host C compiler. */

/** guest/agent in the package: the same relative place from src/guest and dist/guest. */
export const AGENT_SOURCE_DIR = fileURLToPath(new URL("../../guest/agent/", import.meta.url));
/**
 * One static binary from every .c file of guest/agent (each includes agent.h and the generated
 * protocol.h). Zero warnings expected: test/unit/agent-c.test.ts compiles with -Werror.
 */
export const AGENT_CFLAGS = ["-static", "-Os", "-s", "-Wall", "-Wextra"];
const CFLAGS = [...AGENT_CFLAGS, "-o"];

export function agentBinaryPath(p: Paths): string {
  return join(p.guest, "matchlock-agent");
}

/** The build's cache key: the flags and every .c and .h file of `dir` (a test changes each in turn). */
export async function agentSourceHash(dir = AGENT_SOURCE_DIR): Promise<{ hash: string; sources: string[] }> {
  const sources = (await readdir(dir)).filter((f) => f.endsWith(".c") || f.endsWith(".h")).sort();
  if (!sources.some((f) => f.endsWith(".c"))) {
    throw new MatchlockError("SETUP_FAILED", `no guest agent sources in ${dir}`);
  }
  const h = createHash("sha256").update(CFLAGS.join(" "));
  // every source file, by name and content (length-prefixed: no two file sets hash alike)
  for (const f of sources) {
    const data = await readFile(join(dir, f));
    h.update(`\0${f}\0${data.length}\0`).update(data);
  }
  return { hash: h.digest("hex"), sources };
}

/** Compiles the agent unless a binary of the same sources exists. */
export async function buildAgent(p: Paths, log: (line: string) => void): Promise<"built" | "cached"> {
  const out = agentBinaryPath(p);
  const stampPath = `${out}.json`;
  const { hash, sources } = await agentSourceHash();
  const stamp = await readJson<{ hash: string }>(stampPath);
  if (stamp?.hash === hash && existsSync(out)) return "cached";
  await mkdir(p.guest, { recursive: true });
  log("compiling the guest agent (cc -static)");
  const tmp = `${out}.tmp-${process.pid}`;
  const cc = process.env.CC ?? "cc";
  try {
    await runCommand(cc, [...CFLAGS, tmp, ...sources.filter((f) => f.endsWith(".c"))], {
      cwd: AGENT_SOURCE_DIR,
    });
    await rename(tmp, out);
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
  await writeFileAtomic(stampPath, `${JSON.stringify({ hash })}\n`);
  return "built";
}
