import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import type { Transform } from "node:stream";
import { describe, test } from "node:test";
import { inspect } from "node:util";
import { isMatchlockError } from "../../src/api/errors.ts";
import { ScrubStream } from "../../src/net/scrub.ts";
import {
  MIN_SECRET_LENGTH,
  newPlaceholder,
  PLACEHOLDER_PREFIX,
  type RequestVerdict,
  type Secret,
  SecretBook,
  scrubber,
  scrubText,
  validateSecret,
} from "../../src/net/secrets.ts";

const OPENAI = "sk-proj-REALVALUE-openai-0123456789";
const GITHUB = "ghp_REALVALUE_github_abcdefghijklmnop";

function secret(name: string, value: string, hosts: string[], placeholder = newPlaceholder()): Secret {
  return { name, value, placeholder, hosts };
}

function sent(v: RequestVerdict): { rawHeaders: string[]; url: string; swapped: Secret[] } {
  if ("leak" in v) assert.fail(`unexpected leak of ${v.leak}`);
  return v;
}

describe("placeholders", () => {
  test("prefix plus 32 lower-case hex digits, fresh each time", () => {
    const a = newPlaceholder();
    assert.match(a, /^SANDBOX_SECRET_[0-9a-f]{32}$/);
    assert.ok(a.startsWith(PLACEHOLDER_PREFIX));
    assert.notEqual(a, newPlaceholder());
  });
});

describe("prepareRequest: swap", () => {
  const key = secret("OPENAI_API_KEY", OPENAI, ["api.openai.com"]);
  const book = new SecretBook([key]);
  const P = key.placeholder;

  test("swaps in header values and the query toward a secret host", () => {
    const v = sent(
      book.prepareRequest(
        "api.openai.com",
        ["Authorization", `Bearer ${P}`, "X-Other", "keep"],
        `/v1/models?key=${P}&x=1`,
      ),
    );
    assert.deepEqual(v.rawHeaders, ["Authorization", `Bearer ${OPENAI}`, "X-Other", "keep"]);
    assert.equal(v.url, `/v1/models?key=${OPENAI}&x=1`);
    assert.deepEqual(
      v.swapped.map((s) => s.name),
      ["OPENAI_API_KEY"],
    );
  });

  test("a placeholder in the path toward the secret host is left alone (servers log paths)", () => {
    const v = sent(book.prepareRequest("api.openai.com", [], `/v1/${P}/x?${P}`));
    assert.equal(v.url, `/v1/${P}/x?${OPENAI}`);
    const pathOnly = sent(book.prepareRequest("api.openai.com", [], `/v1/${P}`));
    assert.equal(pathOnly.url, `/v1/${P}`);
    assert.deepEqual(pathOnly.swapped, []);
  });

  test("a placeholder in a header name toward the secret host is never swapped", () => {
    const v = sent(book.prepareRequest("api.openai.com", [`X-${P}`, "v"], "/"));
    assert.deepEqual(v.rawHeaders, [`X-${P}`, "v"]);
    assert.deepEqual(v.swapped, []);
  });

  test("host globs and case apply: a subdomain pattern, an upper-case Host", () => {
    const b = new SecretBook([secret("K", OPENAI, ["*.openai.com"], "PH_K_123")]);
    assert.deepEqual(sent(b.prepareRequest("API.OpenAI.com", ["a", "PH_K_123"], "/")).rawHeaders, [
      "a",
      OPENAI,
    ]);
    assert.deepEqual(b.prepareRequest("openai.com", ["a", "PH_K_123"], "/"), { leak: "K" });
  });

  test("the value is percent-encoded in the query, so the server decodes exactly the value", () => {
    const b = new SecretBook([secret("B64", "ab+/cd==&e f#", [], "PH_B64")]);
    const v = sent(b.prepareRequest("x.com", ["h", "PH_B64"], "/p?k=PH_B64"));
    assert.equal(v.url, `/p?k=${encodeURIComponent("ab+/cd==&e f#")}`);
    assert.equal(new URL(v.url, "http://x").searchParams.get("k"), "ab+/cd==&e f#");
    assert.deepEqual(v.rawHeaders, ["h", "ab+/cd==&e f#"]);
  });

  test("no placeholder: the request is unchanged and nothing is swapped", () => {
    const headers = ["Host", "api.openai.com", "Accept", "*/*"];
    assert.deepEqual(book.prepareRequest("evil.com", headers, "/a?b=c"), {
      rawHeaders: headers,
      url: "/a?b=c",
      swapped: [],
    });
    assert.deepEqual(new SecretBook([]).prepareRequest("x", headers, "/"), {
      rawHeaders: headers,
      url: "/",
      swapped: [],
    });
  });

  test("empty hosts means every host (Matchlock)", () => {
    const any = new SecretBook([secret("ANY", OPENAI, [], "PH_ANY")]);
    for (const host of ["a.com", "evil.example", "203.0.113.5"]) {
      assert.deepEqual(sent(any.prepareRequest(host, ["x", "PH_ANY"], "/")).rawHeaders, ["x", OPENAI]);
    }
  });

  test("two secrets in one request are both swapped, each toward its own host", () => {
    const a = secret("A", OPENAI, ["api.x.com"]);
    const b = secret("B", GITHUB, ["api.x.com", "github.com"]);
    const two = new SecretBook([a, b]);
    const v = sent(
      two.prepareRequest(
        "api.x.com",
        ["h", `${a.placeholder}:${b.placeholder}`],
        `/?a=${a.placeholder}&b=${b.placeholder}`,
      ),
    );
    assert.deepEqual(v.rawHeaders, ["h", `${OPENAI}:${GITHUB}`]);
    assert.equal(v.url, `/?a=${OPENAI}&b=${GITHUB}`);
    assert.deepEqual(
      v.swapped.map((s) => s.name),
      ["A", "B"],
    );
  });

  test("user-given placeholders that prefix one another: the longest wins at each position", () => {
    const short = secret("SHORT", OPENAI, ["x.com"], "TOKEN");
    const long = secret("LONG", GITHUB, ["x.com"], "TOKEN_LONG");
    const b = new SecretBook([short, long]);
    const v = sent(b.prepareRequest("x.com", ["h", "TOKEN_LONG TOKEN TOKENTOKEN_LONG"], "/?TOKEN_LONG"));
    assert.equal(v.rawHeaders[1], `${GITHUB} ${OPENAI} ${OPENAI}${GITHUB}`);
    assert.equal(v.url, `/?${GITHUB}`);
  });

  test("a value that looks like another placeholder is not swapped again", () => {
    const a = secret("A", "PH_B_value_x", [], "PH_A");
    const b = secret("B", GITHUB, [], "PH_B");
    const v = sent(new SecretBook([a, b]).prepareRequest("x.com", ["h", "PH_A"], "/"));
    assert.equal(v.rawHeaders[1], "PH_B_value_x");
  });
});

