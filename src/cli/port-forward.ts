import type { Command } from "commander";
import { InvalidArgumentError } from "../api/errors.ts";
import { parseVmId } from "../api/ids.ts";
import { connectRelay, refuseIfPaused } from "./exec.ts";
import { collect } from "./parse.ts";

/** `matchlock port-forward ID [LOCAL:]REMOTE…`: host ports into a running VM, through its relay. */
export function registerPortForward(program: Command): void {
  program
    .command("port-forward")
    .summary("forward host ports to ports in a running VM until Ctrl-C")
    .description(
      "Listen on the host (127.0.0.1 unless --address) and forward each connection to a port on the VM's\n" +
        "loopback, over the agent channel: it works without any network interface. LOCAL 0 picks a free port.",
    )
    .argument("<id>", "VM id")
    .argument("<specs...>", "[LOCAL:]REMOTE ports")
    .option("--address <ip>", "host address to listen on (repeatable)", collect, [])
    .action(async (id: string, specs: string[], flags: { address: string[] }) => {
      parseVmId(id); // before it names a socket path
      const [{ parsePortSpec, validateAddress }, { PortForwarder }] = await Promise.all([
        import("../api/specs.ts"),
        import("../sandbox/port-forward.ts"),
      ]);
      const forwards = specs.map(parsePortSpec);
      if (forwards.length === 0) throw new InvalidArgumentError("give at least one [LOCAL:]REMOTE port");
      const addresses = flags.address.length > 0 ? flags.address.map(validateAddress) : ["127.0.0.1"];
      const client = await connectRelay(id);
      try {
        await refuseIfPaused(client, id);
      } catch (e) {
        client.close("paused");
        throw e;
      }
      const forwarder = new PortForwarder((port, io) => client.tcpConnect(port, io));
      for (const b of await forwarder.add(forwards, addresses)) {
        process.stdout.write(`forwarding ${b.address}:${b.localPort} -> ${id}:${b.remotePort}\n`);
      }
      // Until Ctrl-C/SIGTERM, or until the VM goes away (the relay connection closes).
      await new Promise<void>((resolve) => {
        for (const s of ["SIGINT", "SIGTERM"] as const) process.once(s, () => resolve());
        const poll = setInterval(() => {
          if (client.failed) resolve();
        }, 250);
        poll.unref();
      });
      forwarder.close();
      client.close("port-forward finished");
    });
}
