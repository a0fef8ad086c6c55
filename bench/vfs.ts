/**
 * bench/vfs: what the FUSE server costs, without a VM.
 *   - In process: FuseServer.handle for LOOKUP, GETATTR, 4 KiB READ and WRITE, and a
 *     CREATE+RELEASE+UNLINK cycle, on the memory and host_fs providers, p50/p99 in µs.
 *   - Through the host kernel (/dev/fuse, needs root): `cp -r` and `tar c` of a generated tree
 *     (2000 files of 4 KiB in 20 directories) into / out of a host_fs mount, against the same on the
 *     plain host folder; the ratio. The harness reads /dev/fuse through libuv's thread pool, so this
 *     is a floor for the server, not the VM path.
 * Usage: node bench/vfs.ts [--runs N]
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
import { Op } from "../src/vfs/fuse-abi.ts";
import { HostFsProvider } from "../src/vfs/host-fs.ts";
import { MemoryProvider } from "../src/vfs/memory.ts";
import type { Provider } from "../src/vfs/provider.ts";
import { FuseServer } from "../src/vfs/server.ts";
import { cstr, FakeKernel, u32, u64 } from "../test/helpers/fuse-client.ts";
import { mountInChild } from "../test/helpers/host-fuse.ts";

const runsArg = process.argv.indexOf("--runs");
const RUNS = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 5000;

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? Number.NaN;
}

async function timed(label: string, fn: () => Promise<unknown>): Promise<void> {
  for (let i = 0; i < 200; i++) await fn();
  const us: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const t = performance.now();
    await fn();
    us.push((performance.now() - t) * 1000);
  }
  console.log(
    `  ${label.padEnd(34)} p50 ${pct(us, 50).toFixed(1).padStart(7)} µs   p99 ${pct(us, 99).toFixed(1).padStart(7)} µs`,
  );
}

async function inProcess(name: string, provider: Provider): Promise<void> {
  console.log(`${name} (in process, ${RUNS} requests each)`);
  const k = new FakeKernel(new FuseServer({ provider, log: () => {} }));
  await k.init();
  await k.mkdir(1n, "d");
  const d = await k.lookup(1n, "d");
  const c = await k.create(d.nodeid, "f", 2, 0o644);
  await k.write(c.fh, 0, Buffer.alloc(65536, 1));
  const page = Buffer.alloc(4096, 2);
  await timed("LOOKUP (hit)", () => k.call(Op.LOOKUP, d.nodeid, cstr("f")));
  await timed("GETATTR", () => k.call(Op.GETATTR, d.nodeid, Buffer.concat([u32(0), u32(0), u64(0)])));
  await timed("READ 4 KiB", () => k.read(c.fh, 8192, 4096));
  await timed("WRITE 4 KiB", () => k.write(c.fh, 8192, page));
  let i = 0;
  await timed("CREATE + RELEASE + UNLINK", async () => {
    const n = `t${i++}`;
    const r = await k.create(d.nodeid, n, 2, 0o644);
    await k.release(r.fh);
    await k.unlink(d.nodeid, n);
  });
  await k.release(c.fh);
}

function seconds(fn: () => void): number {
  const t = performance.now();
  fn();
  return (performance.now() - t) / 1000;
}

async function throughKernel(work: string): Promise<void> {
  if (process.getuid?.() !== 0 || !existsSync("/dev/fuse")) {
    console.log("through the kernel: skipped (needs root and /dev/fuse)");
    return;
  }
  const src = join(work, "src");
  for (let d = 0; d < 20; d++) {
    mkdirSync(join(src, `d${d}`), { recursive: true });
    for (let f = 0; f < 100; f++) writeFileSync(join(src, `d${d}`, `f${f}`), Buffer.alloc(4096, f));
  }
  const plain = join(work, "plain");
  const host = join(work, "host");
  const mnt = join(work, "mnt");
  for (const d of [plain, host, mnt]) mkdirSync(d);
  const sh = (cmd: string) => execFileSync("sh", ["-c", cmd], { stdio: "ignore" });
  const native = {
    cp: seconds(() => sh(`cp -r ${src} ${plain}/t`)),
    tar: seconds(() => sh(`tar cf - -C ${plain} t | cat >/dev/null`)),
  };
  const m = await mountInChild({ kind: "host_fs", root: host }, mnt);
  let fuse: { cp: number; tar: number };
  try {
    fuse = {
      cp: seconds(() => sh(`cp -r ${src} ${mnt}/t`)),
      tar: seconds(() => sh(`tar cf - -C ${mnt} t | cat >/dev/null`)),
    };
  } finally {
    await m.stop();
  }
  console.log("through the host kernel (2000 files × 4 KiB)");
  for (const k of ["cp", "tar"] as const) {
    const what = k === "cp" ? "cp -r into the mount" : "tar c out of the mount";
    console.log(
      `  ${what.padEnd(34)} ${fuse[k].toFixed(2)} s vs ${native[k].toFixed(2)} s native (×${(fuse[k] / native[k]).toFixed(1)})`,
    );
  }
}

async function main(): Promise<void> {
  console.log(`bench/vfs on ${cpus().length} × ${cpus()[0]?.model ?? "?"}`);
  const work = mkdtempSync("/tmp/matchlock-bench-vfs-");
  try {
    await inProcess("memory", new MemoryProvider());
    mkdirSync(join(work, "inproc"));
    await inProcess("host_fs", new HostFsProvider(join(work, "inproc")));
    await throughKernel(work);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

await main();
