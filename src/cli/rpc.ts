import type { Command } from "commander";

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
      const max = Number(process.env.MATCHLOCK_RPC_MAX_LINE);
      const server = new RpcServer({
        input: process.stdin,
        output: process.stdout,
        ...(Number.isInteger(max) && max > 0 ? { maxLine: max } : {}),
      });
      const served = server.serve();
      // Not awaited: it stops as soon as a request (or EOF) comes in. The SDK's spare child waits
      // idle for its first request, so a create then finds everything loaded.
      void warmUp(() => !server.idle);
      await served;
    });
}
