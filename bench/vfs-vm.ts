/**
 * bench/vfs-vm: host folders in a real VM against the VM's own disk, in one run, alternating.
 * One VM (the Debian tools image of test/helpers/debian.ts, for git; no network) with a host_fs mount
 * and an overlay mount of fresh temp folders; each workload runs in the guest (as root) on the mount
 * and on the upper disk (/root), timed from the host around the exec (its ~15 ms round trip is
 * included on both sides), `--runs` times each:
 *   - write 64 MiB sequentially (dd, fsync), read it back with the guest's caches dropped (MB/s);
 *   - create 5,000 small files (a shell loop) and `ls -l` them;
 *   - `git status` in a repository of 2,000 files (made by the host's git, copied to the VM disk;
 *     one untimed status first, which refreshes the index the host wrote);
 *   - `find` over 10,000 entries.
 * Medians, and the ratio mount / VM disk (time: lower is better).
 * Usage: npm run bench:vfs-vm [-- --runs N]   (the first run builds the Debian image: ~2–3 min)
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { parseSandboxConfig } from "../src/api/config.ts";
import { Sandbox } from "../src/sandbox/sandbox.ts";
import { DEBIAN_TOOL_PACKAGES, importDebianImage } from "../test/helpers/debian.ts";

const runsArg = process.argv.indexOf("--runs");
const RUNS = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 3;

const MIB = 64;
const TAG = "bench-vfs-tools:12";

/** A workload: its name, its script for a directory, and the MB it moves (for MB/s), if any. */
const WORKLOADS: Array<[string, (dir: string) => string, number?]> = [
  [
    "write 64 MiB (dd, fsync)",
    (d) => `dd if=/dev/zero of=${d}/big bs=1M count=${MIB} conv=fsync 2>/dev/null`,
    (MIB * 1024 * 1024) / 1e6,
  ],
  [
    "read 64 MiB, caches dropped",
    (d) => `sync; echo 3 > /proc/sys/vm/drop_caches; dd if=${d}/big of=/dev/null bs=1M 2>/dev/null`,
    (MIB * 1024 * 1024) / 1e6,
  ],
  [
    "create 5,000 files + ls -l",
    (d) =>
      `rm -rf ${d}/s && mkdir ${d}/s && cd ${d}/s && i=0; while [ $i -lt 5000 ]; do echo x > f$i; i=$((i+1)); done; ls -l > /dev/null`,
  ],
  ["git status, 2,000 files", (d) => `cd ${d}/repo && git status --porcelain > /dev/null`],
  [
    "find over 10,000 entries",
    (d) =>
      `[ -d ${d}/t ] || { mkdir ${d}/t && cd ${d}/t && for a in $(seq 100); do mkdir d$a; for b in $(seq 99); do : > d$a/f$b; done; done; }; find ${d}/t | wc -l > /dev/null`,
  ],
];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? Number.NaN;
}

/** A git repository of 2,000 small files in 40 directories, made by the host's git. */
function makeRepo(dir: string): void {
  for (let i = 0; i < 2000; i++) {
    const sub = join(dir, `d${i % 40}`);
    mkdirSync(sub, { recursive: true });
    writeFileSync(join(sub, `f${i}.txt`), `file ${i}\n`);
  }
  const git = (...args: string[]) => execFileSync("git", ["-C", dir, ...args], { stdio: "ignore" });
  git("init", "-q");
  git("add", "-A");
  git("-c", "user.name=bench", "-c", "user.email=bench@example.test", "commit", "-qm", "bench");
}

const live = mkdtempSync(join(tmpdir(), "bench-vfs-live-"));
const snap = mkdtempSync(join(tmpdir(), "bench-vfs-snap-"));
makeRepo(join(live, "repo"));
makeRepo(join(snap, "repo"));
await importDebianImage(process.env, TAG, { packages: DEBIAN_TOOL_PACKAGES });
const sb = await Sandbox.create({
  config: parseSandboxConfig({
    image: TAG,
    network: { no_network: true },
    resources: { memory_mb: 1024, disk_size_mb: 2048 },
    vfs: {
      workspace: "/workspace",
      mounts: {
        "/workspace/live": { type: "host_fs", host_path: live },
        "/workspace/snap": { type: "overlay", host_path: snap },
      },
    },
  }),
});
try {
  console.log(
    `bench/vfs-vm on ${cpus().length} × ${cpus()[0]?.model ?? "?"} (${sb.accel}), ${RUNS} runs, medians`,
  );
  const run = async (script: string): Promise<number> => {
    const t = performance.now();
    const r = await sb.exec({ argv: ["/bin/sh", "-c", script], user: "root" }).done;
    if (r.exitCode !== 0) throw new Error(`${script}: exit ${r.exitCode}`);
    return performance.now() - t;
  };
  const places: Array<[string, string]> = [
    ["VM disk", "/root/bench"],
    ["host_fs", "/workspace/live"],
    ["overlay", "/workspace/snap"],
  ];
  await run("mkdir -p /root/bench && cp -a /workspace/live/repo /root/bench/repo");
  for (const [, dir] of places) await run(`cd ${dir}/repo && git status --porcelain > /dev/null`);
  for (const [name, script, mb] of WORKLOADS) {
    const ms = new Map<string, number[]>(places.map(([p]) => [p, []]));
    for (let i = 0; i < RUNS; i++) for (const [p, dir] of places) ms.get(p)?.push(await run(script(dir)));
    const base = median(ms.get("VM disk") ?? []);
    const cells = places.map(([p]) => {
      const m = median(ms.get(p) ?? []);
      const rate = mb === undefined ? "" : ` ${(mb / (m / 1000)).toFixed(1)} MB/s`;
      return p === "VM disk"
        ? `${p} ${(m / 1000).toFixed(2)} s${rate}`
        : `${p} ${(m / 1000).toFixed(2)} s${rate} (${(m / base).toFixed(2)}×)`;
    });
    console.log(`  ${name.padEnd(30)} ${cells.join("   ")}`);
  }
} finally {
  await sb.close();
  rmSync(live, { recursive: true, force: true });
  rmSync(snap, { recursive: true, force: true });
}
