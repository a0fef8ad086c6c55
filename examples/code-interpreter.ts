/**
 * A code-interpreter loop, as an agent framework would run one: each snippet is written into the
 * sandbox, run, and its output and exit code fed back. The VM (and anything the code did to it)
 * lives for the session and is thrown away at the end.
 *
 *   npm run build && node examples/code-interpreter.ts
 */
import { Client, Sandbox } from "matchlock";

const snippets = [
  "echo 'x = 6 * 7' > /workspace/state; cat /workspace/state",
  "awk 'BEGIN { s = 0; for (i = 1; i <= 100; i++) s += i; print \"sum:\", s }'",
  "cat /workspace/state; ls /nonexistent",
  "uname -sm; id -un",
];

const client = new Client();
try {
  await client.launch(new Sandbox().withMemory(256).withTimeout(120).withUser("user"));
  console.log(`sandbox ${client.vmId} is up`);
  // The cells run as "user"; give it a workspace it can write in.
  await client.exec("mkdir -p /workspace && chown user:user /workspace", { user: "root" });
  for (const [i, code] of snippets.entries()) {
    await client.writeFile(`/workspace/cell${i}.sh`, code);
    const r = await client.exec(`sh /workspace/cell${i}.sh`, { workingDir: "/workspace", timeoutMs: 30_000 });
    console.log(`--- cell ${i} (exit ${r.exitCode}, ${r.durationMs} ms)`);
    if (r.stdout) process.stdout.write(r.stdout);
    if (r.stderr) process.stdout.write(`[stderr] ${r.stderr}`);
  }
} finally {
  await client.close(); // stops the VM; it stays listed as stopped, with its logs
  await client.remove(); // and now it is gone (`matchlock rm`), as in Matchlock's SDK
}
