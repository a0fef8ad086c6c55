import { isIP } from "node:net";
import { isValidHostname } from "./config.ts";
import { InvalidArgumentError } from "./errors.ts";

/** Parsers of the CLI's compact specs, shared by the CLI, the RPC server and the SDK. */

export interface PortForward {
  /** 0: any free port. */
  localPort: number;
  remotePort: number;
}

/** `[LOCAL:]REMOTE` → forward; a bare port forwards to the same port. */
export function parsePortSpec(spec: string): PortForward {
  const parts = spec.trim().split(":");
  const port = (s: string | undefined, role: string, allowZero: boolean): number => {
    const n = Number(s);
    if (s === undefined || !/^\d+$/.test(s) || n > 65535 || (n === 0 && !allowZero)) {
      throw new InvalidArgumentError(
        `invalid port spec "${spec}": bad ${role} port (use [LOCAL:]REMOTE, 1-65535)`,
      );
    }
    return n;
  };
  if (parts.length === 1) {
    const p = port(parts[0], "remote", false);
    return { localPort: p, remotePort: p };
  }
  if (parts.length === 2)
    return { localPort: port(parts[0], "local", true), remotePort: port(parts[1], "remote", false) };
  throw new InvalidArgumentError(`invalid port spec "${spec}" (use [LOCAL:]REMOTE)`);
}

export function validateAddress(a: string): string {
  if (isIP(a) === 0 && a !== "localhost")
    throw new InvalidArgumentError(`invalid address "${a}" (an IP address)`);
  return a;
}

/** `--add-host host:ip` (Matchlock's form; the host has no colon, so an IPv6 address may follow it). */
export function parseAddHost(spec: string): { host: string; ip: string } {
  const at = spec.indexOf(":");
  const host = at < 0 ? "" : spec.slice(0, at);
  const ip = at < 0 ? "" : spec.slice(at + 1);
  if (!isValidHostname(host) || isIP(ip) === 0) {
    throw new InvalidArgumentError(`invalid --add-host "${spec}": use HOST:IP, like db.internal:10.1.2.3`);
  }
  return { host, ip };
}

/** `--dns-servers a,b` (repeatable): IP addresses. */
export function parseDnsServers(specs: readonly string[]): string[] {
  const out = specs
    .flatMap((s) => s.split(","))
    .map((s) => s.trim())
    .filter((s) => s !== "");
  for (const s of out) {
    if (isIP(s) === 0) throw new InvalidArgumentError(`invalid --dns-servers entry "${s}": an IP address`);
  }
  return out;
}

/** `--allow-private-host ADDR`: one exact IP address. */
export function parsePrivateHost(spec: string): string {
  if (isIP(spec) === 0) {
    throw new InvalidArgumentError(`invalid --allow-private-host "${spec}": one IP address, like 10.1.2.3`);
  }
  return spec;
}
