import { readFileSync, statSync } from "node:fs";

/**
 * Who holds POSIX (fcntl) locks on a file, from /proc/locks. SQLite locks with fcntl: every
 * connection to a WAL database holds a SHARED lock on the database file and one on its -shm for as
 * long as it is open, which tells us whether the -shm next to state.db still belongs to that file.
 */

/** Linux's dev_t as /proc/locks prints it (major:minor, each hex) and stat returns it (one number). */
function devOf(dev: number): { major: number; minor: number } {
  return { major: (dev >>> 8) & 0xfff, minor: (dev & 0xff) | ((dev >>> 12) & 0xfff00) };
}

/** Pids holding POSIX locks on `path`; empty when there are none, the file is missing or /proc says nothing. */
export function lockHolders(path: string): Set<number> {
  const holders = new Set<number>();
  let dev: { major: number; minor: number };
  let ino: number;
  let text: string;
  try {
    const st = statSync(path);
    dev = devOf(st.dev);
    ino = st.ino;
    text = readFileSync("/proc/locks", "utf8");
  } catch {
    return holders;
  }
  // "1: POSIX  ADVISORY  READ 9518 fe:00:2147929 128 128" (a blocked waiter has "->" after "1:").
  for (const line of text.split("\n")) {
    const f = line.split(/\s+/).filter((x) => x !== "->");
    if (f[1] !== "POSIX") continue;
    const m = /^([0-9a-f]+):([0-9a-f]+):(\d+)$/.exec(f[5] ?? "");
    if (!m || Number(m[3]) !== ino) continue;
    if (Number.parseInt(m[1] ?? "", 16) !== dev.major || Number.parseInt(m[2] ?? "", 16) !== dev.minor)
      continue;
    const pid = Number(f[4]);
    if (Number.isInteger(pid)) holders.add(pid);
  }
  return holders;
}
