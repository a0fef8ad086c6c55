/**
 * An interactive shell in a sandbox, on this terminal: raw keystrokes in, the PTY's output out,
 * window resizes forwarded. Exit the shell to end.
 *
 *   npm run build && node examples/interactive-shell.ts
 */
import { on } from "node:events";
import { Client, Sandbox } from "matchlock";

const client = new Client();
const stdin = process.stdin;
try {
  await client.launch(new Sandbox().withHostname("playground"));
  if (stdin.isTTY) stdin.setRawMode(true);
  async function* resizes() {
    for await (const _ of on(process.stdout, "resize"))
      yield [process.stdout.rows, process.stdout.columns] as [number, number];
  }
  const r = await client.execInteractive("sh -l", {
    stdin,
    stdout: process.stdout,
    rows: process.stdout.rows || 24,
    cols: process.stdout.columns || 80,
    resize: resizes(),
  });
  process.exitCode = r.exitCode;
} finally {
  if (stdin.isTTY) stdin.setRawMode(false);
  stdin.destroy(); // release the terminal so the program can exit
  await client.close(); // stops the VM; it stays listed as stopped, with its logs
  await client.remove(); // and now it is gone (`matchlock rm`), as in Matchlock's SDK
}
