import { VmBootError } from "../api/errors.ts";
import type { AgentClient } from "../guest/agent-client.ts";
import type { RunningVm } from "../vm/backend.ts";

/** Waits for a booting VM's agent to say READY, or says why the VM never got there. */
export async function waitReady(agent: AgentClient, vm: RunningVm, timeoutMs: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      agent.ready.catch(async (e: unknown): Promise<never> => {
        // The agent channel closed: the VM is going down. Report why, with its console.
        await Promise.race([vm.exited, new Promise((r) => setTimeout(r, 1000))]);
        throw new VmBootError(`the VM failed before its agent was ready (${(e as Error).message})`, {
          hint: await vm.diagnostics(),
        });
      }),
      vm.exited.then(async (e): Promise<never> => {
        const how = e.signal ? `was killed by ${e.signal}` : `exited (code ${e.code})`;
        throw new VmBootError(`the VM ${how} before its agent was ready`, { hint: await vm.diagnostics() });
      }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(async () => {
          reject(
            new VmBootError(`the VM did not boot within ${timeoutMs / 1000} s`, {
              hint: `${await vm.diagnostics()}\n(raise the limit with MATCHLOCK_BOOT_TIMEOUT=seconds)`.trim(),
            }),
          );
        }, timeoutMs);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
