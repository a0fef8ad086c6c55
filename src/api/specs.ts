import { isIP } from "node:net";
import { resolve as resolvePath } from "node:path";
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

/** Host lists as the CLI and Matchlock's `allow-list add ID a,b` take them: comma-separated, repeatable. */
export function splitHosts(specs: readonly string[]): string[] {
  const out = specs
    .flatMap((s) => s.split(","))
    .map((s) => s.trim())
    .filter((s) => s !== "");
  if (out.length === 0)
    throw new InvalidArgumentError("no hosts given (a comma-separated list, like github.com,*.npmjs.org)");
  return out;
}

/**
 * `--secret NAME=VALUE@host1,host2` or `--secret NAME@hosts` (the value from $NAME), Matchlock's
 * forms: split on the last `@` (a value may contain `@` if hosts follow); no `@` means every host.
 * The value never appears in an error message.
 */
export function parseSecretSpec(
  spec: string,
  hostEnv: NodeJS.ProcessEnv = process.env,
): { name: string; value: string; hosts: string[] } {
  const at = spec.lastIndexOf("@");
  const head = at < 0 ? spec : spec.slice(0, at);
  const hostPart = at < 0 ? "" : spec.slice(at + 1);
  const eq = head.indexOf("=");
  const name = eq < 0 ? head : head.slice(0, eq);
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
    throw new InvalidArgumentError(
      `invalid --secret: "${name.slice(0, 40)}" is not a variable name`,
      "use NAME@host (the value from $NAME) or NAME=VALUE@host",
    );
  }
  let value: string;
  if (eq >= 0) value = head.slice(eq + 1);
  else {
    const host = Object.hasOwn(hostEnv, name) ? hostEnv[name] : undefined;
    if (typeof host !== "string" || host === "") {
      throw new InvalidArgumentError(
        `--secret ${name}: ${name} is not set on the host`,
        `export ${name}=… first, or use ${name}=VALUE@host`,
      );
    }
    value = host;
  }
  const hosts = hostPart
    .split(",")
    .map((h) => h.trim())
    .filter((h) => h !== "");
  return { name, value, hosts };
}

/** What `-v` makes: a `vfs.mounts` entry under its guest path. */
export interface VolumeSpec {
  guestPath: string;
  mount: { type: "host_fs" | "overlay"; host_path: string; readonly?: boolean };
}

/**
 * `-v HOST:GUEST[:MODE]`, Matchlock's syntax: MODE is `overlay` (the default: the guest changes a
 * copy-on-write view, the host copy stays as it was), `host_fs` (live, read-write) or `ro` /
 * `readonly` (live, read-only). A relative GUEST is inside the workspace. The host path is made
 * absolute against the current directory; whether it exists is checked at create.
 */
export function parseVolumeSpec(spec: string, workspace: string, cwd = process.cwd()): VolumeSpec {
  const parts = spec.split(":");
  const modes: Record<string, { type: "host_fs" | "overlay"; readonly?: boolean }> = {
    overlay: { type: "overlay" },
    host_fs: { type: "host_fs" },
    ro: { type: "host_fs", readonly: true },
    readonly: { type: "host_fs", readonly: true },
  };
  const last = parts[parts.length - 1] ?? "";
  const mode = parts.length >= 3 && Object.hasOwn(modes, last) ? modes[last] : undefined;
  if (parts.length > 3 || (parts.length === 3 && mode === undefined) || parts.length < 2) {
    throw new InvalidArgumentError(
      `invalid -v "${spec}": expected HOST:GUEST[:MODE]`,
      "MODE is overlay (default), host_fs or ro, e.g. -v ./repo:/workspace/repo:host_fs",
    );
  }
  const [host = "", guest = ""] = parts;
  if (host === "" || guest === "") {
    throw new InvalidArgumentError(`invalid -v "${spec}": the host and the guest path must not be empty`);
  }
  const guestPath = guest.startsWith("/") ? guest : `${workspace.replace(/\/+$/, "")}/${guest}`;
  return {
    guestPath: guestPath.length > 1 ? guestPath.replace(/\/+$/, "") : guestPath,
    mount: {
      ...(mode ?? { type: "overlay" }),
      host_path: resolvePath(cwd, host),
    },
  };
}

/**
 * `--disk HOST.ext4:GUEST[:ro]` or `--disk @NAME:GUEST[:ro]` (a volume, found by `volume`): an
 * `extra_disks` entry. The host path is made absolute against the current directory.
 */
export function parseDiskSpec(
  spec: string,
  volume: (name: string) => string,
  cwd = process.cwd(),
): { host_path: string; guest_mount: string; readonly: boolean } {
  const parts = spec.split(":");
  const ro = parts.length === 3 && (parts[2] === "ro" || parts[2] === "readonly");
  if (parts.length < 2 || parts.length > 3 || (parts.length === 3 && !ro) || !parts[0] || !parts[1]) {
    throw new InvalidArgumentError(
      `invalid --disk "${spec}": expected HOST.ext4:GUEST[:ro] or @NAME:GUEST[:ro]`,
      "e.g. --disk ./scratch.ext4:/mnt/scratch:ro or --disk @cache:/var/cache",
    );
  }
  const [host = "", guest = ""] = parts;
  return {
    host_path: host.startsWith("@") ? volume(host.slice(1)) : resolvePath(cwd, host),
    guest_mount: guest,
    readonly: ro,
  };
}
