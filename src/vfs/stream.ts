import type { Duplex } from "node:stream";
import { IN_HEADER_SIZE } from "./fuse-abi.ts";
import type { FuseServer } from "./server.ts";

/**
 * Serves a FuseServer over a byte stream (the virtio-serial port's socket): the guest relay writes
 * the raw FUSE requests it reads from /dev/fuse one after the other, and reads back the raw replies.
 * No extra framing is needed: every FUSE message starts with its own length (u32 LE), so requests
 * are cut on that field, and replies carry theirs for the relay to cut.
 *
 * Bounded: at most one partial request is buffered (≤ server.maxMessageSize), and at most
 * `maxInFlight` requests are answered at once (the stream is paused beyond). A length below the
 * header size or above the limit cannot be resynchronised: the stream is destroyed and `done`
 * resolves with the reason.
 */

export interface StreamOptions {
  /** Requests answered concurrently before reading pauses (default 64). */
  maxInFlight?: number;
}

export interface Served {
  /** Resolves when the stream ends or is refused; with the reason if the guest broke the framing. */
  done: Promise<string | undefined>;
  /** Requests handled so far. */
  readonly requests: number;
  /** Sends notifications (FuseServer.invalidate) to the guest kernel through the relay. */
  notify(messages: Buffer[]): void;
}

export function serveStream(server: FuseServer, stream: Duplex, options: StreamOptions = {}): Served {
  const maxInFlight = options.maxInFlight ?? 64;
  let pending: Buffer[] = [];
  let pendingLen = 0;
  let inFlight = 0;
  let requests = 0;
  let broken: string | undefined;
  let finish: (reason: string | undefined) => void = () => {};
  const done = new Promise<string | undefined>((resolve) => {
    finish = resolve;
  });

  const take = (n: number): Buffer => {
    const all = pending.length === 1 ? (pending[0] as Buffer) : Buffer.concat(pending, pendingLen);
    const msg = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    pending = rest.length > 0 ? [rest] : [];
    pendingLen = rest.length;
    return msg;
  };

  const pump = () => {
    while (!broken && pendingLen >= 4 && inFlight < maxInFlight) {
      const head = pending[0] as Buffer;
      const len = head.length >= 4 ? head.readUInt32LE(0) : Buffer.concat(pending, 4).readUInt32LE(0);
      if (len < IN_HEADER_SIZE || len > server.maxMessageSize) {
        broken = `request length ${len} outside ${IN_HEADER_SIZE}..${server.maxMessageSize}`;
        stream.destroy();
        return;
      }
      if (pendingLen < len) break;
      const msg = take(len);
      requests++;
      inFlight++;
      void server.handle(msg).then((reply) => {
        inFlight--;
        if (reply && !stream.destroyed) stream.write(reply);
        if (inFlight < maxInFlight && stream.isPaused()) stream.resume();
        pump();
      });
    }
    if (inFlight >= maxInFlight) stream.pause();
  };

  stream.on("data", (chunk: Buffer) => {
    if (broken) return;
    pending.push(chunk);
    pendingLen += chunk.length;
    pump();
  });
  stream.on("error", () => {});
  stream.on("close", () => finish(broken));
  return {
    done,
    get requests() {
      return requests;
    },
    notify: (messages) => {
      for (const m of messages) if (!stream.destroyed) stream.write(m);
    },
  };
}
