import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { isMatchlockError } from "../../src/api/errors.ts";
import { AllowList, canonicalAddress, hostPatternProblem, matchHost } from "../../src/net/host-policy.ts";

function matches(pattern: string, yes: string[], no: string[]): void {
  for (const h of yes) assert.equal(matchHost(pattern, h), true, `${pattern} should match ${h}`);
  for (const h of no) assert.equal(matchHost(pattern, h), false, `${pattern} should not match ${h}`);
}

describe("matchHost: Matchlock's globs", () => {
  test("* matches every name and address", () => {
    matches("*", ["a.com", "x", "1.2.3.4", "2001:db8::1", ""], []);
  });

  test("*.x.com matches every subdomain but not the apex x.com", () => {
    matches(
      "*.x.com",
      ["a.x.com", "a.b.x.com", "API.X.COM"],
      ["x.com", "evilx.com", "x.com.evil.net", "a.x.co"],
    );
  });

  test("x.* matches names starting with x., not names that merely start with x", () => {
    matches("api.*", ["api.com", "api.x.com", "api.co.uk"], ["apix.com", "api", "www.api.com"]);
  });

  test("ordered wildcards: api-*.x.com", () => {
    matches(
      "api-*.x.com",
      ["api-1.x.com", "api-.x.com", "api-eu.west.x.com"],
      ["api.x.com", "api-1.x.co", "xapi-1.x.com"],
    );
  });

  test("ordered wildcards: a*b*c needs the fixed parts in order, first a prefix and last a suffix", () => {
    matches("a*b*c", ["abc", "a-b-c", "aXbYbZc", "abbc"], ["acb", "ab", "bac", "abcd", "xabc", "ac"]);
  });

  test("ordered wildcards: parts may not overlap", () => {
    matches("ab*ba", ["abba", "ab-ba"], ["aba", "ab"]);
    matches("a*aa*a", ["aaaa", "a-aa-a"], ["aaa"]);
  });

  test("anything else is an exact match", () => {
    matches("api.x.com", ["api.x.com"], ["x.com", "a.api.x.com", "api.x.com.evil", "api.x.co"]);
  });

  test("ours: case-insensitive on both sides", () => {
    matches("API.X.com", ["api.x.com", "Api.X.Com"], []);
    matches("*.X.COM", ["a.x.com"], ["x.com"]);
  });

  test("ours: one trailing dot on either side is ignored, two are not", () => {
    matches("x.com", ["x.com."], ["x.com.."]);
    matches("x.com.", ["x.com"], []);
    matches("*.x.com.", ["a.x.com", "a.x.com."], ["x.com."]);
  });

  test("IP entries match the same address in any spelling", () => {
    matches("10.0.0.1", ["10.0.0.1"], ["10.0.0.10", "10.0.0.1.x.com"]);
    matches("2001:db8::1", ["2001:DB8:0::1", "2001:db8:0:0:0:0:0:1"], ["2001:db8::2"]);
    matches("1.2.3.4", ["::ffff:1.2.3.4"], []);
    matches("10.0.0.*", ["10.0.0.7"], ["10.0.1.7"]);
  });
});

describe("canonicalAddress", () => {
  test("one spelling per address; undefined for names", () => {
    assert.equal(canonicalAddress("2001:DB8:0:0::1"), "2001:db8::1");
    assert.equal(canonicalAddress("::ffff:10.1.2.3"), "10.1.2.3");
    assert.equal(canonicalAddress("::FFFF:a01:203"), "10.1.2.3");
    assert.equal(canonicalAddress("1.2.3.4"), "1.2.3.4");
    assert.equal(canonicalAddress("fe80::1%eth0"), "fe80::1%eth0");
    assert.equal(canonicalAddress("x.com"), undefined);
    assert.equal(canonicalAddress("01.2.3.4"), undefined);
  });
});

describe("hostPatternProblem", () => {
  test("good patterns have no problem", () => {
    for (const p of [
      "x.com",
      "*",
      "*.x.com",
      "x.*",
      "api-*.x.com",
      "a*b*c",
      "my_host",
      "x.com.",
      "1.2.3.4",
      "::1",
      "2001:db8::1",
      "fe80::1%eth0",
      "10.0.0.*",
    ]) {
      assert.equal(hostPatternProblem(p), undefined, p);
    }
  });

  test("a URL is refused with the host name to write instead", () => {
    assert.equal(
      hostPatternProblem("https://api.openai.com"),
      '"https://api.openai.com" is a URL: give the host name only, like api.openai.com',
    );
    assert.match(hostPatternProblem("http://u@x.com:8080/v1?q") ?? "", /is a URL: .*like x\.com$/);
  });

  test("empty, blank, whitespace, path, port, bad characters, leading dot, empty label", () => {
    const cases: Array<[string, RegExp]> = [
      ["", /empty/],
      ["   ", /empty/],
      ["a.com b.com", /"a\.com b\.com" contains whitespace/],
      [" x.com", /whitespace/],
      ["x.com/v1", /"x\.com\/v1" has a path: .*like x\.com/],
      ["x.com:443", /"x\.com:443" has a port: .*like x\.com/],
      ["[::1]", /brackets.*like ::1/],
      ["fe80::zz", /neither a host name nor an IP address/],
      ["a@x.com", /contains "@"/],
      ["x.com?", /contains "\?"/],
      ["ex\u00e4mple.com", /contains "\u00e4"/],
      [".x.com", /starts with a dot: write \*\.x\.com/],
      ["a..x.com", /empty label/],
      [`${"a".repeat(250)}.com`, /longer than a host name/],
    ];
    for (const [p, re] of cases) assert.match(hostPatternProblem(p) ?? "(none)", re, JSON.stringify(p));
  });
});