describe("prepareRequest: leaks toward a host the secret is not for", () => {
  const key = secret("OPENAI_API_KEY", OPENAI, ["api.openai.com"]);
  const book = new SecretBook([key]);
  const P = key.placeholder;
  const leak = { leak: "OPENAI_API_KEY" };

  test("in a header value", () => {
    assert.deepEqual(book.prepareRequest("evil.com", ["Authorization", `Bearer ${P}`], "/"), leak);
  });
  test("in a header name", () => {
    assert.deepEqual(book.prepareRequest("evil.com", [`X-${P}`, "1"], "/"), leak);
  });
  test("in the path", () => {
    assert.deepEqual(book.prepareRequest("evil.com", [], `/steal/${P}`), leak);
  });
  test("in the query", () => {
    assert.deepEqual(book.prepareRequest("evil.com", [], `/?q=${P}`), leak);
  });
  test("in an absolute-form request target", () => {
    assert.deepEqual(book.prepareRequest("evil.com", [], `http://evil.com/${P}`), leak);
  });
  test("apex of a subdomain pattern is another host", () => {
    const sub = new SecretBook([secret("S", OPENAI, ["*.openai.com"], "PH_S")]);
    assert.deepEqual(sub.prepareRequest("openai.com", ["a", "PH_S"], "/"), { leak: "S" });
  });
  test("one leaking secret blocks the request even if another is fine there", () => {
    const a = secret("A", OPENAI, ["a.com"]);
    const b = secret("B", GITHUB, ["b.com"]);
    const v = new SecretBook([a, b]).prepareRequest("a.com", ["x", a.placeholder, "y", b.placeholder], "/");
    assert.deepEqual(v, { leak: "B" });
  });
  test("the verdict names the secret, never its value", () => {
    const v = book.prepareRequest("evil.com", ["a", P], "/");
    assert.ok(!JSON.stringify(v).includes(OPENAI));
  });
});

