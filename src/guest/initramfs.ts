import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { NotSetUpError } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { readJson, writeFileAtomic } from "../host/fsutil.ts";
import { agentBinaryPath } from "./agent-build.ts";
import { buildCpio, type CpioEntry } from "./cpio.ts";
import type { KernelInfo } from "./kernel.ts";

/**
 * The initramfs: the agent as /init plus the kernel modules it loads. Uncompressed on purpose: under
 * TCG the guest would spend longer decompressing than QEMU spends copying.
 */

export function initramfsPath(p: Paths): string {
  return join(p.guest, "initramfs.cpio");
}

export async function buildInitramfs(p: Paths, kernel: KernelInfo): Promise<"built" | "cached"> {
  const out = initramfsPath(p);
  const agentPath = agentBinaryPath(p);
  if (!existsSync(agentPath)) throw new NotSetUpError("the guest agent is not built");
  const agent = await readFile(agentPath);
  const modules = await Promise.all(
    kernel.modules.map(async (m) => ({ name: basename(m), data: await readFile(m) })),
  );
  const h = createHash("sha256").update(agent);
  for (const m of modules) h.update(m.name).update(m.data);
  const hash = h.digest("hex");
  const stamp = await readJson<{ hash: string }>(`${out}.json`);
  if (stamp?.hash === hash && existsSync(out)) return "cached";

  const dir = (path: string): CpioEntry => ({ path, type: "dir", mode: 0o755 });
  const entries: CpioEntry[] = [
    dir("dev"),
    { path: "dev/console", type: "char", mode: 0o600, major: 5, minor: 1 },
    { path: "dev/null", type: "char", mode: 0o666, major: 1, minor: 3 },
    dir("proc"),
    dir("sys"),
    dir("mnt"),
    dir("mnt/lower"),
    dir("mnt/upperdisk"),
    dir("mnt/root"),
    dir("lib"),
    dir("lib/modules"),
    ...modules.map(
      (m): CpioEntry => ({ path: `lib/modules/${m.name}`, type: "file", mode: 0o644, data: m.data }),
    ),
    { path: "init", type: "file", mode: 0o755, data: agent },
  ];
  await writeFileAtomic(out, buildCpio(entries));
  await writeFileAtomic(`${out}.json`, `${JSON.stringify({ hash })}\n`);
  return "built";
}

export async function loadInitramfs(p: Paths): Promise<string> {
  const out = initramfsPath(p);
  if (!existsSync(out)) throw new NotSetUpError("the guest initramfs is not built");
  return out;
}