describe("AllowList", () => {
  test("empty allows every name and every address (Matchlock)", () => {
    const list = new AllowList([]);
    assert.equal(list.isEmpty, true);
    assert.equal(list.allowsName("anything.example"), true);
    assert.equal(list.allowsAddress("203.0.113.9"), true);
  });

  test("names: allowed only by a matching pattern", () => {
    const list = new AllowList(["*.github.com", "pypi.org"]);
    assert.equal(list.allowsName("api.github.com"), true);
    assert.equal(list.allowsName("github.com"), false);
    assert.equal(list.allowsName("PYPI.org."), true);
    assert.equal(list.allowsName("evil.com"), false);
  });

  test("addresses: an entry equal to the address, in any spelling, v4-mapped unmapped", () => {
    const list = new AllowList(["203.0.113.9", "2001:db8::1", "github.com"]);
    assert.equal(list.allowsAddress("203.0.113.9"), true);
    assert.equal(list.allowsAddress("::ffff:203.0.113.9"), true);
    assert.equal(list.allowsAddress("2001:DB8:0::1"), true);
    assert.equal(list.allowsAddress("203.0.113.10"), false);
    assert.equal(list.allowsAddress("not-an-ip"), false);
  });

  test("addresses: a name pattern never allows an address; * and address globs do (Matchlock)", () => {
    assert.equal(new AllowList(["*.x.com", "x.*"]).allowsAddress("192.0.2.1"), false);
    assert.equal(new AllowList(["*"]).allowsAddress("192.0.2.1"), true);
    assert.equal(new AllowList(["192.0.2.*"]).allowsAddress("192.0.2.1"), true);
  });

  test("patterns is a copy in insertion order, spelled as given", () => {
    const list = new AllowList(["B.com", "a.com"]);
    const copy = list.patterns;
    copy.push("evil.com");
    assert.deepEqual(list.patterns, ["B.com", "a.com"]);
    assert.equal(list.allowsName("evil.com"), false);
  });

  test("add trims, dedupes case-insensitively (and trailing dots, and IP spellings), returns only the new", () => {
    const list = new AllowList(["a.com"]);
    assert.deepEqual(
      list.add([" b.com ", "A.COM", "b.com", "a.com.", "c.com", "2001:db8::1", "2001:DB8:0::1"]),
      ["b.com", "c.com", "2001:db8::1"],
    );
    assert.deepEqual(list.patterns, ["a.com", "b.com", "c.com", "2001:db8::1"]);
    assert.deepEqual(list.add(["a.com"]), []);
  });

  test("remove returns what was removed, as listed, and ignores absent patterns", () => {
    const list = new AllowList(["a.com", "B.com", "c.com"]);
    assert.deepEqual(list.remove(["b.COM", "zzz.com", "b.com"]), ["B.com"]);
    assert.deepEqual(list.patterns, ["a.com", "c.com"]);
    assert.deepEqual(list.remove(["a.com", "c.com"]), ["a.com", "c.com"]);
    assert.equal(list.isEmpty, true);
    assert.equal(list.allowsName("anything"), true);
  });

  test("a bad pattern is refused by name and nothing changes (add, remove, constructor)", () => {
    const list = new AllowList(["a.com"]);
    assert.throws(
      () => list.add(["ok.com", "https://api.openai.com", "fine.com"]),
      (e: unknown) =>
        isMatchlockError(e) &&
        e.code === "INVALID_ARGUMENT" &&
        e.message.includes('"https://api.openai.com" is a URL') &&
        e.message.includes("like api.openai.com"),
    );
    assert.deepEqual(list.patterns, ["a.com"]);
    assert.throws(() => list.remove(["a.com", "x.com:443"]), /"x\.com:443" has a port/);
    assert.deepEqual(list.patterns, ["a.com"]);
    assert.throws(() => new AllowList(["a.com", ""]), /empty/);
  });
});
