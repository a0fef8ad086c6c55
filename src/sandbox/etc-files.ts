import type { AgentClient } from "../guest/agent-client.ts";

export interface EtcFiles {
  hostname: string;
  addHosts: ReadonlyArray<{ host: string; ip: string }>;
  /** The VM's gateway (our DNS); without a network, resolv.conf stays the image's. */
  gateway?: string;
}

/**
 * The guest's name and resolver files, in Matchlock's layout: /etc/hostname, /etc/hosts (localhost
 * with the hostname, one line per add-host, the IPv6 lines) and /etc/resolv.conf naming the
 * gateway (every port-53 packet lands on our DNS anyway).
 */
export async function writeEtcFiles(agent: AgentClient, f: EtcFiles): Promise<void> {
  // An image may ship these as symlinks (resolv.conf → systemd-resolved's stub, often dangling
  // here): replaced by regular files, as Docker's bind mounts do, never written through.
  const write = (path: string, text: string) =>
    agent.writeFile(path, Buffer.from(text), 0o644, { replaceLink: true });
  // At once, on their own streams: one round trip instead of three.
  await Promise.all([
    write("/etc/hostname", `${f.hostname}\n`),
    write("/etc/hosts", hostsFile(f.hostname, f.addHosts)),
    ...(f.gateway ? [write("/etc/resolv.conf", `nameserver ${f.gateway}\n`)] : []),
  ]);
}

/** /etc/hosts as Matchlock's guest init writes it. */
export function hostsFile(hostname: string, addHosts: ReadonlyArray<{ host: string; ip: string }>): string {
  return [
    `127.0.0.1\tlocalhost localhost.localdomain ${hostname}`,
    ...addHosts.map((h) => `${h.ip}\t${h.host}`),
    "::1\tlocalhost ip6-localhost ip6-loopback",
    "ff02::1\tip6-allnodes",
    "ff02::2\tip6-allrouters",
    "",
  ].join("\n");
}
