import type { Command } from "commander";
import type { SandboxConfig } from "../api/config.ts";
import type { Prestart } from "../sandbox/prestart.ts";
import type { Sandbox } from "../sandbox/sandbox.ts";

/** `matchlock rpc`: the JSON-RPC server on stdio that SDKs drive. */
export function registerRpc(program: Command): void {
  program
    .command("rpc")
    .summary("serve JSON-RPC 2.0 on stdin/stdout (one VM per process; used by the SDKs)")
    .description(
      "Newline-delimited JSON-RPC 2.0 on stdin/stdout, compatible with Matchlock's protocol: create, exec,\n" +
        "exec_stream, exec_pipe, exec_tty, write_file, read_file, list_files, log, log_stream, port_forward,\n" +
        "cancel, close. One VM per process; EOF on stdin cancels everything and closes the VM. Logs go to\n" +
        "stderr. A request line may be at most 96 MiB (MATCHLOCK_RPC_MAX_LINE bytes). See docs/rpc.md.",
    )
    .action(async () => {
      // The server must outlive any bug in one request: a stray rejection is logged, never fatal,
      // so the VM is still closed when stdin ends.
      process.on("unhandledRejection", (e) => {
        process.stderr.write(
          `matchlock rpc: internal error (ignored): ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`,
        );
      });
      const { RpcServer } = await import("../rpc/server.ts"); // the sandbox: not loaded for --help
      const { warmUp } = await import("../rpc/warm.ts");
      const prestart = await prestartFromEnv();
      const max = Number(process.env.MATCHLOCK_RPC_MAX_LINE);
      const server = new RpcServer({
        input: process.stdin,
        output: process.stdout,
        ...(Number.isInteger(max) && max > 0 ? { maxLine: max } : {}),
        ...(prestart ? { createSandbox: prestart.create } : {}),
      });
      const served = server.serve();
      // The SDK's spare child waits idle for its first request: it restores a clone of the kind the
      // SDK expects (its hint) and loads what a create would, so the create finds both ready.
      // Neither is awaited: the warm-up stops as soon as a request (or EOF) comes in, and a create
      // waits for the clone if it is of its kind.
      prestart?.holder.prepare();
      void warmUp(() => !server.idle);
      await served;
      await prestart?.holder.discard();
    });
}

/**
 * The SDK's hint (PRESTART_ENV) as a holder of clones made ahead, and the create that adopts one;
 * undefined without a usable hint. SIGTERM (the SDK ending its idle spare sends it with EOF) first
 * removes a clone still held, then does what it always did.
 */
async function prestartFromEnv(): Promise<
  { holder: Prestart; create: (config: SandboxConfig) => Promise<Sandbox> } | undefined
> {
  const { PRESTART_ENV } = await import("../api/prestart.ts");
  const hint = process.env[PRESTART_ENV];
  if (!hint) return undefined;
  const [{ Prestart }, { Sandbox }, { paths }] = await Promise.all([
    import("../sandbox/prestart.ts"),
    import("../sandbox/sandbox.ts"),
    import("../api/paths.ts"),
  ]);
  const holder = Prestart.fromHint(paths(), hint);
  if (!holder) return undefined;
  process.once("SIGTERM", () => {
    // Once is enough: the handler is gone, so this SIGTERM takes the default action. At most 5 s:
    // a stuck removal must not keep the process alive.
    const end = () => process.kill(process.pid, "SIGTERM");
    setTimeout(end, 5000).unref();
    void holder.discard().finally(end);
  });
  return { holder, create: (config) => Sandbox.create({ config, prestart: holder }) };
}