describe("validateSecret and SecretBook", () => {
  const ok = (): Secret => secret("API_KEY", OPENAI, ["api.x.com"], "PH_1");

  test("a good secret passes", () => {
    validateSecret(ok());
    validateSecret({ ...ok(), hosts: [] });
  });

  test("each bad field is refused, naming the secret and never including the value", () => {
    const cases: Array<[Partial<Secret>, RegExp]> = [
      [{ name: "1ABC" }, /secret name "1ABC" is not an environment variable name/],
      [{ name: "A-B" }, /not an environment variable name/],
      [{ name: "" }, /not an environment variable name/],
      [{ value: "" }, /secret API_KEY: the value is empty/],
      [{ value: `${OPENAI}\r\nX-Evil: 1` }, /API_KEY: .*line break/],
      [{ value: `${OPENAI}\n` }, /line break/],
      [{ value: `${OPENAI}\0` }, /NUL/],
      [{ value: `${OPENAI}\x01` }, /printable ASCII/],
      [{ value: `${OPENAI}\u00e9` }, /printable ASCII/],
      [{ value: "short" }, new RegExp(`shorter than ${MIN_SECRET_LENGTH}`)],
      [{ placeholder: "" }, /placeholder is empty/],
      [{ placeholder: "PH 1" }, /placeholder "PH 1" may hold only/],
      [{ placeholder: "PH/1" }, /may hold only/],
      [{ placeholder: `X_${OPENAI}` }, /placeholder contains the value/],
      [{ hosts: ["https://api.x.com"] }, /API_KEY: invalid host pattern: "https:\/\/api\.x\.com" is a URL/],
      [{ hosts: ["x.com:443"] }, /has a port/],
    ];
    for (const [change, re] of cases) {
      const s = { ...ok(), ...change };
      assert.throws(
        () => validateSecret(s),
        (e: unknown) => {
          assert.ok(isMatchlockError(e) && e.code === "INVALID_ARGUMENT", String(e));
          assert.match(e.message, re);
          assert.ok(!e.message.includes(OPENAI), `value in: ${e.message}`);
          return true;
        },
      );
      assert.throws(() => new SecretBook([s]), re);
    }
  });

  test("two secrets with one placeholder, or one name twice, are refused", () => {
    assert.throws(
      () => new SecretBook([secret("A", OPENAI, [], "PH"), secret("B", GITHUB, [], "PH")]),
      /secrets A and B have the same placeholder/,
    );
    assert.throws(
      () => new SecretBook([secret("A", OPENAI, []), secret("A", GITHUB, [])]),
      /secret A is given twice/,
    );
  });

  test("env gives the guest placeholders; hosts gives every pattern once", () => {
    const a = secret("A", OPENAI, ["api.x.com", "*.y.com"]);
    const b = secret("B", GITHUB, ["API.x.com", "github.com"]);
    const c = secret("C", `${GITHUB}c`, []);
    const book = new SecretBook([a, b, c]);
    assert.deepEqual(book.env(), { A: a.placeholder, B: b.placeholder, C: c.placeholder });
    assert.deepEqual(book.hosts(), ["api.x.com", "*.y.com", "github.com"]);
    assert.equal(book.isEmpty, false);
    assert.equal(new SecretBook([]).isEmpty, true);
  });

  test("the book copies its input: later changes to the caller's objects do nothing", () => {
    const a = secret("A", OPENAI, ["a.com"], "PH_A");
    const book = new SecretBook([a]);
    a.hosts.push("evil.com");
    a.value = "changed-value-xyz";
    assert.deepEqual(book.prepareRequest("evil.com", ["h", "PH_A"], "/"), { leak: "A" });
    assert.equal(sent(book.prepareRequest("a.com", ["h", "PH_A"], "/")).rawHeaders[1], OPENAI);
  });
});

