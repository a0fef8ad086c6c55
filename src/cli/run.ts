import { type Command, Option } from "commander";
import { DEFAULT_GRACE_MS } from "../guest/agent-client.ts";
import { boolValue, collect, durationMs, positiveInt, positiveNumber } from "./parse.ts";

/**
 * `matchlock run`: its flags and help. What it does is in run-vm.ts, loaded when it runs, so that
 * `matchlock --help` and the other commands never load the sandbox.
 */

export interface RunFlags {
  image?: string;
  env: string[];
  envFile: string[];
  workdir?: string;
  user?: string;
  entrypoint?: string;
  tty?: boolean;
  interactive?: boolean;
  detach?: boolean;
  rm: boolean | string;
  cpus: number;
  memory: number;
  diskSize: number;
  timeout?: number;
  hostname?: string;
  network: boolean;
  addHost: string[];
  dnsServers: string[];
  mtu?: number;
  allowPrivateHost: string[];
  allowHost: string[];
  secret: string[];
  networkIntercept?: boolean;
  networkRules?: string;
  volume: string[];
  workspace?: string;
  disk: string[];
  accel?: string;
  cold?: boolean;
  gracefulShutdown: number;
  publish: string[];
  address: string[];
  pull?: boolean;
}

export function registerRun(program: Command): void {
  program
    .command("run")
    .summary("run a command in a new micro-VM")
    .description(
      "Boot a micro-VM from an image, run a command in it and remove the VM when the command ends.\n" +
        "The exit code is the command's. Ctrl-C or SIGTERM sends SIGTERM to the command, then SIGKILL after\n" +
        "the grace period (--graceful-shutdown), and stops the VM.\n\n" +
        "With --rm=false or -d the VM stays up after the command (reach it with `matchlock exec ID`) until\n" +
        "Ctrl-C, SIGTERM or `matchlock kill ID`; then it is listed as stopped until `matchlock rm ID`.\n\n" +
        "Network (the default): the guest reaches every public TCP destination; DNS goes through matchlock's\n" +
        "resolver on the gateway. Every flow ends in this process on the host; nothing is forwarded, so\n" +
        "loopback, private (RFC 1918, CGNAT, link-local, ULA), metadata and the host's own addresses stay\n" +
        "unreachable unless --allow-private-host names them. UDP other than DNS, ICMP (ping) and IPv6 are\n" +
        "not carried. Networking needs root (CAP_NET_ADMIN) and nftables; --no-network needs neither.\n\n" +
        "Intercept mode (--allow-host, --secret, --network-intercept or --network-rules): only allowed names resolve and\n" +
        "connect; HTTP and HTTPS are terminated by matchlock's proxy (the guest trusts a per-VM CA, installed\n" +
        "for it) and secrets are swapped in on the wire: the guest sees SANDBOX_SECRET_… placeholders, and\n" +
        "only requests to the secret's hosts carry the real value. `matchlock events ID` says why a request\n" +
        "was blocked; `matchlock allow-list add|delete ID HOSTS` changes the list while the VM runs.\n\n" +
        "Fast starts: the first run of an image (per memory, CPUs, disk size, network or not, folders or not)\n" +
        "boots it once more to save a snapshot; later runs restore a copy of that snapshot in a fraction of a\n" +
        "cold boot, then give it its own entropy, clock, hostname, address and folders. --cold (or\n" +
        "MATCHLOCK_COLD=1) boots from scratch; --disk always does (extra disks are attached at boot). A\n" +
        "snapshot that cannot be restored falls back to a cold boot, with the reason in the VM's boot.log.\n" +
        "`matchlock snapshot ls|rm|gc` manages them.",
    )
    .usage("[options] [--] [command...]")
    .argument("[command...]", "command and arguments (default: the image's Entrypoint + Cmd)")
    .option(
      "--image <ref>",
      "image to boot: a local tag, a pulled image, or pulled now (default: matchlock/default:latest)",
    )
    .option("--pull", "pull the image again even if it is here")
    .option(
      "-e, --env <KEY=VALUE|KEY>",
      "set an environment variable; a bare KEY copies the host's value",
      collect,
      [],
    )
    .option("--env-file <file>", "read KEY=VALUE lines from a file (applied before -e)", collect, [])
    .option("-w, --workdir <dir>", "working directory in the guest (created if missing)")
    .option("-u, --user <user>", "uid, uid:gid, name or name:group from the image's /etc/passwd")
    .option("--entrypoint <cmd>", 'override the image\'s Entrypoint ("" clears it)')
    .option("-t, --tty", "allocate a pseudo-terminal")
    .option("-i, --interactive", "pass stdin to the command")
    .option("-d, --detach", "start the VM in the background, print its id and return (implies --rm=false)")
    .addOption(
      new Option("--rm [bool]", "remove the VM when the command ends; --rm=false keeps it until Ctrl-C")
        .default(true)
        .argParser(boolValue),
    )
    .option("--cpus <n>", "virtual CPUs (fractions round up)", positiveNumber, 1)
    .option("--memory <MB>", "guest memory in MB", positiveInt, 512)
    .option("--disk-size <MB>", "size of the VM's writable disk in MB (sparse)", positiveInt, 5120)
    .option("--timeout <seconds>", "stop the command and the VM after this many seconds", positiveNumber)
    .option("--hostname <name>", "guest hostname (default: the VM id)")
    .option("--no-network", "no network interface: loopback only")
    .option("--add-host <host:ip>", "add a name to the guest's /etc/hosts and DNS (repeatable)", collect, [])
    .option(
      "--dns-servers <a,b>",
      "upstream resolvers for the guest's DNS (default: the host's /etc/resolv.conf)",
      collect,
      [],
    )
    .option("--mtu <bytes>", "MTU of the guest's network interface", positiveInt)
    .option(
      "--allow-private-host <ip>",
      "let the guest reach this private, loopback or host address (repeatable)",
      collect,
      [],
    )
    .option(
      "--allow-host <globs>",
      "intercept mode: allow these hosts (comma-separated, repeatable; api.x.com, *.x.com, x.*, *)",
      collect,
      [],
    )
    .option(
      "--secret <NAME[=VALUE]@hosts>",
      "intercept mode: give the guest a placeholder for NAME, swapped for the real value (from $NAME\n" +
        "unless =VALUE is given) in headers and query strings sent to these hosts only (repeatable)",
      collect,
      [],
    )
    .option(
      "--network-intercept",
      "intercept mode even with no --allow-host (an empty list allows every host)",
    )
    .option(
      "--network-rules <file>",
      'intercept mode with network hook rules from a JSON file: {"rules": [...]} or a bare list of\n' +
        "rules, as RPC network.interception (block paths, set or delete headers and query, rewrite\n" +
        "paths and response bodies); see docs/network-hooks.md",
    )
    .option(
      "-v, --volume <HOST:GUEST[:MODE]>",
      "share a host folder or file under the workspace (repeatable). MODE: overlay (default: the guest\n" +
        "changes a copy-on-write view, the host copy stays as it was), host_fs (live, read-write) or ro\n" +
        "(live, read-only). The host never follows a link out of the folder",
      collect,
      [],
    )
    .option(
      "--disk <HOST.ext4|@NAME:GUEST[:ro]>",
      "attach an ext4 image, or the volume NAME (`matchlock volume create`), at a guest path (repeatable)",
      collect,
      [],
    )
    .option(
      "--workspace <path>",
      "where the guest sees the shared folders (default /workspace; -v guest paths go inside it)",
    )
    .option(
      "-p, --publish <[LOCAL:]REMOTE>",
      "forward a host port to a guest port (over the agent channel)",
      collect,
      [],
    )
    .option(
      "--address <ip>",
      "host address to bind published ports on (repeatable; default 127.0.0.1)",
      collect,
      [],
    )
    .option("--cold", "boot from scratch instead of restoring the image's snapshot (see Fast starts)")
    .addOption(
      new Option("--accel <kind>", "accelerator (default: probed; env MATCHLOCK_ACCEL)").choices([
        "kvm",
        "tcg",
      ]),
    )
    .addOption(
      new Option("--graceful-shutdown <duration>", "grace between SIGTERM and SIGKILL on cancel (e.g. 3s)")
        .default(DEFAULT_GRACE_MS, "3s")
        .argParser(durationMs),
    )
    .action(async (command: string[], flags: RunFlags) => {
      // The sandbox and everything under it load only when a VM is to run, not for --help.
      const { runCommandInVm } = await import("./run-vm.ts");
      process.exitCode = await runCommandInVm(command, flags);
    });
}
