import assert from "node:assert/strict";
import { describe, test } from "node:test";
import fc from "fast-check";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import { formatReference, normalizeReference, parseReference } from "../../src/image/reference.ts";
import { onlyThrows, runs } from "../helpers/property.ts";

/**
 * Property tests of image references. The oracle is a direct port of Docker's normaliser
 * (distribution/reference: ParseNormalizedNamed, splitDockerDomain, ReferenceRegexp, NameTotalLengthMax,
 * then TagNameOnly), with three deliberate differences: we accept only sha256 digests and ports of at
 * most five digits, and where the first component is taken for a registry but is not a valid host
 * (`0.0_a/app`) we refuse, where Docker falls back to a name with no registry at all.
 */

const COMPONENT = "[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*";
const DOMAIN_COMPONENT = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const DOMAIN = `(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[a-fA-F0-9:]+\\])(?::[0-9]{1,5})?`;
const REFERENCE = new RegExp(
  `^((?:${DOMAIN}/)?${COMPONENT}(?:/${COMPONENT})*)(?::([\\w][\\w.-]{0,127}))?(?:@(sha256:[a-f0-9]{64}))?$`,
);

/** Docker's answer: the normalised string, or undefined where Docker refuses the reference. */
function docker(s: string): string | undefined {
  if (/^[a-f0-9]{64}$/.test(s)) return undefined; // "cannot specify 64-byte hexadecimal strings"
  const i = s.indexOf("/");
  const first = s.slice(0, Math.max(i, 0));
  let [domain, rest] =
    i === -1 || (!/[.:]/.test(first) && first !== "localhost" && first.toLowerCase() === first)
      ? ["docker.io", s]
      : [first, s.slice(i + 1)];
  if (!new RegExp(`^${DOMAIN}$`).test(domain)) return undefined; // Docker: no registry; we: refused
  if (domain === "index.docker.io") domain = "docker.io";
  if (domain === "docker.io" && !rest.includes("/")) rest = `library/${rest}`;
  const remoteName = rest.includes(":") ? rest.slice(0, rest.indexOf(":")) : rest;
  if (remoteName.toLowerCase() !== remoteName) return undefined;
  const m = REFERENCE.exec(`${domain}/${rest}`);
  if (!m || (m[1] as string).length > 255) return undefined;
  const tag = m[2] ?? (m[3] === undefined ? "latest" : undefined);
  return `${m[1]}${tag === undefined ? "" : `:${tag}`}${m[3] === undefined ? "" : `@${m[3]}`}`;
}

const hex64 = fc.stringMatching(/^[a-f0-9]{64}$/);
const component = fc.oneof(
  { weight: 6, arbitrary: fc.stringMatching(new RegExp(`^${COMPONENT}$`)).filter((c) => c.length < 40) },
  {
    weight: 1,
    arbitrary: fc.constantFrom("library", "A", "a..b", "a__b", "a___b", "-a", "a-", "", "x y", "é", "a:b"),
  },
  { weight: 1, arbitrary: hex64 },
);
const domain = fc.oneof(
  fc.constantFrom("docker.io", "index.docker.io", "localhost", "localhost:5000", "registry.example:5000"),
  fc.constantFrom("[::1]:5000", "[abcd]", "Foo", "UPPER.io", "a_b", "host:99999", "host:", "127.0.0.1:5000"),
  fc.stringMatching(new RegExp(`^${DOMAIN}$`)).filter((d) => d.length < 40),
);
const tag = fc.oneof(
  fc.stringMatching(/^[\w][\w.-]{0,20}$/),
  fc.constantFrom("latest", "-bad", "", ".x", "a".repeat(128), "a".repeat(129)),
);
const digest = fc.oneof(
  hex64.map((h) => `sha256:${h}`),
  fc.constantFrom(`sha256:${"A".repeat(64)}`, "sha256:abc", `sha512:${"a".repeat(128)}`, ""),
);

/** References assembled from valid and invalid parts, some long enough to pass Docker's 255-byte name limit. */
const refish = fc
  .record({
    domain: fc.option(domain, { nil: undefined }),
    path: fc.array(component, { minLength: 1, maxLength: 4 }),
    long: fc.option(fc.integer({ min: 200, max: 260 }), { freq: 5, nil: undefined }),
    tag: fc.option(tag, { nil: undefined }),
    digest: fc.option(digest, { freq: 3, nil: undefined }),
  })
  .map((r) => {
    const path = r.long === undefined ? r.path : [...r.path, "a".repeat(r.long)];
    return (
      (r.domain === undefined ? "" : `${r.domain}/`) +
      path.join("/") +
      (r.tag === undefined ? "" : `:${r.tag}`) +
      (r.digest === undefined ? "" : `@${r.digest}`)
    );
  });

const anyRef = fc.oneof(
  { weight: 4, arbitrary: refish },
  { weight: 1, arbitrary: fc.string({ maxLength: 40 }) },
  { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 40 }) },
);

describe("image references: property tests", () => {
  test("normalisation agrees with Docker's: same canonical name, or both refuse", () => {
    fc.assert(
      fc.property(refish, (s) => {
        const ours = onlyThrows(InvalidArgumentError, () => normalizeReference(s));
        assert.equal(ours.ok ? ours.value : undefined, docker(s));
      }),
      runs(1000),
    );
  });

  test("any string gives a well-formed reference or InvalidArgumentError, never another error", () => {
    fc.assert(
      fc.property(anyRef, (s) => {
        const r = onlyThrows(InvalidArgumentError, () => parseReference(s));
        if (!r.ok) return;
        const { domain: d, path, tag: t, digest: g } = r.value;
        assert.match(d, new RegExp(`^${DOMAIN}$`));
        for (const c of path.split("/")) assert.match(c, new RegExp(`^${COMPONENT}$`));
        assert.ok(t !== undefined || g !== undefined, "a tag or a digest");
        if (t !== undefined) assert.match(t, /^[\w][\w.-]{0,127}$/);
        if (g !== undefined) assert.match(g, /^sha256:[a-f0-9]{64}$/);
        assert.ok(`${d}/${path}`.length <= 255, "Docker's name length limit");
      }),
      runs(1000),
    );
  });

  test("normalising twice changes nothing, and parse(format(r)) gives r back", () => {
    fc.assert(
      fc.property(anyRef, (s) => {
        const r = onlyThrows(InvalidArgumentError, () => parseReference(s));
        if (!r.ok) return;
        const once = formatReference(r.value);
        assert.equal(normalizeReference(once), once);
        assert.deepEqual(parseReference(once), r.value);
      }),
      runs(1000),
    );
  });
});

describe("image references: the Docker rules the properties found missing", () => {
  test("a name over Docker's 255 characters once normalised is refused up front, so what is accepted always parses again", () => {
    const long = `team/${"a".repeat(245)}`;
    assert.throws(() => parseReference(long), /longer than 255/);
    assert.equal(normalizeReference(`team/${"a".repeat(235)}`).length, "docker.io/team/".length + 235 + 7);
  });

  test("an uppercase first component names a registry, as in Docker", () => {
    assert.equal(normalizeReference("MyRegistry/app"), "MyRegistry/app:latest");
  });

  test("a bare 64-hex image ID is not a name", () => {
    assert.throws(() => parseReference("a".repeat(64)), /image ID/);
    assert.equal(normalizeReference(`x/${"a".repeat(64)}`), `docker.io/x/${"a".repeat(64)}:latest`);
  });

  test("a bracketed non-IPv6 first component is not a registry", () => {
    assert.throws(() => parseReference("[abcd]/app"), InvalidArgumentError);
  });
});
