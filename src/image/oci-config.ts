import { readFileSync } from "node:fs";
import * as v from "valibot";
import { InvalidArgumentError, messageOf } from "../api/errors.ts";

/**
 * The OCI image config, as far as matchlock reads it (platform, and what shapes a run), declared
 * once with the types it must have: an archive's or a registry's config is checked against it before
 * any field is used, so a hostile `"Env": 5` is one clear error, not a crash.
 */
export const OciConfigSchema = v.looseObject({
  os: v.optional(v.string()),
  architecture: v.optional(v.string()),
  config: v.nullish(
    v.looseObject({
      Env: v.nullish(v.array(v.string())),
      Entrypoint: v.nullish(v.array(v.string())),
      Cmd: v.nullish(v.array(v.string())),
      User: v.optional(v.string()),
      WorkingDir: v.optional(v.string()),
    }),
  ),
});

export type OciConfig = v.InferOutput<typeof OciConfigSchema>;

/** Reads and checks an image config file; `what` names it in the error (e.g. the image name). */
export function readOciConfig(path: string, what: string): OciConfig {
  let doc: unknown;
  try {
    doc = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new InvalidArgumentError(`${what}: the image config is not valid JSON: ${messageOf(e)}`);
  }
  const r = v.safeParse(OciConfigSchema, doc);
  if (r.success) return r.output;
  const issue = r.issues[0];
  const at = issue?.path?.map((p) => String(p.key)).join(".");
  throw new InvalidArgumentError(
    `${what}: the image config${at ? ` at ${at}` : ""}: ${issue?.message ?? "wrong shape"}`,
  );
}
