/**
 * Streaming a long build: output arrives line by line while the command runs, and Ctrl-C (or the
 * 60 s budget) cancels it in the guest.
 *
 *   npm run build && node examples/stream-build.ts
 */
import { Client, Sandbox } from "matchlock";

const build = `
set -e
mkdir -p /src && cd /src
for step in fetch configure compile link test; do
  echo "==> $step"
  sleep 0.3
done
echo "warning: this build is a demo" >&2
echo "build OK"
`;

const client = new Client();
const abort = new AbortController();
process.once("SIGINT", () => abort.abort());
try {
  await client.launch(new Sandbox().withCPUs(1).withMemory(256));
  await client.writeFile("/src/build.sh", build, { mode: 0o755 });
  const r = await client.execStream("/src/build.sh", {
    stdout: process.stdout,
    stderr: process.stderr,
    signal: abort.signal,
    timeoutMs: 60_000,
  });
  console.log(`build exited with ${r.exitCode} after ${r.durationMs} ms`);
  process.exitCode = r.exitCode;
} finally {
  await client.close(); // stops the VM; it stays listed as stopped, with its logs
  await client.remove(); // and now it is gone (`matchlock rm`), as in Matchlock's SDK
}
