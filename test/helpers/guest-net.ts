import { readFileSync } from "node:fs";
import { join } from "node:path";
import { CLI, type CliResult, type tempHome } from "./cli.ts";
import type { Topology } from "./netns.ts";

/**
 * Driving matchlock from inside a test topology (NETWORK.md §8): every CLI call runs in the
 * topology's host namespace, whose only link leads to the fake internet, with the fake internet's
 * CA trusted by the owner (NODE_EXTRA_CA_CERTS), as a user's host trusts public CAs.
 */
export interface GuestNet {
  /** `matchlock ARGS` in the test namespace; `input` goes to its stdin. */
  ml(args: string[], extra?: NodeJS.ProcessEnv, input?: string): Promise<CliResult>;
  /** A shell script in a running VM: stdout, then stderr (for messages). */
  sh(id: string, script: string): Promise<string>;
  /** The VM's decision log (events.jsonl in its directory), parsed. */
  events(id: string): Array<{ network: Record<string, unknown> }>;
}

/** `topology` is a getter: topologies are made in `before`, after this is called. */
export function guestNet(topology: () => Topology, home: ReturnType<typeof tempHome>): GuestNet {
  const ml = async (args: string[], extra: NodeJS.ProcessEnv = {}, input?: string): Promise<CliResult> => {
    const started = Date.now();
    const t = topology();
    const env = { ...home.env, NODE_EXTRA_CA_CERTS: t.caFile, ...extra };
    const r = await t.execInHost(process.execPath, [CLI, ...args], {
      env,
      timeoutMs: 240_000,
      ...(input === undefined ? {} : { input }),
    });
    return { ...r, ms: Date.now() - started };
  };
  return {
    ml,
    sh: async (id, script) => {
      const r = await ml(["exec", id, "--", "sh", "-c", script]);
      return r.stdout.toString() + r.stderr;
    },
    events: (id) =>
      readFileSync(join(home.home, "vms", id, "events.jsonl"), "utf8")
        .split("\n")
        .filter((l) => l !== "")
        .map((l) => JSON.parse(l) as { network: Record<string, unknown> }),
  };
}
