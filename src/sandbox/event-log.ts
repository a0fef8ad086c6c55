import { appendFileSync, renameSync, statSync } from "node:fs";
import type { SandboxEvent } from "../api/events.ts";

/**
 * A VM's decisions: every event goes to `events.jsonl` in the VM dir (what `matchlock events` reads,
 * live or after the fact) and to whoever subscribed (the RPC server's `event` notifications). The
 * file is bounded: past MAX_BYTES it becomes `events.jsonl.1` (one generation kept), so a guest
 * that hammers blocked hosts cannot fill the disk. Subscribers must not block: each decides itself
 * what to drop when its reader is slow.
 */

export const EVENTS_FILE = "events.jsonl";
const MAX_BYTES = 8 * 1024 * 1024;

export class EventLog {
  private readonly file: string | undefined;
  private size: number;
  private readonly listeners = new Set<(e: SandboxEvent) => void>();

  constructor(file?: string) {
    this.file = file;
    let size = 0;
    try {
      if (file) size = statSync(file).size;
    } catch {}
    this.size = size;
  }

  emit(e: SandboxEvent): void {
    if (this.file) {
      const line = `${JSON.stringify(e)}\n`;
      try {
        if (this.size + line.length > MAX_BYTES) {
          renameSync(this.file, `${this.file}.1`);
          this.size = 0;
        }
        appendFileSync(this.file, line);
        this.size += Buffer.byteLength(line);
      } catch {
        // the VM dir is going away (close): the event still reaches subscribers
      }
    }
    for (const l of this.listeners) {
      try {
        l(e);
      } catch {}
    }
  }

  subscribe(listener: (e: SandboxEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}
