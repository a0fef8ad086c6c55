import assert from "node:assert/strict";
import { stat } from "node:fs/promises";
import { connect, createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PassThrough, Readable } from "node:stream";
import { after, describe, test } from "node:test";
import fc from "fast-check";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import { canonicalHeaderKey } from "../../src/api/http-fields.ts";
import type { HookCallbackRequest, NetworkInterceptionInput } from "../../src/api/network-hooks.ts";
import { type Literal, ReplaceChain, rewriteWhole, SseRewriter } from "../../src/net/body-rewrite.ts";
import { applyBodyPlan } from "../../src/net/hook-body.ts";
import { callHook, HookCallbackError } from "../../src/net/hook-callback.ts";
import {
  type AfterResult,
  type BeforeResult,
  compileHooks,
  type HookRequest,
  hookRequest,
  type NetworkHooks,
  requestTarget,
} from "../../src/net/hooks.ts";
import { canonicalPath, editQuery, splitTarget } from "../../src/net/http-target.ts";
import { PathGlob } from "../../src/net/path-glob.ts";
import {
  compileNetworkInterception,
  type NetworkHookRequest,
  type NetworkHookRule,
  NetworkHookServer,
} from "../../src/sdk/network-hooks.ts";
import { runs } from "../helpers/property.ts";

const HOST = "api.example.test";
const PLACEHOLDER = "SANDBOX_SECRET_0123456789abcdef0123456789abcdef";

function compile(rules: unknown[], extra: Record<string, unknown> = {}): NetworkHooks {
  return compileHooks({ rules, ...extra });
}

function req(url: string, headers: string[] = [], method = "GET", host = HOST): HookRequest {
  return hookRequest(host, method, url, ["Host", host, ...headers]);
}

function forwarded(r: BeforeResult): HookRequest {
  if (r.kind !== "forward") assert.fail(`expected the request to go on, got ${r.status} ${r.reason}`);
  return r.request;
}

function refusal(r: BeforeResult | AfterResult) {
  if (r.kind !== "refused") assert.fail("expected a refusal");
  return r;
}

function responded(r: AfterResult) {
  if (r.kind !== "respond") assert.fail(`expected a response, got ${r.status} ${r.reason}`);
  return r;
}

/** Reads `s` until `marker` has arrived (or fails after `ms`), then leaves it paused. */
function readUntil(s: Readable, marker: string, ms: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = "";
    const timer = setTimeout(() => {
      s.off("data", on);
      reject(new Error(`nothing complete within ${ms} ms, got ${JSON.stringify(got)}`));
    }, ms);
    const on = (c: Buffer) => {
      got += c.toString();
      if (!got.includes(marker)) return;
      clearTimeout(timer);
      s.off("data", on);
      s.pause();
      resolve(got);
    };
    s.on("data", on);
  });
}

function lit(find: string, replace: string): Literal {
  return { find: Buffer.from(find), replace: Buffer.from(replace) };
}

async function readAll(s: Readable): Promise<string> {
  const parts: Buffer[] = [];
  for await (const c of s) parts.push(Buffer.from(c as Buffer));
  return Buffer.concat(parts).toString();
}

function invalid(rules: unknown[], pattern: RegExp, extra: Record<string, unknown> = {}): void {
  assert.throws(
    () => compile(rules, extra),
    (e: unknown) => {
      assert.ok(e instanceof InvalidArgumentError, `not an InvalidArgumentError: ${String(e)}`);
      assert.match(e.message, pattern);
      return true;
    },
  );
}

/** Server-sent events the way Matchlock rewrites them, over the whole text at once (the oracle). */
function referenceSse(input: string, reps: Array<[string, string]>): string {
  return input
    .split(/(?<=\n)/)
    .map((line) => {
      if (!line.startsWith("data:")) return line;
      let payload = line.slice(5);
      let suffix = "";
      if (payload.endsWith("\r\n")) [payload, suffix] = [payload.slice(0, -2), "\r\n"];
      else if (payload.endsWith("\n")) [payload, suffix] = [payload.slice(0, -1), "\n"];
      for (const [f, r] of reps) payload = payload.replaceAll(f, r);
      return `data:${payload}${suffix}`;
    })
    .join("");
}

function feedSse(chunks: string[], reps: Array<[string, string]>): string {
  const sse = new SseRewriter(reps.map(([f, r]) => lit(f, r)));
  const out: Buffer[] = [];
  for (const c of chunks) out.push(...sse.feed(Buffer.from(c)));
  out.push(...sse.end());
  return Buffer.concat(out).toString();
}

function splitAt(s: string, cuts: number[]): string[] {
  const points = [...new Set(cuts.map((c) => c % (s.length + 1)))].sort((a, b) => a - b);
  const out: string[] = [];
  let at = 0;
  for (const p of points) {
    out.push(s.slice(at, p));
    at = p;
  }
  out.push(s.slice(at));
  return out;
}

