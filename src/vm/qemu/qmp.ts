import type { Socket } from "node:net";
import { MatchlockError } from "../../api/errors.ts";

/**
 * A QMP client (QEMU Machine Protocol): line-delimited JSON. QEMU sends a greeting, we send
 * `qmp_capabilities`, then `{execute, arguments, id}` → `{return|error, id}`, with `{event}` lines
 * at any time. No npm package does this; it is 80 lines.
 */

export interface QmpEvent {
  event: string;
  data?: unknown;
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

const MAX_LINE = 1024 * 1024;

export class QmpClient {
  private buf = "";
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private greeted: Promise<void>;
  private onGreeting: (() => void) | undefined;
  private closedError: Error | undefined;
  private readonly waiters = new Set<(e: QmpEvent | Error) => void>();
  private readonly sock: Socket;

  constructor(sock: Socket) {
    this.sock = sock;
    this.greeted = new Promise((resolve) => {
      this.onGreeting = resolve;
    });
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => this.onData(d));
    // After `quit` QEMU closes the socket, sometimes with a reset: that is the expected end.
    sock.on("error", () => this.close("QMP connection lost"));
    sock.on("close", () => this.close("QMP connection closed"));
  }

  /** Completes the handshake. */
  async init(): Promise<void> {
    await this.greeted;
    await this.execute("qmp_capabilities");
  }

  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const msg = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.sock.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /**
   * The first event from now on that `match` accepts. Rejects when the connection closes or after
   * `timeoutMs`, naming `what`.
   */
  waitEvent(what: string, match: (e: QmpEvent) => boolean, timeoutMs: number): Promise<QmpEvent> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new MatchlockError("VM_FAILED", `QMP: no ${what} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      const waiter = (e: QmpEvent | Error): void => {
        if (!(e instanceof Error) && !match(e)) return;
        clearTimeout(timer);
        this.waiters.delete(waiter);
        if (e instanceof Error) reject(e);
        else resolve(e);
      };
      this.waiters.add(waiter);
    });
  }

  destroy(): void {
    this.sock.destroy();
  }

  private onData(d: string): void {
    this.buf += d;
    if (this.buf.length > MAX_LINE && !this.buf.includes("\n")) {
      this.close("QMP line too long");
      this.sock.destroy();
      return;
    }
    let nl = this.buf.indexOf("\n");
    while (nl >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onLine(line);
      nl = this.buf.indexOf("\n");
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    if ("QMP" in msg) {
      this.onGreeting?.();
      return;
    }
    if (typeof msg.event === "string") {
      const e = { event: msg.event, data: msg.data };
      for (const w of [...this.waiters]) w(e);
      return;
    }
    const id = typeof msg.id === "number" ? msg.id : undefined;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) return;
    this.pending.delete(id);
    if ("error" in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new MatchlockError("VM_FAILED", `QMP: ${err.class ?? "error"}: ${err.desc ?? "unknown"}`));
    } else p.resolve(msg.return);
  }

  private close(reason: string): void {
    if (this.closedError) return;
    this.closedError = new MatchlockError("VM_FAILED", reason);
    this.onGreeting?.();
    for (const p of this.pending.values()) p.reject(this.closedError);
    this.pending.clear();
    for (const w of [...this.waiters]) w(this.closedError);
  }
}
