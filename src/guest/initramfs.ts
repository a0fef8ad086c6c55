import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile, rm, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { MatchlockError, NotSetUpError } from "../api/errors.ts";
import type { Paths } from "../api/paths.ts";
import { runCommand } from "../host/command.ts";
import { readJson, scratchDir, writeFileAtomic } from "../host/fsutil.ts";
import { agentBinaryPath } from "./agent-build.ts";
import { buildCpio, type CpioEntry } from "./cpio.ts";
import type { KernelInfo } from "./kernel.ts";

/**
 * The initramfs: the agent as /init plus the kernel modules it loads. Uncompressed on purpose: under
 * TCG the guest would spend longer decompressing than QEMU spends copying.
 *
 * The modules go in stripped (stripModule): loading them is ~20 % faster under TCG.
 */

/**
 * Part of the stamp's hash beside the agent and the modules: change it when the same inputs make a
 * different initramfs, so that every cache built the old way is rebuilt. 2: modules stripped.
 */
const INITRAMFS_FORMAT = "2";

/** What ends a signed module (the kernel's MODULE_SIG_STRING). */
const MODULE_SIG_MAGIC = Buffer.from("~Module signature appended~\n", "latin1");
/** struct module_signature: algo, hash, id_type, signer_len, key_id_len, 3 pad bytes, __be32 sig_len. */
const MODULE_SIG_INFO_BYTES = 12;

/**
 * A module without its appended signature, the way the kernel finds it: the magic at the very end,
 * the 12-byte module_signature before it, whose last 4 bytes (big-endian) are the length of the
 * signature before that. An unsigned module comes back as it is.
 */
export function withoutSignature(ko: Buffer): Buffer {
  const end = ko.length - MODULE_SIG_MAGIC.length;
  if (end < MODULE_SIG_INFO_BYTES || !ko.subarray(end).equals(MODULE_SIG_MAGIC)) return ko;
  const start = end - MODULE_SIG_INFO_BYTES - ko.readUInt32BE(end - 4);
  if (start <= 0) throw new MatchlockError("SETUP_FAILED", "a kernel module has a malformed signature");
  return ko.subarray(0, start);
}

/**
 * A module as the guest loads it fastest: without its signature (the guest kernel enforces none: it
 * would hash and verify it under TCG on every boot, then taints itself "module verification failed",
 * harmlessly) and without `.BTF`/`.BTF.ext` (BPF type info the kernel would parse at load; the guest
 * runs no BPF). The perf study measured the 7 boot modules' load at 190 → 154 ms.
 */
export async function stripModule(ko: Buffer, scratch: string, name: string): Promise<Buffer> {
  const input = join(scratch, `${name}.in`);
  const output = join(scratch, `${name}.out`);
  await writeFile(input, withoutSignature(ko));
  // objcopy (binutils, which gcc needs anyway) rewrites the ELF; naming an absent section is no error.
  await runCommand("objcopy", ["--remove-section=.BTF", "--remove-section=.BTF.ext", input, output]);
  const out = await readFile(output);
  await rm(input, { force: true });
  await rm(output, { force: true });
  return out;
}

export function initramfsPath(p: Paths): string {
  return join(p.guest, "initramfs.cpio");
}

export async function buildInitramfs(p: Paths, kernel: KernelInfo): Promise<"built" | "cached"> {
  const out = initramfsPath(p);
  const agentPath = agentBinaryPath(p);
  if (!existsSync(agentPath)) throw new NotSetUpError("the guest agent is not built");
  const agent = await readFile(agentPath);
  const modules = await Promise.all(
    kernel.modules.map(
      async (m): Promise<{ name: string; data: Buffer }> => ({
        name: basename(m),
        data: await readFile(m),
      }),
    ),
  );
  const h = createHash("sha256").update(INITRAMFS_FORMAT).update(agent);
  for (const m of modules) h.update(m.name).update(m.data);
  const hash = h.digest("hex");
  const stamp = await readJson<{ hash: string }>(`${out}.json`);
  if (stamp?.hash === hash && existsSync(out)) return "cached";

  const scratch = await scratchDir(p.guest, "initramfs");
  try {
    for (const m of modules) m.data = await stripModule(m.data, scratch, m.name);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }

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