describe("path globs (Go's path.Match)", () => {
  test("* stays within one segment, ? is one character, classes and escapes", () => {
    const g = (p: string, yes: string[], no: string[]) => {
      const glob = new PathGlob(p);
      for (const s of yes) assert.equal(glob.matches(s), true, `${p} should match ${s}`);
      for (const s of no) assert.equal(glob.matches(s), false, `${p} should not match ${s}`);
    };
    g("/v1/admin/*", ["/v1/admin/x", "/v1/admin/"], ["/v1/admin/a/b", "/v1/admin", "/v1/adminx"]);
    g("/v1/*/keys", ["/v1/a/keys", "/v1//keys"], ["/v1/a/b/keys"]);
    g("/f?o", ["/foo", "/f.o"], ["/fo", "/f/o"]);
    g("/[a-c]x", ["/ax", "/cx"], ["/dx"]);
    g("/[^a-c]x", ["/dx"], ["/ax"]);
    g("/a\\*b", ["/a*b"], ["/axb"]);
    g("/*.json", ["/x.json", "/.json"], ["/x.jsonp", "/a/x.json"]);
    g("/a*b*c", ["/abc", "/aXbYbZc"], ["/acb", "/ab/c"]);
  });

  test("property: the greedy matcher agrees with a regex for *, ? and literals", () => {
    const toRegex = (p: string) =>
      new RegExp(`^${[...p].map((c) => (c === "*" ? "[^/]*" : c === "?" ? "[^/]" : c)).join("")}$`);
    fc.assert(
      fc.property(
        fc.stringMatching(/^[ab/*?]{0,8}$/),
        fc.stringMatching(/^[ab/]{0,10}$/),
        (pattern, path) => {
          assert.equal(
            new PathGlob(pattern).matches(path),
            toRegex(pattern).test(path),
            `${pattern} vs ${path}`,
          );
        },
      ),
      runs(500),
    );
  });

  test("a bad pattern is refused at parse with the reason", () => {
    assert.throws(() => new PathGlob("/[a"), /unclosed \[/);
    assert.throws(() => new PathGlob("/a\\"), /lone \\/);
    assert.throws(() => new PathGlob("/[]"), /unescaped \]/);
    assert.throws(() => new PathGlob("/[z-a]"), /reversed/);
  });
});

describe("request targets", () => {
  test("absolute form is reduced to its path and query, so a path rule sees the real path", () => {
    assert.deepEqual(splitTarget("http://api.example.test/v1/admin/x?a=1"), {
      path: "/v1/admin/x",
      rawQuery: "a=1",
    });
    assert.deepEqual(splitTarget("/p?"), { path: "/p", rawQuery: "" });
  });

  test("the canonical path decodes escapes and resolves dot segments and doubled slashes", () => {
    assert.equal(canonicalPath("/v1/%61dmin/x"), "/v1/admin/x");
    assert.equal(canonicalPath("/v1/public/../admin/x"), "/v1/admin/x");
    assert.equal(canonicalPath("/v1//admin/./x"), "/v1/admin/x");
    assert.equal(canonicalPath("/v1/admin/"), "/v1/admin/");
    assert.equal(canonicalPath("/../.."), "/");
    assert.equal(canonicalPath("/caf%C3%A9"), "/café");
  });

  test("query edits keep untouched parameters byte for byte", () => {
    assert.equal(editQuery("debug=1&a=%20x&debug=2&b", [["a", "1 2"]], ["debug"]), "a=1%202&b");
    assert.equal(editQuery("z=1", [["new", "v"]], []), "z=1&new=v");
    assert.equal(editQuery("x=1&y=2", [], ["x", "y"]), "");
  });
});

describe("compileHooks: what survives", () => {
  test("allow rules with no edit and no callback are dropped; undefined, null and {} are empty", () => {
    assert.equal(compileHooks(undefined).isEmpty, true);
    assert.equal(compileHooks(null).isEmpty, true);
    assert.equal(compileHooks({}).isEmpty, true);
    const hooks = compile([
      { name: "noop" },
      { action: "allow", hosts: [HOST], timeout_ms: 100 },
      { action: "mutate" },
      { action: "block", path: "/x" },
      { set_headers: { "X-A": "1" } },
    ]);
    assert.equal(hooks.ruleCount, 2);
  });

  test("Matchlock's spellings: upper-case phase and action, padded methods, nulls from Go", () => {
    const hooks = compile([
      { phase: " After ", action: "BLOCK", methods: [" post "], hosts: null, path: "" },
    ]);
    assert.equal(hooks.ruleCount, 1);
    assert.equal(hooks.hasAfterFor(req("/", [], "POST")), true);
    assert.equal(hooks.hasAfterFor(req("/", [], "GET")), false);
  });
});

describe("compileHooks: invalid rules name the rule and the field", () => {
  test("phase", () => {
    invalid(
      [{}, { name: "strip-debug", phase: "middle" }],
      /rule 2 \("strip-debug"\): phase: must be before or after/,
    );
  });
  test("action", () => {
    invalid([{ action: "deny" }], /rule 1: action: must be allow, block or mutate/);
  });
  test("path: bad glob, or not a path", () => {
    invalid([{ action: "block", path: "/v1/[a" }], /rule 1: path: bad glob: unclosed \[/);
    invalid([{ action: "block", path: "v1/*" }], /rule 1: path: the glob must start with \//);
  });
  test("methods", () => {
    invalid([{ action: "block", methods: ["GE T"] }], /rule 1: methods\[0\]: not an HTTP method/);
    invalid([{ action: "block", methods: [""] }], /methods\[0\]: not an HTTP method/);
  });
  test("hosts", () => {
    invalid([{ action: "block", hosts: ["https://api.x.com/v1"] }], /rule 1: hosts\[0\]: .* is a URL/);
  });
  test("fields of the other phase", () => {
    invalid(
      [{ set_response_headers: { "X-A": "1" } }],
      /rule 1: set_response_headers: phase "before" cannot set_response_headers/,
    );
    invalid(
      [{ phase: "before", body_replacements: [{ find: "a" }] }],
      /phase "before" cannot body_replacements/,
    );
    invalid(
      [{ phase: "after", set_headers: { "X-A": "1" } }],
      /rule 1: set_headers: phase "after" cannot set_headers/,
    );
    invalid([{ phase: "after", rewrite_path: "/x" }], /phase "after" cannot rewrite_path/);
  });
  test("a callback rule's action must be allow (Matchlock's SDK rule)", () => {
    invalid(
      [{ name: "cb", callback_id: "network_hook_1", action: "block" }],
      /rule 1 \("cb"\): action: a callback rule cannot be block/,
      {
        callback_socket: "/tmp/x.sock",
      },
    );
    invalid([{ callback_id: "network_hook_1", action: "mutate" }], /a callback rule cannot be mutate/, {
      callback_socket: "/tmp/x.sock",
    });
  });
  test("callback_id without callback_socket; callback_socket not absolute", () => {
    invalid([{ callback_id: "network_hook_1" }], /rule 1: callback_id: there is no callback_socket to call/);
    invalid([], /callback_socket: must be an absolute path/, { callback_socket: "hook.sock" });
  });
  test("timeout_ms out of range or fractional", () => {
    invalid(
      [{ action: "block", timeout_ms: 60_001 }],
      /rule 1: timeout_ms: must be between 1 and 60000 \(0 or absent: 5000\)/,
    );
    invalid([{ action: "block", timeout_ms: -1 }], /timeout_ms: must be between 1 and 60000/);
    invalid([{ action: "block", timeout_ms: 1.5 }], /timeout_ms: must be a whole number/);
  });
  test("body_replacements with an empty find", () => {
    invalid(
      [{ phase: "after", body_replacements: [{ find: "" }] }],
      /rule 1: body_replacements\[0\]\.find: empty \(it would match everywhere\)/,
    );
  });
  test("header names that are not tokens, values with CR, LF or NUL", () => {
    invalid([{ set_headers: { "X Bad": "1" } }], /rule 1: set_headers\["X Bad"\]: not a valid header name/);
    invalid(
      [{ set_headers: { "X-A": "a\r\nInjected: 1" } }],
      /set_headers\["X-A"\]: the value contains CR, LF or NUL/,
    );
    invalid([{ phase: "after", set_response_headers: { "X-A": "a\u0000" } }], /CR, LF or NUL/);
    invalid([{ delete_headers: ["a:b"] }], /delete_headers\[0\]: not a valid header name/);
  });
  test("Host and the framing headers belong to the proxy", () => {
    invalid([{ set_headers: { host: "evil.test" } }], /rule 1: set_headers: host belongs to the proxy/);
    invalid([{ delete_headers: ["Content-Length"] }], /delete_headers: Content-Length belongs to the proxy/);
    invalid([{ phase: "after", set_response_headers: { "Transfer-Encoding": "x" } }], /belongs to the proxy/);
  });
  test("rewrite_path must be a path", () => {
    invalid([{ rewrite_path: "x" }], /rule 1: rewrite_path: the path must start with \//);
  });
  test("unknown keys, with a suggestion", () => {
    invalid(
      [{ set_header: { "X-A": "1" } }],
      /rule 1: unknown key set_header \(did you mean set_headers\?\)/,
    );
    invalid([], /unknown key rule \(did you mean rules\?\)/, { rule: [] });
  });
  test("not a list, not an object", () => {
    assert.throws(() => compileHooks({ rules: {} }), /rules: /);
    assert.throws(() => compileHooks("block everything"), InvalidArgumentError);
  });
});

describe("before phase: static rules", () => {
  test("block by host glob: a 403 naming the rule; other hosts pass", async () => {
    const hooks = compile([{ name: "no-internal", hosts: ["*.internal.test"], action: "block" }]);
    const r = refusal(await hooks.before(req("/", [], "GET", "db.internal.test")));
    assert.equal(r.status, 403);
    assert.equal(r.reason, 'blocked by network hook "no-internal"');
    assert.equal(r.failure, undefined);
    forwarded(await hooks.before(req("/")));
  });

  test("block by method", async () => {
    const hooks = compile([{ methods: ["delete"], action: "block" }]);
    assert.equal(
      refusal(await hooks.before(req("/x", [], "DELETE"))).reason,
      'blocked by network hook "rule 1"',
    );
    forwarded(await hooks.before(req("/x", [], "GET")));
  });

  test("block by path glob cannot be dodged by encoding, dot segments, doubled slashes or absolute form", async () => {
    const hooks = compile([{ hosts: [HOST], path: "/v1/admin/*", action: "block" }]);
    for (const url of [
      "/v1/admin/users",
      "/v1/admin/users?x=1",
      "/v1/%61dmin/users",
      "/v1/public/../admin/users",
      "/v1//admin/./users",
      `http://${HOST}/v1/admin/users`,
    ]) {
      assert.equal((await hooks.before(req(url))).kind, "refused", url);
    }
    for (const url of ["/v1/adminx/users", "/v1/admin/a/b", "/v2/admin/users"]) {
      forwarded(await hooks.before(req(url)));
    }
  });

  test("set and delete headers: names canonicalised, set replaces every old spelling in place", async () => {
    const hooks = compile([{ set_headers: { "x-team": "blue" }, delete_headers: ["x-debug"] }]);
    const out = forwarded(
      await hooks.before(
        req("/", ["X-TEAM", "red", "X-Debug", "1", "Accept", "*/*", "x-team", "green", "x-debug", "2"]),
      ),
    );
    assert.deepEqual(out.rawHeaders, ["Host", HOST, "X-Team", "blue", "Accept", "*/*"]);
    assert.equal(canonicalHeaderKey("x-team-ID"), "X-Team-Id");
  });

  test("set headers adds a header that was not there", async () => {
    const hooks = compile([{ set_headers: { "X-Added": "1" } }]);
    assert.deepEqual(forwarded(await hooks.before(req("/"))).rawHeaders, ["Host", HOST, "X-Added", "1"]);
  });

  test("set and delete query", async () => {
    const hooks = compile([{ set_query: { a: "1 2", n: "new" }, delete_query: ["debug"] }]);
    const out = forwarded(await hooks.before(req("/p?debug=1&a=%20x&keep=%7E&debug=2")));
    assert.equal(requestTarget(out), "/p?a=1%202&keep=%7E&n=new");
  });

  test("rewrite_path encodes the new path and keeps the query", async () => {
    const hooks = compile([{ path: "/old", rewrite_path: "/new path/é" }]);
    assert.equal(requestTarget(forwarded(await hooks.before(req("/old?q=1")))), "/new%20path/%C3%A9?q=1");
    assert.equal(requestTarget(forwarded(await hooks.before(req("/other?q=1")))), "/other?q=1");
  });

  test("later rules match the request as earlier rules left it", async () => {
    const hooks = compile([
      { path: "/public", rewrite_path: "/admin" },
      { path: "/admin", action: "block" },
    ]);
    assert.equal((await hooks.before(req("/public"))).kind, "refused");
  });

  test("block wins over the same rule's edits; an empty hook set returns the request untouched", async () => {
    const hooks = compile([{ action: "block", set_headers: { "X-A": "1" } }]);
    assert.equal((await hooks.before(req("/"))).kind, "refused");
    const r = req("/x?y");
    assert.equal(forwarded(await compileHooks({}).before(r)), r);
  });

  test("placeholders pass through rules untouched: the swap comes after", async () => {
    const hooks = compile([{ set_headers: { "X-A": "1" } }]);
    const out = forwarded(
      await hooks.before(req(`/?k=${PLACEHOLDER}`, ["Authorization", `Bearer ${PLACEHOLDER}`])),
    );
    assert.ok(out.rawHeaders.includes(`Bearer ${PLACEHOLDER}`));
    assert.equal(out.rawQuery, `k=${PLACEHOLDER}`);
  });
});

describe("after phase: static rules", () => {
  const res = (headers: string[], status = 200) => ({ status, rawHeaders: headers });

  test("set and delete response headers, canonicalised", async () => {
    const hooks = compile([
      {
        phase: "after",
        set_response_headers: { "x-served-by": "hook" },
        delete_response_headers: ["server"],
      },
    ]);
    const r = responded(await hooks.after(req("/"), res(["Server", "nginx", "Content-Length", "2"])));
    assert.deepEqual(r.rawHeaders, ["Content-Length", "2", "X-Served-By", "hook"]);
    assert.equal(r.body.kind, "pass");
  });

  test("after-phase block is a 403", async () => {
    const hooks = compile([{ phase: "after", path: "/secret", action: "block" }]);
    assert.equal(refusal(await hooks.after(req("/secret"), res([]))).status, 403);
  });

  test("body replacements on a whole body: applied in order, Content-Length recomputed", async () => {
    const hooks = compile([
      { phase: "after", body_replacements: [{ find: "internal", replace: "[redacted]" }] },
      {
        phase: "after",
        body_replacements: [
          { find: "[redacted]", replace: "[gone]" },
          { find: "x", replace: "" },
        ],
      },
    ]);
    assert.equal(hooks.mayRewriteBody(req("/")), true);
    const r = responded(
      await hooks.after(req("/"), res(["Content-Type", "application/json", "Content-Length", "21"])),
    );
    assert.deepEqual(r.rawHeaders, ["Content-Type", "application/json"]);
    assert.equal(r.body.kind, "whole");
    if (r.body.kind !== "whole") return;
    const out = await applyBodyPlan(r.body, Readable.from([Buffer.from("an internal xbox")]));
    assert.equal(out.length, Buffer.byteLength("an [gone] bo"));
    assert.equal(await readAll(out.body), "an [gone] bo");
  });

  test("a body over the buffer limit streams through the same rewrite without a length", async () => {
    const hooks = compileHooks(
      { rules: [{ phase: "after", body_replacements: [{ find: "secret", replace: "******" }] }] },
      { wholeBodyMaxBytes: 1024 },
    );
    const r = responded(await hooks.after(req("/"), res(["Content-Length", "9000"])));
    if (r.body.kind !== "whole") assert.fail("whole plan expected");
    const body = "secret-".repeat(1000);
    const chunks = splitAt(body, [5, 100, 1020, 1030, 4000]).map((s) => Buffer.from(s));
    const out = await applyBodyPlan(r.body, Readable.from(chunks));
    assert.equal(out.length, undefined);
    assert.equal(await readAll(out.body), "******-".repeat(1000));
  });

  test("a replacement that would grow the body past the limit streams instead of buffering the growth", () => {
    assert.equal(rewriteWhole(Buffer.from("aaaa"), [lit("a", "bbbb")], 10), undefined);
    assert.equal(rewriteWhole(Buffer.from("aa"), [lit("a", "bbbb")], 10)?.toString(), "bbbbbbbb");
  });

  test("no body to rewrite for HEAD, 204 and 304: headers only, Content-Length kept", async () => {
    const hooks = compile([{ phase: "after", body_replacements: [{ find: "a", replace: "b" }] }]);
    for (const [method, status] of [
      ["HEAD", 200],
      ["GET", 204],
      ["GET", 304],
    ] as const) {
      const r = responded(await hooks.after(req("/", [], method), res(["Content-Length", "10"], status)));
      assert.equal(r.body.kind, "pass");
      assert.deepEqual(r.rawHeaders, ["Content-Length", "10"]);
    }
  });

  test("replacements on a compressed body are refused (502), never passed on unredacted", async () => {
    const hooks = compile([
      { name: "redact", phase: "after", body_replacements: [{ find: "a", replace: "b" }] },
    ]);
    const r = refusal(await hooks.after(req("/"), res(["Content-Encoding", "gzip"])));
    assert.equal(r.status, 502);
    assert.match(r.reason, /network hook "redact" cannot apply body_replacements to a gzip-encoded body/);
  });

  test("after rules match the request's host, method and path", async () => {
    const hooks = compile([{ phase: "after", hosts: ["other.test"], set_response_headers: { "X-A": "1" } }]);
    assert.equal(hooks.hasAfterFor(req("/")), false);
    assert.equal(hooks.mayRewriteBody(req("/")), false);
    assert.deepEqual(responded(await hooks.after(req("/"), res([]))).rawHeaders, []);
  });
});

describe("server-sent events", () => {
  const reps: Array<[string, string]> = [
    ["internal", "[redacted]"],
    ["[redacted]", "[r]"],
  ];

  test("only data: payloads are rewritten; other lines pass untouched", () => {
    const input =
      "event: internal\ndata: an internal note\r\n: internal comment\nid: internal\ndata:internal\n\ndata\n";
    const expected =
      "event: internal\ndata: an [r] note\r\n: internal comment\nid: internal\ndata:[r]\n\ndata\n";
    assert.equal(feedSse([input], reps), expected);
    assert.equal(referenceSse(input, reps), expected);
  });

  test("the same output for every way of cutting the stream into chunks", () => {
    const input =
      "data: internal\r\ndata: intern\nevent: x\ndat\ndata:internalinternal\r\r\ndata: tail internal";
    const want = referenceSse(input, reps);
    for (let a = 0; a <= input.length; a++) {
      for (let b = a; b <= input.length; b += 3) {
        assert.equal(
          feedSse([input.slice(0, a), input.slice(a, b), input.slice(b)], reps),
          want,
          `cuts ${a},${b}`,
        );
      }
    }
    assert.equal(feedSse([...input], reps), want);
  });

  test("property: matches Matchlock's line-at-a-time rewrite for any text and any chunking", () => {
    const text = fc.stringMatching(/^(data:|data: |event: |\r|\n|ab|a|b|c|x)*$/);
    const pair = fc.tuple(fc.stringMatching(/^[abc]{1,3}$/), fc.stringMatching(/^[abcx]{0,3}$/));
    fc.assert(
      fc.property(
        text,
        fc.array(pair, { maxLength: 3 }),
        fc.array(fc.nat(), { maxLength: 6 }),
        (input, rs, cuts) => {
          assert.equal(feedSse(splitAt(input, cuts), rs), referenceSse(input, rs));
        },
      ),
      runs(300),
    );
  });

  test("a long data line is rewritten while it streams, holding only a few bytes", () => {
    const sse = new SseRewriter([lit("internal", "[r]")]);
    let out = 0;
    let held = 0;
    const piece = Buffer.from("internal-".repeat(1000));
    for (const c of sse.feed(Buffer.from("data: "))) out += c.length;
    for (let i = 0; i < 1000; i++) {
      for (const c of sse.feed(piece)) out += c.length;
      held = Math.max(held, sse.heldBytes);
    }
    for (const c of sse.feed(Buffer.from("\n"))) out += c.length;
    assert.ok(held <= "internal".length, `held ${held} bytes`);
    assert.equal(out, "data: ".length + "[r]-".length * 1000 * 1000 + 1);
  });

  test("the first event reaches the guest before the upstream sends the next", async () => {
    const hooks = compile([{ phase: "after", body_replacements: [{ find: "internal", replace: "[r]" }] }]);
    const r = responded(
      await hooks.after(req("/events"), {
        status: 200,
        rawHeaders: ["Content-Type", "text/event-stream; charset=utf-8"],
      }),
    );
    assert.equal(r.body.kind, "sse");
    if (r.body.kind !== "sse") return;
    const upstream = new PassThrough();
    const out = await applyBodyPlan(r.body, upstream);
    assert.equal(out.length, undefined);
    upstream.write("data: one internal\n\n");
    assert.equal(await readUntil(out.body, "\n\n", 2000), "data: one [r]\n\n");
    assert.equal(upstream.writableEnded, false, "the upstream has not sent its last event yet");
    const rest = readAll(out.body);
    upstream.end("data: two internal\n\n");
    assert.equal(await rest, "data: two [r]\n\n");
  });
});

describe("ReplaceChain", () => {
  test("literals apply in order like repeated ReplaceAll, on any chunking", () => {
    fc.assert(
      fc.property(
        fc.stringMatching(/^[abc]{0,40}$/),
        fc.array(fc.tuple(fc.stringMatching(/^[abc]{1,3}$/), fc.stringMatching(/^[abc]{0,3}$/)), {
          maxLength: 4,
        }),
        fc.array(fc.nat(), { maxLength: 5 }),
        (input, rs, cuts) => {
          const chain = new ReplaceChain(rs.map(([f, r]) => lit(f, r)));
          const out: Buffer[] = [];
          for (const c of splitAt(input, cuts)) out.push(...chain.feed(Buffer.from(c)));
          out.push(...chain.end());
          let want = input;
          for (const [f, r] of rs) want = want.replaceAll(f, r);
          assert.equal(Buffer.concat(out).toString(), want);
        },
      ),
      runs(300),
    );
  });
});

/** A hook server for the tests, closed when the file ends. */
const servers: Array<{ close(): Promise<void> | void }> = [];
after(async () => {
  for (const s of servers) await s.close();
});

async function withCallbacks(
  rules: NetworkHookRule[],
  tweak?: (wire: NetworkInterceptionInput) => void,
): Promise<{ hooks: NetworkHooks; server: NetworkHookServer }> {
  const { wire, callbacks } = compileNetworkInterception(rules);
  const server = await NetworkHookServer.start(callbacks);
  servers.push(server);
  wire.callback_socket = server.socketPath;
  tweak?.(wire);
  return { hooks: compileHooks(wire), server };
}

/** A raw Unix socket server standing in for a misbehaving SDK process. */
async function rawServer(onConn: (sock: import("node:net").Socket) => void): Promise<string> {
  const path = join(tmpdir(), `ml-hook-test-${process.pid}-${Math.random().toString(36).slice(2)}.sock`);
  const server: Server = createServer((sock) => {
    sock.on("error", () => {}); // the client hangs up on purpose in some tests
    onConn(sock);
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  servers.push({ close: () => new Promise<void>((resolve) => server.close(() => resolve())) });
  return path;
}

describe("callbacks through NetworkHookServer", () => {
  test("a callback blocks per request", async () => {
    const { hooks } = await withCallbacks([
      {
        name: "files",
        hook: (r) => (r.path.startsWith("/v1/files") ? { action: "block" } : { action: "allow" }),
      },
    ]);
    const r = refusal(await hooks.before(req("/v1/files/1")));
    assert.equal(r.status, 403);
    assert.equal(r.reason, 'blocked by network hook "files" (its callback answered block)');
    forwarded(await hooks.before(req("/v1/other")));
  });

  test("a callback sees the request as Matchlock sends it, placeholders and all, and rewrites headers, query and path", async () => {
    let seen: NetworkHookRequest | undefined;
    const { hooks } = await withCallbacks([
      {
        name: "rewrite",
        hosts: [HOST],
        hook: (r) => {
          seen = r;
          return {
            request: {
              headers: {
                ...r.requestHeaders,
                "x-added": ["1", "2"],
                Host: ["evil.test"],
                "Content-Length": ["0"],
              },
              query: { q: "new value" },
              path: "/rewritten path",
            },
          };
        },
      },
    ]);
    const out = forwarded(
      await hooks.before(
        hookRequest(HOST, "POST", `/v1/%61pi/../x?k=1&k=2&s=${PLACEHOLDER}`, [
          "Host",
          HOST,
          "authorization",
          `Bearer ${PLACEHOLDER}`,
          "Content-Length",
          "5",
          "x-multi",
          "a",
          "X-Multi",
          "b",
        ]),
      ),
    );
    assert.deepEqual(seen, {
      phase: "before",
      host: HOST,
      method: "POST",
      path: "/v1/x",
      query: { k: "1", s: PLACEHOLDER },
      requestHeaders: {
        Authorization: [`Bearer ${PLACEHOLDER}`],
        "Content-Length": ["5"],
        "X-Multi": ["a", "b"],
      },
      statusCode: 0,
      responseHeaders: {},
      isSSE: false,
    });
    // Host and the framing stay the proxy's; everything else is the callback's map.
    assert.deepEqual(out.rawHeaders, [
      "Host",
      HOST,
      "Content-Length",
      "5",
      "Authorization",
      `Bearer ${PLACEHOLDER}`,
      "X-Multi",
      "a",
      "X-Multi",
      "b",
      "X-Added",
      "1",
      "X-Added",
      "2",
    ]);
    assert.equal(requestTarget(out), "/rewritten%20path?q=new%20value");
  });

  test("static edits apply before the same rule's callback, which sees them", async () => {
    let headers: Record<string, string[]> = {};
    const { hooks } = await withCallbacks([
      {
        setHeaders: { "X-Team": "blue" },
        hook: (r) => {
          headers = r.requestHeaders;
          return null;
        },
      },
    ]);
    forwarded(await hooks.before(req("/")));
    assert.deepEqual(headers, { "X-Team": ["blue"] });
  });

  test("an after callback sets the body: replacements apply to it and the length is its own", async () => {
    let seen: NetworkHookRequest | undefined;
    const { hooks } = await withCallbacks([
      { phase: "after", bodyReplacements: [{ find: "world", replace: "there" }] },
      {
        phase: "after",
        hook: (r) => {
          seen = r;
          return {
            response: { setBody: "hello world", headers: { ...r.responseHeaders, "X-Hooked": ["yes"] } },
          };
        },
      },
    ]);
    assert.equal(hooks.mayRewriteBody(req("/")), true);
    const r = responded(
      await hooks.after(req("/", ["Authorization", `Bearer ${PLACEHOLDER}`]), {
        status: 201,
        rawHeaders: ["Content-Type", "text/plain", "Content-Length", "999"],
      }),
    );
    assert.equal(seen?.statusCode, 201);
    assert.equal(seen?.phase, "after");
    assert.deepEqual(seen?.requestHeaders, { Authorization: [`Bearer ${PLACEHOLDER}`] });
    assert.deepEqual(seen?.responseHeaders, { "Content-Type": ["text/plain"], "Content-Length": ["999"] });
    assert.equal(r.body.kind, "set");
    if (r.body.kind !== "set") return;
    assert.equal(r.body.body.toString(), "hello there");
    assert.deepEqual(r.rawHeaders, ["Content-Type", "text/plain", "X-Hooked", "yes", "Content-Length", "11"]);
  });

  test("an after callback adds replacements to an SSE stream", async () => {
    const { hooks } = await withCallbacks([
      {
        phase: "after",
        hook: (r) =>
          r.isSSE ? { response: { bodyReplacements: [{ find: "token", replace: "[t]" }] } } : null,
      },
    ]);
    const r = responded(
      await hooks.after(req("/"), { status: 200, rawHeaders: ["Content-Type", "text/event-stream"] }),
    );
    if (r.body.kind !== "sse") assert.fail("sse plan expected");
    const out = await applyBodyPlan(r.body, Readable.from([Buffer.from("data: token\nevent: token\n")]));
    assert.equal(await readAll(out.body), "data: [t]\nevent: token\n");
  });

  test("a callback that times out fails closed with the reason", async () => {
    const { hooks } = await withCallbacks(
      [{ name: "slow", hook: () => new Promise((resolve) => setTimeout(() => resolve(null), 1000).unref()) }],
      (wire) => {
        (wire.rules?.[0] as { timeout_ms?: number }).timeout_ms = 100;
      },
    );
    const started = Date.now();
    const r = refusal(await hooks.before(req("/")));
    assert.ok(Date.now() - started < 900, "did not wait for the hook");
    assert.equal(r.status, 502);
    assert.equal(r.reason, 'network hook "slow" failed: no reply within 100 ms');
    assert.deepEqual(r.failure, {
      rule: "slow",
      phase: "before",
      callbackId: "network_hook_1",
      kind: "timeout",
      message: "no reply within 100 ms",
    });
  });

  test("the SDK applies the rule's timeoutMs itself and says so", async () => {
    const { hooks } = await withCallbacks([
      {
        name: "slow",
        timeoutMs: 50,
        hook: () => new Promise((resolve) => setTimeout(() => resolve(null), 5000).unref()),
      },
    ]);
    const r = refusal(await hooks.before(req("/")));
    // Whichever side gives up first, the request does not go on.
    assert.equal(r.status, 502);
    assert.match(
      r.reason,
      /network hook "slow" failed: (the callback failed: network hook callback timed out after 50 ms|no reply within 50 ms)/,
    );
  });

  test("a hook that throws fails closed; after phase too", async () => {
    const { hooks } = await withCallbacks([
      {
        name: "boom",
        hook: () => {
          throw new Error("database down");
        },
      },
      {
        name: "boom-after",
        phase: "after",
        hook: () => {
          throw new Error("nope");
        },
      },
    ]);
    const b = refusal(await hooks.before(req("/")));
    assert.equal(b.reason, 'network hook "boom" failed: the callback failed: database down');
    assert.equal(b.failure?.kind, "callback");
    const a = refusal(await hooks.after(req("/"), { status: 200, rawHeaders: [] }));
    assert.equal(a.status, 502);
    assert.equal(a.failure?.phase, "after");
    assert.match(a.reason, /network hook "boom-after" failed: the callback failed: nope/);
  });

  test("a closed SDK server fails closed: unreachable", async () => {
    const { hooks, server } = await withCallbacks([{ name: "gone", hook: () => null }]);
    await server.close();
    await assert.rejects(stat(server.socketPath));
    const r = refusal(await hooks.before(req("/")));
    assert.equal(r.failure?.kind, "unreachable");
    assert.match(r.reason, /network hook "gone" failed: cannot connect to .*hook\.sock: ENOENT/);
  });

  test("an SDK process that dies mid-call fails closed", async () => {
    const path = await rawServer((sock) => sock.once("data", () => sock.destroy()));
    const hooks = compile([{ name: "crash", callback_id: "network_hook_1" }], { callback_socket: path });
    const r = refusal(await hooks.before(req("/")));
    assert.equal(r.failure?.kind, "protocol");
    assert.match(r.reason, /closed the connection without replying/);
  });

  test("a reply over 1 MiB is an error, and so is one that is not the protocol", async () => {
    const big = await rawServer((sock) =>
      sock.once("data", () => sock.end(Buffer.alloc(2 * 1024 * 1024, 0x61))),
    );
    await assert.rejects(callHook(big, { callback_id: "x", phase: "before" }, 5000), (e: unknown) => {
      assert.ok(e instanceof HookCallbackError);
      assert.equal(e.kind, "protocol");
      assert.match(e.message, /longer than 1048576 bytes/);
      return true;
    });
    const junk = await rawServer((sock) => sock.once("data", () => sock.end("not json\n")));
    await assert.rejects(
      callHook(junk, { callback_id: "x", phase: "before" }, 5000),
      /the reply is not JSON/,
    );
    const badHeader = await rawServer((sock) =>
      sock.once("data", () =>
        sock.end(`${JSON.stringify({ request: { headers: { "X-A": ["a\r\nB: c"] } } })}\n`),
      ),
    );
    await assert.rejects(
      callHook(badHeader, { callback_id: "x", phase: "before" }, 5000),
      /bad reply: request\.headers\.X-A\.0: the value contains CR, LF or NUL/,
    );
    const badAction = await rawServer((sock) => sock.once("data", () => sock.end('{"action":"maybe"}\n')));
    await assert.rejects(
      callHook(badAction, { callback_id: "x", phase: "before" }, 5000),
      /action: must be allow, block or mutate/,
    );
  });

  test("a hook whose reply is too big gets a clear error from the SDK", async () => {
    const { hooks } = await withCallbacks([
      { name: "huge", phase: "after", hook: () => ({ response: { setBody: Buffer.alloc(900 * 1024) } }) },
    ]);
    const r = refusal(await hooks.after(req("/"), { status: 200, rawHeaders: [] }));
    assert.match(r.reason, /the hook's reply is \d+ bytes, more than the 1048576 the proxy accepts/);
  });

  test("a bad path or body from a callback fails closed", async () => {
    const { hooks } = await withCallbacks([{ name: "p", hook: () => ({ request: { path: "relative" } }) }]);
    assert.match(refusal(await hooks.before(req("/"))).reason, /request\.path must start with \//);
    const path = await rawServer((sock) =>
      sock.once("data", () => sock.end('{"response":{"set_body_base64":"!!"}}\n')),
    );
    const after = compile([{ phase: "after", callback_id: "c" }], { callback_socket: path });
    assert.match(refusal(await after.after(req("/"), { status: 200, rawHeaders: [] })).reason, /not base64/);
  });

  test("the socket is 0600 in a private directory, both removed on close", async () => {
    const { callbacks } = compileNetworkInterception([{ hook: () => null }]);
    const server = await NetworkHookServer.start(callbacks);
    assert.match(server.socketPath, /matchlock-network-hook-[^/]+\/hook\.sock$/);
    assert.equal((await stat(server.socketPath)).mode & 0o777, 0o600);
    assert.equal((await stat(join(server.socketPath, ".."))).mode & 0o777, 0o700);
    await server.close();
    await assert.rejects(stat(join(server.socketPath, "..")));
  });
});

/** One call the way Matchlock's Go host makes it: dial, one JSON line, read to newline or end. */
function rawCall(socketPath: string, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = connect(socketPath, () => sock.write(line));
    let got = "";
    sock.setEncoding("utf8");
    sock.on("data", (c: string) => {
      got += c;
    });
    sock.on("end", () => resolve(got));
    sock.on("error", reject);
  });
}

describe("wire format, checked by independent raw peers", () => {
  test("NetworkHookServer answers a Matchlock-shaped request line with Matchlock's reply", async () => {
    const { wire, callbacks } = compileNetworkInterception([
      { name: "static", hosts: [HOST], setHeaders: { "X-A": "1" } },
      {
        name: "cb",
        phase: "before",
        timeoutMs: 2000,
        hook: (r) =>
          r.method === "DELETE"
            ? { action: "block" }
            : {
                request: { headers: { "X-User": [r.query.user ?? ""] }, query: {} },
                response: { setBody: "ignored" },
              },
      },
    ]);
    assert.deepEqual(wire, {
      rules: [
        { name: "static", hosts: [HOST], set_headers: { "X-A": "1" } },
        { name: "cb", phase: "before", timeout_ms: 2000, callback_id: "network_hook_2" },
      ],
    });
    const server = await NetworkHookServer.start(callbacks);
    servers.push(server);
    // Go's encoding/json with omitempty: no status_code, response_headers or is_sse before.
    const ask = (method: string) =>
      rawCall(
        server.socketPath,
        `${JSON.stringify({
          callback_id: "network_hook_2",
          phase: "before",
          host: HOST,
          method,
          path: "/v1/x",
          query: { user: "ann" },
          request_headers: { Accept: ["*/*"] },
        })}\n`,
      );
    assert.equal(await ask("DELETE"), '{"action":"block"}\n');
    const reply = await ask("GET");
    assert.ok(reply.endsWith("\n") && reply.indexOf("\n") === reply.length - 1, "one line");
    assert.deepEqual(JSON.parse(reply), {
      request: { headers: { "X-User": ["ann"] }, query: {} },
      response: { set_body_base64: Buffer.from("ignored").toString("base64") },
    });
    assert.deepEqual(
      JSON.parse(await rawCall(server.socketPath, '{"callback_id":"network_hook_9","phase":"before"}\n')),
      {
        error: 'network hook callback "network_hook_9" not found',
      },
    );
    assert.match(
      await rawCall(server.socketPath, '{"callback_id":"network_hook_2","phase":"after"}\n'),
      /phase mismatch/,
    );
    assert.match(await rawCall(server.socketPath, "{oops\n"), /"error":"the request is not JSON/);
  });

  test("the proxy's callback client speaks Matchlock's request line to a Go-style peer", async () => {
    let line: HookCallbackRequest | undefined;
    const path = await rawServer((sock) => {
      let buf = "";
      sock.setEncoding("utf8");
      sock.on("data", (c: string) => {
        buf += c;
        if (!buf.includes("\n")) return;
        line = JSON.parse(buf.slice(0, buf.indexOf("\n")));
        // Go's json.Encoder ends with a newline; some peers just close: both are fine.
        sock.end(
          JSON.stringify({
            action: "mutate",
            response: {
              headers: { "X-Gone": [] },
              body_replacements: [
                { find: "", replace: "x" },
                { find: "a", replace: "b" },
              ],
            },
          }),
        );
      });
    });
    const hooks = compile([{ name: "go", phase: "after", callback_id: "network_hook_1", timeout_ms: 1000 }], {
      callback_socket: path,
    });
    const r = responded(
      await hooks.after(req("/p?x=1&x=2", ["x-req", "1"]), {
        status: 200,
        rawHeaders: ["Content-Type", "text/plain", "Content-Length", "3"],
      }),
    );
    assert.deepEqual(line, {
      callback_id: "network_hook_1",
      phase: "after",
      host: HOST,
      method: "GET",
      path: "/p",
      query: { x: "1" },
      request_headers: { "X-Req": ["1"] },
      status_code: 200,
      response_headers: { "Content-Type": ["text/plain"], "Content-Length": ["3"] },
    });
    // The map replaced the headers (Content-Length is the proxy's and went with the body change).
    assert.deepEqual(r.rawHeaders, []);
    if (r.body.kind !== "whole") assert.fail("whole plan expected");
    assert.equal(r.body.rewrite(Buffer.from("aaa"))?.toString(), "bbb");
  });
});

describe("SDK compile", () => {
  test("ids are network_hook_<index+1>, fields snake_case, empty ones left out", () => {
    const { wire, callbacks } = compileNetworkInterception([
      {
        name: "a",
        phase: "after",
        methods: ["GET"],
        path: "/x/*",
        setResponseHeaders: { "X-A": "1" },
        deleteResponseHeaders: ["Server"],
        bodyReplacements: [{ find: "a" }],
        deleteHeaders: [],
      },
      { setQuery: { a: "1" }, deleteQuery: ["b"], rewritePath: "/y", deleteHeaders: ["X-B"], setHeaders: {} },
      { phase: "after", hook: () => null, timeoutMs: 0 },
    ]);
    assert.deepEqual(wire.rules, [
      {
        name: "a",
        phase: "after",
        methods: ["GET"],
        path: "/x/*",
        set_response_headers: { "X-A": "1" },
        delete_response_headers: ["Server"],
        body_replacements: [{ find: "a", replace: "" }],
      },
      { delete_headers: ["X-B"], set_query: { a: "1" }, delete_query: ["b"], rewrite_path: "/y" },
      { phase: "after", callback_id: "network_hook_3" },
    ]);
    assert.deepEqual([...callbacks.keys()], ["network_hook_3"]);
    assert.equal(callbacks.get("network_hook_3")?.phase, "after");
    assert.deepEqual(compileNetworkInterception([]).wire, {});
  });

  test("a callback rule with an action other than allow is refused", () => {
    assert.throws(
      () => compileNetworkInterception([{ name: "x", action: "block", hook: () => null }]),
      /network hook "x": a callback hook cannot set action="block"/,
    );
    assert.doesNotThrow(() => compileNetworkInterception([{ action: "allow", hook: () => null }]));
  });
});
