import { isIP } from "node:net";
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
