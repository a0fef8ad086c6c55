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
/** Docker's, but a port has at most five digits: a longer one cannot be a TCP port. */
const DOMAIN =
  /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::\d{1,5})?$|^\[[0-9a-fA-F:]+\](?::\d{1,5})?$/;
/** Docker refuses a bare image ID where a name is expected. */
const IMAGE_ID = /^[a-f0-9]{64}$/;
/** Docker's NameTotalLengthMax: `domain/path` of the normalised name. */
const MAX_NAME = 255;
/** Longer input cannot be a reference (255 + `:` + 128 + `@sha256:` + 64 < 512): refused before the regexes run. */
const MAX_INPUT = 512;

export const DEFAULT_DOMAIN = "docker.io";

/**
 * Docker's splitDockerDomain: the first component names a registry if it has a `.` or a `:`, is
 * `localhost`, or has an uppercase letter (a repository path never does).
 */
function isRegistry(first: string): boolean {
  return first.includes(".") || first.includes(":") || first === "localhost" || first !== first.toLowerCase();
}

export function parseReference(input: string): ImageRef {
  const ref = input.trim();
  const bad = (why: string) =>
    new InvalidArgumentError(
      `invalid image reference "${ref.slice(0, 80)}${ref.length > 80 ? "…" : ""}": ${why}`,
    );
  if (ref === "" || ref.length > MAX_INPUT) throw bad("empty or too long");
  if (IMAGE_ID.test(ref)) throw bad("a 64-hex-digit image ID is not a name");
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
  if (parts.length > 1 && isRegistry(first)) {
    domain = first;
    parts.shift();
    if (!DOMAIN.test(domain)) throw bad(`invalid registry "${domain}"`);
  }
  if (domain === "index.docker.io") domain = DEFAULT_DOMAIN;
  if (domain === DEFAULT_DOMAIN && parts.length === 1) parts.unshift("library");
  for (const c of parts)
    if (!COMPONENT.test(c)) throw bad(`invalid name component "${c}" (lowercase letters, digits, . _ -)`);
  const path = parts.join("/");
  // Checked on the normalised name, as Docker does: what we accept must parse again once written out.
  if (domain.length + 1 + path.length > MAX_NAME)
    throw bad(`the name is longer than ${MAX_NAME} characters once normalised`);
  if (tag === undefined && digest === undefined) tag = "latest";
  return {
    domain,
    path,
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
