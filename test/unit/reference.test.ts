import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { normalizeReference, parseReference } from "../../src/image/reference.ts";

describe("image references, normalised as Docker does", () => {
  test("short names get docker.io/library and :latest", () => {
    assert.equal(normalizeReference("alpine"), "docker.io/library/alpine:latest");
    assert.equal(normalizeReference("alpine:3.20"), "docker.io/library/alpine:3.20");
    assert.equal(normalizeReference("team/app"), "docker.io/team/app:latest");
    assert.equal(normalizeReference("index.docker.io/library/debian:12"), "docker.io/library/debian:12");
  });

  test("registries with a dot, a port or localhost are kept", () => {
    assert.equal(
      normalizeReference("registry.example:5000/team/app:1.2"),
      "registry.example:5000/team/app:1.2",
    );
    assert.equal(normalizeReference("localhost:5000/app"), "localhost:5000/app:latest");
    assert.equal(normalizeReference("127.0.0.1:5000/a/b/c:v"), "127.0.0.1:5000/a/b/c:v");
  });

  test("digests are accepted and keep any tag", () => {
    const d = `sha256:${"a".repeat(64)}`;
    assert.deepEqual(parseReference(`alpine@${d}`), {
      domain: "docker.io",
      path: "library/alpine",
      digest: d,
    });
    assert.equal(normalizeReference(`alpine:3@${d}`), `docker.io/library/alpine:3@${d}`);
  });

  test("bad references are refused with the reason", () => {
    assert.throws(() => parseReference("Alpine"), /invalid name component/);
    assert.throws(() => parseReference("alpine:"), /invalid tag/);
    assert.throws(() => parseReference("alpine@sha256:xyz"), /digest/);
    assert.throws(() => parseReference(""), /empty/);
    assert.throws(() => parseReference("a//b"), /invalid name component/);
    assert.throws(() => parseReference("../etc"), /invalid registry/);
  });
});
