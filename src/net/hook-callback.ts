import { connect } from "node:net";
import * as v from "valibot";
import { messageOf } from "../api/errors.ts";
import { withoutControlChars } from "../api/http-fields.ts";
import {
  type HookCallbackReply,
  HookCallbackReplySchema,
  type HookCallbackRequest,
  MAX_CALLBACK_LINE_BYTES,
} from "../api/network-hooks.ts";
import { describeIssue } from "../api/schema.ts";

/**
 * The proxy's side of Matchlock's callback protocol (research §1.7): dial the SDK program's Unix
 * socket once per call, write one JSON line, read one JSON reply (up to its newline, or to the end
 * of the connection), validate it. Every way this can go wrong is a HookCallbackError whose `kind`
 * says which, with a message fit for an event's block reason.
 */

export type HookCallbackFailure =
  /** No answer in time (dial, write and read together). */
  | "timeout"
  /** The socket is not there or refuses connections (the SDK program is gone). */
  | "unreachable"
  /** The peer broke the protocol: closed early, too long a reply, not JSON, a bad field. */
  | "protocol"
  /** The SDK answered with `error` (the hook threw, or the SDK refused the call). */
  | "callback";

export class HookCallbackError extends Error {
  readonly kind: HookCallbackFailure;
  constructor(kind: HookCallbackFailure, message: string) {
    super(message);
    this.name = "HookCallbackError";
    this.kind = kind;
  }
}

/** Text from the peer going into a message: one line, bounded. */
export function clip(s: string, max = 200): string {
  const line = withoutControlChars(s).trim();
  return line.length > max ? `${line.slice(0, max)}…` : line;
}

function parseReply(text: string): HookCallbackReply {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new HookCallbackError("protocol", `the reply is not JSON: ${clip(text, 80)}`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new HookCallbackError("protocol", "the reply is not a JSON object");
  }
  // Matchlock reads `error` first: a reply that reports an error is not checked further.
  const error = (json as { error?: unknown }).error;
  if (typeof error === "string" && error.trim() !== "") {
    throw new HookCallbackError("callback", `the callback failed: ${clip(error)}`);
  }
  const result = v.safeParse(HookCallbackReplySchema, json);
  if (!result.success) {
    throw new HookCallbackError("protocol", `bad reply: ${describeIssue(result.issues[0], "reply")}`);
  }
  return result.output;
}

/**
 * One call. Resolves with the validated reply; rejects with a HookCallbackError. The connection is
 * always closed when this settles.
 */
export function callHook(
  socketPath: string,
  request: HookCallbackRequest,
  timeoutMs: number,
): Promise<HookCallbackReply> {
  const line = `${JSON.stringify(request)}\n`;
  return new Promise((resolve, reject) => {
    const sock = connect({ path: socketPath });
    const chunks: Buffer[] = [];
    let size = 0;
    let settled = false;
    const finish = (err: HookCallbackError | undefined, text?: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      if (err) {
        reject(err);
        return;
      }
      try {
        resolve(parseReply(text as string));
      } catch (e) {
        reject(e);
      }
    };
    const timer = setTimeout(
      () => finish(new HookCallbackError("timeout", `no reply within ${timeoutMs} ms`)),
      timeoutMs,
    );
    sock.once("connect", () => sock.write(line));
    sock.on("data", (chunk: Buffer) => {
      const nl = chunk.indexOf(10);
      const piece = nl < 0 ? chunk : chunk.subarray(0, nl);
      size += piece.length;
      if (size > MAX_CALLBACK_LINE_BYTES) {
        finish(
          new HookCallbackError("protocol", `the reply is longer than ${MAX_CALLBACK_LINE_BYTES} bytes`),
        );
        return;
      }
      chunks.push(piece);
      if (nl >= 0) finish(undefined, Buffer.concat(chunks, size).toString("utf8"));
    });
    sock.on("end", () => {
      if (size === 0) {
        finish(new HookCallbackError("protocol", "the callback closed the connection without replying"));
      } else finish(undefined, Buffer.concat(chunks, size).toString("utf8"));
    });
    sock.on("error", (e: NodeJS.ErrnoException) => {
      const unreachable = ["ENOENT", "ECONNREFUSED", "ENOTSOCK", "EACCES"].includes(e.code ?? "");
      finish(
        unreachable
          ? new HookCallbackError("unreachable", `cannot connect to ${socketPath}: ${e.code}`)
          : new HookCallbackError("protocol", `the connection failed: ${messageOf(e)}`),
      );
    });
    sock.on("close", () =>
      finish(new HookCallbackError("protocol", "the callback closed the connection without replying")),
    );
  });
}
