import { type Duplex, Readable } from "node:stream";
import { bodyRewriter, type Literal, rewriteWhole, sseRewriter } from "./body-rewrite.ts";

/**
 * What after-phase hooks do to a response body, and the one helper the proxy needs to carry it out.
 * The headers that come with a plan never carry Content-Length when the body changes: `applyBodyPlan`
 * says what length to send, if one is known.
 */

export type BodyPlan =
  /** Unchanged: pipe the upstream body as it is (its Content-Length stands). */
  | { kind: "pass" }
  /** A callback's `set_body_base64` (replacements applied): send this, discard the upstream body. */
  | { kind: "set"; body: Buffer }
  /** `text/event-stream`: `data:` payloads rewritten as they stream; no Content-Length. */
  | { kind: "sse"; transform(): Duplex }
  /**
   * Any other body with replacements. Buffered up to `maxBytes` so that the length can be
   * recomputed, as Matchlock does; a longer body (or one whose result would be longer) streams
   * through `transform()` without Content-Length instead. Same bytes either way, never more than
   * `maxBytes` held.
   */
  | {
      kind: "whole";
      maxBytes: number;
      rewrite(body: Buffer): Buffer | undefined;
      transform(): Duplex;
    };

/** The buffer limit of a `whole` plan. */
export const WHOLE_BODY_MAX_BYTES = 16 * 1024 * 1024;

export function ssePlan(literals: readonly Literal[]): BodyPlan {
  return { kind: "sse", transform: () => sseRewriter(literals) };
}

export function wholePlan(literals: readonly Literal[], maxBytes = WHOLE_BODY_MAX_BYTES): BodyPlan {
  return {
    kind: "whole",
    maxBytes,
    rewrite: (body) => rewriteWhole(body, literals, maxBytes),
    transform: () => bodyRewriter(literals),
  };
}

/**
 * Reads `src` until it ends or holds more than `maxBytes`; then leaves it paused, the rest unread.
 * Rejects if the stream fails or closes before its end.
 */
export function readUpTo(
  src: Readable,
  maxBytes: number,
): Promise<{ complete: true; body: Buffer } | { complete: false; head: Buffer }> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const stop = () => {
      src.off("data", onData);
      src.off("end", onEnd);
      src.off("error", onError);
      src.off("close", onClose);
    };
    const onData = (c: Buffer) => {
      chunks.push(c);
      size += c.length;
      if (size > maxBytes) {
        src.pause();
        stop();
        resolve({ complete: false, head: Buffer.concat(chunks, size) });
      }
    };
    const onEnd = () => {
      stop();
      resolve({ complete: true, body: Buffer.concat(chunks, size) });
    };
    const onError = (e: Error) => {
      stop();
      reject(e);
    };
    const onClose = () => {
      stop();
      reject(new Error("the upstream closed before the body ended"));
    };
    src.on("data", onData);
    src.once("end", onEnd);
    src.once("error", onError);
    src.once("close", onClose);
  });
}

/**
 * Carries out a plan other than `pass` on the upstream body: the stream to send the guest, and the
 * Content-Length to send with it when it is known (otherwise send none: chunked). For `set` the
 * upstream body is discarded. Rejects when the upstream fails while a `whole` body is buffered;
 * after that, upstream errors are not forwarded into the returned stream (it is piped): the caller
 * keeps handling them as it does for an unchanged body. Pipe the result through the secret
 * scrubber last, so that text a rule or callback inserted is scrubbed too.
 */
export async function applyBodyPlan(
  plan: Exclude<BodyPlan, { kind: "pass" }>,
  upstream: Readable,
): Promise<{ body: Readable; length: number | undefined }> {
  switch (plan.kind) {
    case "set":
      upstream.resume();
      return { body: Readable.from([plan.body], { objectMode: false }), length: plan.body.length };
    case "sse":
      return { body: upstream.pipe(plan.transform()), length: undefined };
    case "whole": {
      const got = await readUpTo(upstream, plan.maxBytes);
      if (got.complete) {
        const out = plan.rewrite(got.body);
        if (out !== undefined)
          return { body: Readable.from([out], { objectMode: false }), length: out.length };
        return {
          body: Readable.from([got.body], { objectMode: false }).pipe(plan.transform()),
          length: undefined,
        };
      }
      const t = plan.transform();
      t.write(got.head);
      upstream.pipe(t);
      return { body: t, length: undefined };
    }
  }
}
