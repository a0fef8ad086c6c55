import { InvalidArgumentError } from "../api/errors.ts";

/**
 * Image references, normalised as Docker does: `alpine` → `docker.io/library/alpine:latest`,
 * `registry:5000/team/app:1.2` stays, `name@sha256:<hex>` pins a digest.
 */

export interface ImageRef {
  /** Registry host[:port]. */
  domain: string;
  /** Repository path inside the registry (`library/alpine`). */
  path: string;
  tag?: string;
  digest?: string;
}

const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const DIGEST = /^sha256:[a-f0-9]{64}$/;
const DOMAIN =
  /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::\d{1,5})?$|^\[[0-9a-fA-F:]+\](?::\d{1,5})?$/;

export const DEFAULT_DOMAIN = "docker.io";

export function parseReference(input: string): ImageRef {
  const ref = input.trim();
  const bad = (why: string) => new InvalidArgumentError(`invalid image reference "${input}": ${why}`);
  if (ref === "" || ref.length > 512) throw bad("empty or too long");
  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) throw bad("the digest must be sha256:<64 hex characters>");
  }
  let tag: string | undefined;
  const lastSlash = rest.lastIndexOf("/");
  const colon = rest.lastIndexOf(":");
  if (colon > lastSlash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag)) throw bad(`invalid tag "${tag}"`);
  }
  const parts = rest.split("/");
  let domain = DEFAULT_DOMAIN;
  const first = parts[0] ?? "";
  if (
    parts.length > 1 &&
    (first.includes(".") || first.includes(":") || first === "localhost" || first.startsWith("["))
  ) {
    domain = first;
    parts.shift();
    if (!DOMAIN.test(domain)) throw bad(`invalid registry "${domain}"`);
  }
  if (domain === "index.docker.io") domain = DEFAULT_DOMAIN;
  if (domain === DEFAULT_DOMAIN && parts.length === 1) parts.unshift("library");
  for (const c of parts)
    if (!COMPONENT.test(c)) throw bad(`invalid name component "${c}" (lowercase letters, digits, . _ -)`);
  if (tag === undefined && digest === undefined) tag = "latest";
  return {
    domain,
    path: parts.join("/"),
    ...(tag === undefined ? {} : { tag }),
    ...(digest === undefined ? {} : { digest }),
  };
}

/** The canonical string: `docker.io/library/alpine:latest`, `host/x@sha256:…`, `host/x:tag@sha256:…`. */
export function formatReference(r: ImageRef): string {
  return `${r.domain}/${r.path}${r.tag === undefined ? "" : `:${r.tag}`}${r.digest === undefined ? "" : `@${r.digest}`}`;
}

export function normalizeReference(input: string): string {
  return formatReference(parseReference(input));
}
