/**
 * bench/image: image import throughput (MB/s of layer data, medians of runs) and the time from
 * `run --image` to the first output line for a freshly imported image (import included) vs the same
 * image already in the store, measured alternately in one run. Uses the Debian layer that
 * test/helpers/debian.ts caches in ~/.cache/matchlock-test (the first found) when present, else a
 * synthetic layer of many small files plus busybox.
 * Usage: npm run build && node bench/image.ts [--runs N]
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { busyboxLayer, dockerSave, type Entry, makeTar } from "../test/helpers/images.ts";

const runsArg = process.argv.indexOf("--runs");
const RUNS = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 5;
const CLI = fileURLToPath(new URL("../dist/cli/main.js", import.meta.url));

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)] ?? Number.NaN;
}

function cli(
  args: string[],
  env: NodeJS.ProcessEnv,
): Promise<{ ms: number; firstLineMs: number; code: number | null }> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [CLI, ...args], { env, stdio: ["ignore", "pipe", "ignore"] });
    let first = Number.NaN;
    c.stdout.on("data", () => {
      if (Number.isNaN(first)) first = performance.now() - t0;
    });
    c.on("close", (code) => resolve({ ms: performance.now() - t0, firstLineMs: first, code }));
  });
}

async function layer(): Promise<{ name: string; data: Buffer }> {
  const cache = join(homedir(), ".cache", "matchlock-test");
  const deb = existsSync(cache)
    ? readdirSync(cache).find((f) => f.startsWith("debian-bookworm") && f.endsWith(".tar"))
    : undefined;
  if (deb) return { name: `debian layer (${deb})`, data: readFileSync(join(cache, deb)) };
  const files: Entry[] = [{ name: "data/", type: "directory" }];
  for (let i = 0; i < 5000; i++) files.push({ name: `data/f${i}`, content: Buffer.alloc(8192, i % 251) });
  return { name: "synthetic: 5000 × 8 KiB files", data: await makeTar(files) };
}

async function main(): Promise<void> {
  const home = mkdtempSync(join(tmpdir(), "matchlock-bench-image-"));
  const env = { ...process.env, MATCHLOCK_HOME: home };
  const l = await layer();
  const base = await busyboxLayer();
  const archivePath = join(home, "image.tar");
  const mb = (l.data.length + base.length) / 1e6;
  console.log(
    `bench/image on ${cpus().length} × ${cpus()[0]?.model ?? "?"}: ${l.name}, ${mb.toFixed(1)} MB of layers, ${RUNS} runs`,
  );

  const importMs: number[] = [];
  const freshFirst: number[] = [];
  const cachedFirst: number[] = [];
  try {
    const cachedTag = `bench-cached-${process.pid}:1`;
    writeFileSync(
      archivePath,
      await dockerSave({ layers: [base, l.data], config: { Cmd: ["/bin/echo", "first"] } }),
    );
    await cli(["image", "import", cachedTag, "-i", archivePath], env);
    for (let i = 0; i < RUNS; i++) {
      // A new image each round: a marker layer changes the digest, so nothing is reused but blobs.
      const marker = await makeTar([{ name: `marker-${i}-${Date.now()}`, content: "x" }]);
      writeFileSync(
        archivePath,
        await dockerSave({ layers: [base, l.data, marker], config: { Cmd: ["/bin/echo", "first"] } }),
      );
      const tag = `bench-new-${process.pid}-${i}:1`;
      const imp = await cli(["image", "import", tag, "-i", archivePath], env);
      if (imp.code !== 0) throw new Error("import failed");
      importMs.push(imp.ms);
      const fresh = await cli(["run", "--image", tag], env);
      freshFirst.push(imp.ms + fresh.firstLineMs);
      cachedFirst.push((await cli(["run", "--image", cachedTag], env)).firstLineMs);
      await cli(["image", "rm", tag], env);
    }
    await cli(["image", "rm", cachedTag], env);
    await cli(["image", "gc"], env);
    const m = median(importMs);
    console.log(
      `import (rootfs build included)       median ${(m / 1000).toFixed(2)} s   ${(mb / (m / 1000)).toFixed(1)} MB/s of layer data`,
    );
    console.log(`new image: import + run to 1st line  median ${(median(freshFirst) / 1000).toFixed(2)} s`);
    console.log(`cached image: run to 1st line        median ${(median(cachedFirst) / 1000).toFixed(2)} s`);
    console.log(
      `ratio new / cached                   ${(median(freshFirst) / median(cachedFirst)).toFixed(2)}`,
    );
  } finally {
    rmSync(home, { recursive: true, force: true });
  }
}

await main();
