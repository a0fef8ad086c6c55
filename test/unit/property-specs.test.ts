import assert from "node:assert/strict";
import { isIP } from "node:net";
import { describe, test } from "node:test";
import fc from "fast-check";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import { parsePortSpec, validateAddress } from "../../src/api/specs.ts";
import { parseEnvFile, parseEnvSpec } from "../../src/sandbox/command.ts";
import { onlyThrows, runs } from "../helpers/property.ts";

/**
 * Property tests of the compact specs users type (`-p`, `--address`, `-e`, `--env-file`; formats in
 * PROTOCOLS.md §1): any string either parses into the documented shape or is refused with
 * InvalidArgumentError (one clear line at the CLI), never a TypeError; valid specs round-trip.
 */

/** Strings built from the characters a spec is made of, plus some noise, so parsers get deep. */
const specish = (alphabet: string[]) =>
  fc.oneof(
    fc.array(fc.constantFrom(...alphabet), { maxLength: 16 }).map((cs) => cs.join("")),
    fc.string({ maxLength: 16 }),
    fc.string({ unit: "binary", maxLength: 16 }),
  );

const port = fc.integer({ min: 1, max: 65535 });

describe("-p [LOCAL:]REMOTE: property tests", () => {
  const portChars = [..."0123456789", ":", ":", " ", "-", "+", ".", "e", "x", "٣", "\n", "\t"];

  test("any string gives local 0-65535 and remote 1-65535 whole numbers, or InvalidArgumentError", () => {
    fc.assert(
      fc.property(
        fc.oneof(
          specish(portChars),
          fc.tuple(fc.nat(), fc.nat()).map(([a, b]) => `${a}:${b}`),
        ),
        (spec) => {
          const r = onlyThrows(InvalidArgumentError, () => parsePortSpec(spec));
          if (!r.ok) return;
          const { localPort, remotePort } = r.value;
          assert.ok(
            Number.isInteger(localPort) && localPort >= 0 && localPort <= 65535,
            `local ${localPort}`,
          );
          assert.ok(
            Number.isInteger(remotePort) && remotePort >= 1 && remotePort <= 65535,
            `remote ${remotePort}`,
          );
          // What was accepted reads back the same once written canonically.
          assert.deepEqual(parsePortSpec(`${localPort}:${remotePort}`), r.value);
        },
      ),
      runs(1000),
    );
  });

  test("LOCAL:REMOTE and a bare REMOTE round-trip for every valid port, 0 meaning any local port", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 65535 }), port, (local, remote) => {
        assert.deepEqual(parsePortSpec(`${local}:${remote}`), { localPort: local, remotePort: remote });
        assert.deepEqual(parsePortSpec(String(remote)), { localPort: remote, remotePort: remote });
      }),
      runs(500),
    );
  });

  test("out-of-range and non-decimal ports are refused: 0 remote, > 65535, signs, exponents", () => {
    const bad = fc.oneof(
      fc.integer({ min: 65536, max: 2 ** 53 }).map(String),
      fc.constantFrom("0", "-1", "+80", "8e1", "0x50", "80.0", "", " ", "٨٠"),
    );
    fc.assert(
      fc.property(bad, port, (b, good) => {
        for (const spec of [b, `${good}:${b}`, `${b}:${good}:${good}`])
          assert.throws(() => parsePortSpec(spec), InvalidArgumentError, spec);
        if (b !== "0") assert.throws(() => parsePortSpec(`${b}:${good}`), InvalidArgumentError);
      }),
      runs(300),
    );
  });
});

describe("--address: property tests", () => {
  const addrChars = [..."0123456789abcdef", ".", ":", "%", "[", "]", " ", "\n", "/"];

  test("an accepted address is an IP literal or localhost, returned unchanged; anything else is InvalidArgumentError", () => {
    const ips = fc.oneof(fc.ipV4(), fc.ipV6(), fc.constant("localhost"));
    fc.assert(
      fc.property(fc.oneof(specish(addrChars), ips), (a) => {
        const r = onlyThrows(InvalidArgumentError, () => validateAddress(a));
        if (!r.ok) return;
        assert.equal(r.value, a);
        assert.ok(isIP(a) !== 0 || a === "localhost", a);
        // biome-ignore lint/suspicious/noControlCharactersInRegex: smuggled control characters are the attack
        assert.doesNotMatch(a, /[\s\u0000-\u001f]/);
      }),
      runs(1000),
    );
  });

  test("every IPv4 and IPv6 literal is accepted", () => {
    fc.assert(
      fc.property(fc.oneof(fc.ipV4(), fc.ipV6()), (a) => assert.equal(validateAddress(a), a)),
      runs(300),
    );
  });
});