describe("values never show", () => {
  const a = secret("A", OPENAI, ["a.com"], "PH_A");
  const book = new SecretBook([a, secret("B", GITHUB, [])]);

  test("not in JSON.stringify, String or util.inspect of a book", () => {
    for (const text of [
      JSON.stringify(book),
      String(book),
      `${book}`,
      inspect(book),
      inspect({ book }, { depth: 9 }),
    ]) {
      assert.ok(!text.includes(OPENAI) && !text.includes(GITHUB), text);
    }
    assert.deepEqual(JSON.parse(JSON.stringify(book))[0], {
      name: "A",
      placeholder: "PH_A",
      hosts: ["a.com"],
    });
    assert.match(inspect(book), /PH_A/);
  });

  test("not in JSON.stringify or util.inspect of the swapped secrets the proxy gets back", () => {
    const v = sent(book.prepareRequest("a.com", ["h", "PH_A"], "/"));
    assert.equal(v.swapped[0]?.value, OPENAI);
    assert.ok(!JSON.stringify(v.swapped).includes(OPENAI));
    assert.ok(!inspect(v.swapped).includes(OPENAI));
  });

  test("not in the scrubber's inspect output", () => {
    const s = scrubber([a]) as Transform;
    assert.ok(!inspect(s, { depth: 5 }).includes(OPENAI));
  });
});

/** Writes the chunks (waiting for each to be taken) and collects the output. */
async function pipeThrough(t: Transform, chunks: readonly Buffer[]): Promise<Buffer> {
  const out: Buffer[] = [];
  t.on("data", (b: Buffer) => out.push(b));
  const ended = new Promise((resolve, reject) => {
    t.on("end", resolve);
    t.on("error", reject);
  });
  for (const c of chunks)
    await new Promise<void>((resolve, reject) => t.write(c, (e) => (e ? reject(e) : resolve())));
  t.end();
  await ended;
  return Buffer.concat(out);
}

/** The reference: one-shot, leftmost then longest, on Latin-1 text (a byte-exact view of any buffer). */
function reference(input: Buffer, swapped: readonly Secret[]): Buffer {
  return Buffer.from(scrubText(input.toString("latin1"), swapped), "latin1");
}

