/**
 * bench/vfs-vm: host folders in a real VM against the VM's own disk, in one run, alternating.
 * One VM (default image, no network) with a host_fs mount and an overlay mount of fresh temp folders;
 * each workload runs in the guest on the mount and on the upper disk (/root), timed from the host
 * around the exec (its ~15 ms round trip is included on both sides), `--runs` times each:
 *   - write 64 MiB sequentially (dd, fsync), read it back with the guest's caches dropped;
 *   - create 5,000 small files (a shell loop) and `ls -l` them;
 *   - `find` over 10,000 entries.
 * Medians, and the ratio mount / VM disk (time: lower is better).
 * Usage: npm run bench:vfs-vm [-- --runs N]
 */
import { mkdtempSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { parseSandboxConfig } from "../src/api/config.ts";
import { Sandbox } from "../src/sandbox/sandbox.ts";

const runsArg = process.argv.indexOf("--runs");
const RUNS = runsArg > 0 ? Number(process.argv[runsArg + 1]) : 3;

const WORKLOADS: Array<[string, (dir: string) => string]> = [
  ["write 64 MiB (dd, fsync)", (d) => `dd if=/dev/zero of=${d}/big bs=1M count=64 conv=fsync 2>/dev/null`],
  [
    "read 64 MiB, caches dropped",
    (d) => `sync; echo 3 > /proc/sys/vm/drop_caches; dd if=${d}/big of=/dev/null bs=1M 2>/dev/null`,
  ],
  [
    "create 5,000 files + ls -l",
    (d) =>
      `rm -rf ${d}/s && mkdir ${d}/s && cd ${d}/s && i=0; while [ $i -lt 5000 ]; do echo x > f$i; i=$((i+1)); done; ls -l > /dev/null`,
  ],
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

const live = mkdtempSync(join(tmpdir(), "bench-vfs-live-"));
const snap = mkdtempSync(join(tmpdir(), "bench-vfs-snap-"));
const sb = await Sandbox.create({
  config: parseSandboxConfig({
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
    const r = await sb.exec({ argv: ["/bin/sh", "-c", script] }).done;
    if (r.exitCode !== 0) throw new Error(`${script}: exit ${r.exitCode}`);
    return performance.now() - t;
  };
  const places: Array<[string, string]> = [
    ["VM disk", "/root/bench"],
    ["host_fs", "/workspace/live"],
    ["overlay", "/workspace/snap"],
  ];
  await run("mkdir -p /root/bench");
  for (const [name, script] of WORKLOADS) {
    const ms = new Map<string, number[]>(places.map(([p]) => [p, []]));
    for (let i = 0; i < RUNS; i++) for (const [p, dir] of places) ms.get(p)?.push(await run(script(dir)));
    const base = median(ms.get("VM disk") ?? []);
    const cells = places.map(([p]) => {
      const m = median(ms.get(p) ?? []);
      return p === "VM disk"
        ? `${p} ${(m / 1000).toFixed(2)} s`
        : `${p} ${(m / 1000).toFixed(2)} s (${(m / base).toFixed(2)}×)`;
    });
    console.log(`  ${name.padEnd(30)} ${cells.join("   ")}`);
  }
} finally {
  await sb.close();
  rmSync(live, { recursive: true, force: true });
  rmSync(snap, { recursive: true, force: true });
}