describe("-e KEY[=VALUE] and --env-file: property tests", () => {
  const name = fc.stringMatching(/^[A-Za-z_][A-Za-z0-9_]{0,15}$/);
  // Names that exist on every object: a lookup of the host env must not find them there.
  const inherited = fc.constantFrom(...Object.getOwnPropertyNames(Object.prototype));
  const value = fc.string({ unit: "binary", maxLength: 24 });
  // Null-prototype host envs here: inherited names have their own test below.
  const hostEnv = fc
    .dictionary(name, fc.string({ maxLength: 8 }), { maxKeys: 4 })
    .map((d): NodeJS.ProcessEnv => Object.assign(Object.create(null) as NodeJS.ProcessEnv, d));
  const envChars = [..."AZaz_09", "=", "=", " ", "\t", "-", ".", "$", "\n", "é"];

  test("KEY=VALUE round-trips for every valid name and any value (with =, newlines, any Unicode)", () => {
    fc.assert(
      fc.property(name, value, (k, v) => assert.deepEqual(parseEnvSpec(`${k}=${v}`, {}), [k, v])),
      runs(1000),
    );
  });

  test("any -e string gives a valid name and a string value that re-forms the spec, or InvalidArgumentError", () => {
    fc.assert(
      fc.property(fc.oneof(specish(envChars), name), hostEnv, (spec, env) => {
        const r = onlyThrows(InvalidArgumentError, () => parseEnvSpec(spec, env));
        if (!r.ok) return;
        const [k, v] = r.value;
        assert.match(k, /^[A-Za-z_][A-Za-z0-9_]*$/);
        assert.equal(typeof v, "string");
        if (spec.includes("=")) assert.equal(`${k}=${v}`, spec);
        else assert.equal(v, env[k]);
      }),
      runs(1000),
    );
  });

  test("attack: a bare -e KEY named like an Object.prototype member is 'not set on the host', not a function", () => {
    fc.assert(
      fc.property(inherited, (k) => {
        const r = onlyThrows(InvalidArgumentError, () => parseEnvSpec(k, {}));
        assert.ok(!r.ok, `${k} gave ${r.ok ? typeof r.value[1] : ""}`);
      }),
      runs(50),
    );
  });

  test("an env file of KEY=VALUE lines, comments, blank and CRLF lines gives exactly its entries", () => {
    // Values without surrounding whitespace or line breaks: lines are trimmed.
    const val = value.map((v) => v.replace(/[\r\n]/g, "").trim());
    const line = fc.oneof(
      { weight: 4, arbitrary: fc.tuple(name, val).map(([k, v]) => ({ entry: [k, v] as [string, string] })) },
      {
        weight: 1,
        arbitrary: fc.constantFrom("", "   ", "# comment", "  # KEY=no", "\t").map((text) => ({ text })),
      },
    );
    fc.assert(
      fc.property(fc.array(line, { maxLength: 10 }), fc.constantFrom("\n", "\r\n"), (lines, eol) => {
        const text = lines.map((l) => ("entry" in l ? `${l.entry[0]}=${l.entry[1]}` : l.text)).join(eol);
        const want = lines.flatMap((l) => ("entry" in l ? [l.entry] : []));
        assert.deepEqual(parseEnvFile(text, "f.env", {}), want);
      }),
      runs(500),
    );
  });

  test("any env file text gives string pairs, or InvalidArgumentError naming the file and line", () => {
    const text = fc
      .array(fc.oneof(specish(envChars), fc.constantFrom("# x", "", "\r")), { maxLength: 8 })
      .map((ls) => ls.join("\n"));
    fc.assert(
      fc.property(text, hostEnv, (t, env) => {
        try {
          for (const [k, v] of parseEnvFile(t, "f.env", env)) {
            assert.match(k, /^[A-Za-z_][A-Za-z0-9_]*$/);
            assert.equal(typeof v, "string");
          }
        } catch (e) {
          assert.ok(e instanceof InvalidArgumentError, String(e));
          assert.match(e.message, /^f\.env:\d+: /);
        }
      }),
      runs(1000),
    );
  });
});