describe("scrubber: real values back to placeholders in a response body", () => {
  const a = secret("A", OPENAI, [], "PH_A");
  const g = secret("G", GITHUB, [], "PH_G");
  const input = Buffer.concat([
    Buffer.from(`{"echo":"${OPENAI}","also":"${GITHUB}${OPENAI}","x":"${OPENAI.slice(0, -1)}"}`),
    Buffer.from([0, 255, 0xc3, 0x28, 10, 13]),
    Buffer.from(`${OPENAI}`),
  ]);
  const expected = Buffer.concat([
    Buffer.from(`{"echo":"PH_A","also":"PH_GPH_A","x":"${OPENAI.slice(0, -1)}"}`),
    Buffer.from([0, 255, 0xc3, 0x28, 10, 13]),
    Buffer.from("PH_A"),
  ]);

  test("a value echoed as the query carried it (percent-encoded) is scrubbed too", async () => {
    const b64 = secret("B", "dG9r+ZW4/x==", [], "PH_B");
    const v = sent(new SecretBook([b64]).prepareRequest("h.test", [], "/q?k=PH_B"));
    assert.equal(v.url, "/q?k=dG9r%2BZW4%2Fx%3D%3D");
    const echoed = Buffer.from(`{"query":"k=dG9r%2BZW4%2Fx%3D%3D","raw":"dG9r+ZW4/x=="}`);
    const got = await pipeThrough(scrubber(v.swapped) as Transform, [echoed]);
    assert.equal(got.toString(), `{"query":"k=PH_B","raw":"PH_B"}`);
    assert.equal(scrubText("k=dG9r%2BZW4%2Fx%3D%3D", v.swapped), "k=PH_B");
  });

  test("nothing swapped: no stream", () => {
    assert.equal(scrubber([]), undefined);
  });

  test("one chunk", async () => {
    assert.deepEqual(await pipeThrough(scrubber([a, g]) as Transform, [input]), expected);
    assert.deepEqual(reference(input, [a, g]), expected);
  });

  test("a value straddling any split point of two chunks", async () => {
    for (let i = 0; i <= input.length; i++) {
      const got = await pipeThrough(scrubber([a, g]) as Transform, [input.subarray(0, i), input.subarray(i)]);
      assert.deepEqual(got, expected, `split at ${i}`);
    }
  });

  test("every pair of split points (three chunks)", async () => {
    const small = Buffer.from(`x${OPENAI}${OPENAI}y`);
    const want = Buffer.from("xPH_APH_Ay");
    for (let i = 0; i <= small.length; i++) {
      for (let j = i; j <= small.length; j++) {
        const chunks = [small.subarray(0, i), small.subarray(i, j), small.subarray(j)];
        assert.deepEqual(await pipeThrough(scrubber([a]) as Transform, chunks), want, `splits ${i},${j}`);
      }
    }
  });

  test("1-byte chunks", async () => {
    const bytes = [...input].map((b) => Buffer.from([b]));
    assert.deepEqual(await pipeThrough(scrubber([a, g]) as Transform, bytes), expected);
  });

  test("a value inside a longer one: the longer match starting earlier wins, across every split", async () => {
    const outer = secret("OUTER", "abcdefghij", [], "[O]");
    const inner = secret("INNER", "cdefgh", [], "[I]");
    const text = Buffer.from("..abcdefghij..cdefgh..abcdefgh..abcdefghi");
    const want = reference(text, [outer, inner]);
    assert.equal(want.toString(), "..[O]..[I]..ab[I]..ab[I]i");
    for (let i = 0; i <= text.length; i++) {
      const got = await pipeThrough(scrubber([inner, outer]) as Transform, [
        text.subarray(0, i),
        text.subarray(i),
      ]);
      assert.deepEqual(got.toString(), want.toString(), `split at ${i}`);
    }
  });

  test("a value that is a prefix of another: at one position the longer wins, across every split", async () => {
    const short = secret("SHORT", "prefix-value", [], "[S]");
    const long = secret("LONG", "prefix-value-longer", [], "[L]");
    const text = Buffer.from("prefix-value-longer prefix-value prefix-value-long");
    const want = "[L] [S] [S]-long";
    assert.equal(reference(text, [short, long]).toString(), want);
    assert.equal(scrubText(text.toString(), [short, long]), want);
    for (let i = 0; i <= text.length; i++) {
      const got = await pipeThrough(scrubber([short, long]) as Transform, [
        text.subarray(0, i),
        text.subarray(i),
      ]);
      assert.equal(got.toString(), want, `split at ${i}`);
    }
  });

  test("a partial value at the very end is flushed unchanged", async () => {
    const tail = Buffer.from(`body ${OPENAI.slice(0, 10)}`);
    assert.deepEqual(await pipeThrough(scrubber([a]) as Transform, [tail]), tail);
  });

  test("random binary data without a value passes through byte for byte, in random chunks", async () => {
    const data = randomBytes(300_000);
    const chunks: Buffer[] = [];
    for (let at = 0; at < data.length; ) {
      const n = 1 + Math.floor(Math.random() * 5000);
      chunks.push(data.subarray(at, at + n));
      at += n;
    }
    assert.deepEqual(await pipeThrough(scrubber([a, g]) as Transform, chunks), data);
  });

  test("memory stays bounded: 64 MiB in 1 MiB chunks holds back fewer bytes than the value", async () => {
    const s = scrubber([a]);
    assert.ok(s instanceof ScrubStream);
    let out = 0;
    s.on("data", (b: Buffer) => {
      out += b.length;
    });
    const chunk = randomBytes(1 << 20);
    let written = 0;
    for (let i = 0; i < 64; i++) {
      await new Promise<void>((resolve) => s.write(chunk, () => resolve()));
      written += chunk.length;
      assert.ok(s.heldBytes < OPENAI.length, `held ${s.heldBytes}`);
      assert.ok(written - out < OPENAI.length, `behind by ${written - out}`);
    }
    s.end();
    await new Promise((resolve) => s.on("end", resolve));
    assert.equal(out, written);
  });

  test("scrubText for header values", () => {
    assert.equal(scrubText(`Bearer ${OPENAI}; ${GITHUB}`, [a, g]), "Bearer PH_A; PH_G");
    assert.equal(scrubText("nothing here", [a]), "nothing here");
    assert.equal(scrubText(OPENAI, []), OPENAI);
    const book = new SecretBook([a]);
    assert.equal(book.scrubText(OPENAI, [a]), "PH_A");
    assert.ok(book.scrubber([a]) instanceof ScrubStream);
  });
});
