import { closeSync, existsSync, openSync, readSync, statSync } from "node:fs";
import { join } from "node:path";
import { StringDecoder } from "node:string_decoder";
import type { Command } from "commander";
import type { SandboxEvent } from "../api/events.ts";
import { parseVmId } from "../api/ids.ts";
import { EVENTS_FILE } from "../sandbox/event-log.ts";
import { isAlive } from "../state/procs.ts";
import { connectRelay } from "./exec.ts";
import { escapeControls } from "./parse.ts";

/**
 * `matchlock allow-list add|delete ID HOSTS` (Matchlock's command, through the VM's relay) and
 * `matchlock events ID` (ours: the VM's decision log, the answer to "why was my request blocked").
 */
export function registerNetworkCommands(program: Command): void {
  const allow = program
    .command("allow-list")
    .summary("change the allow-list of a running VM in intercept mode")
    .description(
      "Add or delete hosts (globs, comma-separated) in a running VM's allow-list. DNS, HTTP(S) and other\n" +
        "TCP see the change at once. The VM must be in intercept mode (started with --allow-host, --secret\n" +
        "or --network-intercept). An empty list allows every host.",
    );
  for (const op of ["add", "delete"] as const) {
    allow
      .command(op)
      .summary(op === "add" ? "allow more hosts" : "stop allowing hosts")
      .argument("<id>", "VM id")
      .argument("<hosts...>", "host globs: github.com,*.githubusercontent.com")
      .action(async (id: string, hosts: string[]) => {
        parseVmId(id);
        const { splitHosts } = await import("../api/specs.ts"); // valibot: not for --help
        const list = splitHosts(hosts);
        const client = await connectRelay(id);
        try {
          const r = (await client.allowList(op, list)) as {
            added?: string[];
            removed?: string[];
            allowed_hosts: string[];
          };
          const changed = (op === "add" ? r.added : r.removed) ?? [];
          const verb = op === "add" ? "added" : "removed";
          process.stdout.write(`${verb}: ${changed.length > 0 ? changed.join(", ") : "(none)"}\n`);
          process.stdout.write(
            `allowed hosts: ${r.allowed_hosts.length > 0 ? r.allowed_hosts.join(", ") : "(empty: all hosts allowed)"}\n`,
          );
        } finally {
          client.close("allow-list done");
        }
      });
  }

  program
    .command("events")
    .summary("show a VM's network decisions: what was allowed, what was blocked and why")
    .description(
      "Every request, connection and DNS answer intercept mode decided, with the reason for each block\n" +
        "(allow-list, DNS, TLS name mismatch, secret sent to the wrong host, private address). In open\n" +
        "mode, refused connections. Works while the VM runs and after it stopped (until `matchlock rm`).",
    )
    .argument("<id>", "VM id")
    .option("-f, --follow", "keep printing new events until the VM stops")
    .option("--json", "one JSON event per line (Matchlock's event shape)")
    .option("--blocked", "only blocked requests")
    .action(async (id: string, flags: { follow?: boolean; json?: boolean; blocked?: boolean }) => {
      const [{ locateVm }, { describeEvent }] = await Promise.all([
        import("./vm-records.ts"),
        import("../api/events.ts"),
      ]);
      const { dir, owner } = await locateVm(id);
      const file = join(dir, EVENTS_FILE);
      const print = (e: SandboxEvent) => {
        if (flags.blocked && (e.type !== "network" || !e.network.blocked)) return;
        process.stdout.write(flags.json ? `${JSON.stringify(e)}\n` : `${escapeControls(describeEvent(e))}\n`);
      };
      const reader = new EventFileReader(file);
      reader.readRotated(print);
      reader.read(print);
      if (flags.follow) {
        while (isAlive(owner)) {
          await new Promise((r) => setTimeout(r, 250));
          reader.read(print);
        }
        reader.read(print);
      }
    });
}

/** Reads complete lines appended to the events file since the last call; notices rotation. */
class EventFileReader {
  private offset = 0;
  private partial = "";
  private readonly decoder = new StringDecoder("utf8");
  private readonly file: string;

  constructor(file: string) {
    this.file = file;
  }

  /** The generation before the current one, if the log has rotated. */
  readRotated(each: (e: SandboxEvent) => void): void {
    const old = `${this.file}.1`;
    if (existsSync(old)) new EventFileReader(old).read(each);
  }

  read(each: (e: SandboxEvent) => void): void {
    let size: number;
    try {
      size = statSync(this.file).size;
    } catch {
      return;
    }
    if (size < this.offset) this.offset = 0; // rotated under us: the new file starts over
    const fd = openSync(this.file, "r");
    try {
      const buf = Buffer.alloc(64 * 1024);
      for (;;) {
        const n = readSync(fd, buf, 0, buf.length, this.offset);
        if (n <= 0) break;
        this.offset += n;
        const lines = (this.partial + this.decoder.write(buf.subarray(0, n))).split("\n");
        this.partial = lines.pop() ?? "";
        for (const line of lines) {
          if (line === "") continue;
          try {
            each(JSON.parse(line) as SandboxEvent);
          } catch {}
        }
      }
    } finally {
      closeSync(fd);
    }
  }
}
