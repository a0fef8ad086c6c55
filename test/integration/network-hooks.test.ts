import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { REPO, tempHome } from "../helpers/cli.ts";
import { importDebianImage } from "../helpers/debian.ts";
import { guestNet } from "../helpers/guest-net.ts";
import { createTopology, FAKE, FAKE_API_KEY, type Hit, type Topology } from "../helpers/netns.ts";

/**
 * Network hooks (issue #12) from inside real VMs, in the test namespaces of NETWORK.md §8: static
 * rules from `run --network-rules`, callbacks served by a raw Matchlock-shaped socket server (not
 * our SDK) and by our SDK, SSE rewritten while it streams, hooks failing closed, and no callback
 * ever seeing a real secret value.
 */

const h = tempHome();
const TAG = `mltest-hooks-${process.pid}:1`;
const API = "api.example.test";
let t: Topology;
const { ml, sh, events } = guestNet(() => t, h);
const files = mkdtempSync(join(tmpdir(), "matchlock-hooks-"));

const since = (mark: number): Hit[] => t.hits().slice(mark);
const httpHits = (mark: number) =>
  since(mark).filter((x): x is Extract<Hit, { kind: "http" }> => x.kind === "http");

/** Writes a rules file and returns its path. */
function rulesFile(name: string, body: unknown): string {
  const file = join(files, name);
  writeFileSync(file, typeof body === "string" ? body : JSON.stringify(body));
  return file;
}

async function startVm(flags: string[], extra: NodeJS.ProcessEnv = {}): Promise<string> {
  const r = await ml(["run", "-d", "--image", TAG, ...flags, "--", "sleep", "3600"], extra);
  assert.equal(r.code, 0, r.stderr);
  return r.stdout.toString().trim();
}

/** `curl` in the guest: the body, then ` <status>` on the last line. */
function curl(id: string, args: string): Promise<string> {
  return sh(id, `curl -sS --path-as-is -w ' %{http_code}' ${args}`);
}

before(async () => {
  t = await createTopology();
  await importDebianImage(h.env, TAG);
});
after(async () => {
  await ml(["kill", "--all"]).catch(() => {});
  await ml(["gc"]).catch(() => {});
  await ml(["image", "rm", TAG]).catch(() => {});
  await t?.close();
  h.cleanup();
  rmSync(files, { recursive: true, force: true });
});

describe("static rules from run --network-rules", () => {
  let a: string;
  before(async () => {
    const file = rulesFile("static.json", {
      rules: [
        { name: "admin", phase: "before", hosts: [API], path: "/v1/admin/*", action: "block" },
        {
          name: "team",
          hosts: [API],
          path: "/headers",
          set_headers: { "X-Team": "blue" },
          delete_headers: ["X-Debug"],
        },
        {
          name: "query",
          hosts: [API],
          path: "/query",
          set_query: { tenant: "a b" },
          delete_query: ["debug"],
        },
        { name: "move", hosts: [API], path: "/old/*", rewrite_path: "/query" },
        { name: "no-posts", methods: ["post"], path: "/model", action: "block" },
        {
          name: "greeting",
          phase: "after",
          hosts: ["example.test"],
          path: "/",
          set_response_headers: { "X-Checked": "yes" },
          delete_response_headers: ["Content-Type"],
          body_replacements: [{ find: "hello", replace: "greetings" }],
        },
        {
          name: "shout",
          phase: "after",
          path: "/sse",
          body_replacements: [{ find: "event", replace: "EVENT" }],
        },
      ],
    });
    a = await startVm(["--allow-host", `${API},example.test`, "--network-rules", file]);
  });
  after(async () => {
    await ml(["kill", a]);
  });

  test("a block rule refuses the path (also spelt with ./ or ..): nothing reaches the server", async () => {
    const mark = t.hits().length;
    for (const path of ["/v1/admin/users", "/v1/./admin/users", "/v1/x/../admin/users"]) {
      const out = await curl(a, `https://${API}${path}`);
      assert.equal(out, `Blocked by policy: blocked by network hook "admin"\n 403`, path);
    }
    assert.match(await curl(a, `https://${API}/v1/users`), / 404$/, "other paths go on");
    assert.deepEqual(
      httpHits(mark).map((x) => x.path),
      ["/v1/users"],
    );
    const blocked = events(a).filter((e) => e.network.blocked && e.network.status_code === 403);
    assert.equal(blocked.length, 3);
    assert.equal(blocked[0]?.network.block_reason, 'blocked by network hook "admin"');
    assert.equal(blocked[0]?.network.url, `https://${API}/v1/admin/users`);
  });

  test("set and delete headers, set and delete query, rewrite the path", async () => {
    const headers = JSON.parse(
      (await sh(a, `curl -sS -H 'X-Debug: 1' -H 'X-Keep: 2' https://${API}/headers`)).trim(),
    ) as Record<string, string>;
    assert.equal(headers["x-team"], "blue");
    assert.equal(headers["x-keep"], "2");
    assert.equal(headers["x-debug"], undefined);

    const query = (s: string) => new URLSearchParams((JSON.parse(s.trim()) as { query: string }).query);
    const q = query(await sh(a, `curl -sS 'https://${API}/query?debug=1&keep=2'`));
    assert.deepEqual([...q].sort(), [
      ["keep", "2"],
      ["tenant", "a b"],
    ]);

    const mark = t.hits().length;
    const moved = query(await sh(a, `curl -sS 'https://${API}/old/anything?x=1'`));
    assert.equal(moved.get("x"), "1");
    assert.equal(moved.get("tenant"), null, "a rule earlier in the list never sees a later rewrite");
    assert.deepEqual(
      httpHits(mark).map((x) => x.path),
      ["/query?x=1"],
    );
  });

  test("methods: a POST rule blocks POST only", async () => {
    assert.match(await curl(a, `-X POST -d x=1 https://${API}/model`), /network hook "no-posts"\n 403$/);
    assert.match(await curl(a, `https://${API}/model`), / 401$/, "GET goes on (and has no key)");
  });

  test("after rules: response headers set and deleted, the body rewritten with its length recomputed", async () => {
    const out = await sh(a, "curl -sS -i http://example.test/");
    const [head = "", body = ""] = out.split("\r\n\r\n");
    assert.equal(body, `greetings from ${FAKE.web}\n`);
    assert.match(head, /^x-checked: yes$/im);
    assert.doesNotMatch(head, /^content-type:/im);
    assert.match(head, new RegExp(`^content-length: ${Buffer.byteLength(body)}$`, "im"));
  });

  test("server-sent events are rewritten event by event while they stream", async () => {
    const script = `
import time, urllib.request
r = urllib.request.urlopen("https://${API}/sse?n=4&gapMs=500")
got = [(time.time(), l.decode().strip()) for l in r if l.startswith(b"data:")]
print(got[0][1], "|", got[-1][1], "|", round(got[-1][0] - got[0][0], 2))
`;
    const out = (await sh(a, `python3 -c '${script}'`)).trim();
    const [first, last, spread] = out.split(" | ");
    assert.equal(first, "data: EVENT 0", out);
    assert.equal(last, "data: EVENT 3", out);
    // The server sends one event every 500 ms: buffered, they would all arrive together.
    assert.ok(Number(spread) >= 1.0, `events arrived ${spread}s apart: the stream was buffered`);
  });
});

test("a bad rules file is refused before boot with one line naming the rule and field", async () => {
  const cases: Array<[unknown, RegExp]> = [
    [{ rules: [{ name: "x", phase: "during" }] }, /rule 1 \("x"\): phase: must be before or after/],
    [
      [{ path: "/a", set_header: { A: "1" } }],
      /rule 1: unknown key set_header \(did you mean set_headers\?\)/,
    ],
    [
      { rules: [{ phase: "before", body_replacements: [{ find: "a" }] }] },
      /phase "before" cannot body_replacements/,
    ],
    [{ rules: [{ callback_id: "cb" }] }, /there is no callback_socket/],
    ["{not json", /--network-rules .*bad-4\.json: not JSON/],
  ];
  const vms = h.vmDirs().length;
  for (const [i, [body, message]] of cases.entries()) {
    const r = await ml([
      "run",
      "--image",
      TAG,
      "--network-rules",
      rulesFile(`bad-${i}.json`, body),
      "--",
      "true",
    ]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, message);
    assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
  }
  assert.equal(h.vmDirs().length, vms, "nothing was booted");
});

/**
 * A callback socket served the way Matchlock's SDKs serve it, written here from the protocol (one
 * JSON line in, one out, one connection per call), not with our SDK.
 */
class RawCallbackServer {
  readonly lines: Array<Record<string, unknown>> = [];
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  readonly path: string;
  private answer: ((req: Record<string, unknown>) => unknown) | undefined;
  constructor(path: string) {
    this.path = path;
  }

  start(answer: ((req: Record<string, unknown>) => unknown) | undefined): Promise<void> {
    this.answer = answer;
    rmSync(this.path, { force: true });
    const server = createServer((s) => {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
      s.on("error", () => {});
      let buf = "";
      s.on("data", (d) => {
        buf += d.toString();
        const nl = buf.indexOf("\n");
        if (nl < 0) return;
        const req = JSON.parse(buf.slice(0, nl)) as Record<string, unknown>;
        this.lines.push(req);
        const reply = this.answer?.(req);
        if (reply !== undefined) s.end(`${JSON.stringify(reply)}\n`); // undefined: never answer
      });
    });
    this.server = server;
    return new Promise((resolve) => server.listen(this.path, resolve));
  }

  /** As if the program serving it crashed: the socket is gone, calls in flight are cut. */
  crash(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    return new Promise((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}

test("callbacks over a Matchlock-shaped socket: its protocol, placeholders only, and failing closed", async () => {
  const raw = new RawCallbackServer(join(files, "cb.sock"));
  const headersOf = (x: unknown) => (x ?? {}) as Record<string, string[]>;
  await raw.start((req) =>
    req.phase === "before"
      ? { action: "allow", request: { headers: { ...headersOf(req.request_headers), "X-Raw": ["1"] } } }
      : { response: { headers: { ...headersOf(req.response_headers), "X-After": ["1"] } } },
  );
  const file = rulesFile("callbacks.json", {
    callback_socket: raw.path,
    rules: [
      { name: "raw", phase: "before", hosts: [API], path: "/headers", callback_id: "cb1", timeout_ms: 2000 },
      { name: "raw-after", phase: "after", path: "/headers", callback_id: "cb2" },
    ],
  });
  const id = await startVm(["--secret", `API_KEY@${API}`, "--network-rules", file], {
    API_KEY: FAKE_API_KEY,
  });
  try {
    const placeholder = (await sh(id, 'printf %s "$API_KEY"')).trim();
    const mark = t.hits().length;
    const out = await sh(id, `curl -sS -i -H "Authorization: Bearer $API_KEY" 'https://${API}/headers?x=1'`);
    const [head = "", body = ""] = out.split("\r\n\r\n");
    assert.match(head, /^HTTP\/1\.1 200/);
    assert.match(head, /^x-after: 1$/im);
    // The upstream got the real key and the callback's header.
    const hit = httpHits(mark).find((x) => x.path === "/headers?x=1");
    assert.equal(hit?.headers.authorization, `Bearer ${FAKE_API_KEY}`);
    assert.equal(hit?.headers["x-raw"], "1");
    // It echoed the real key; the guest sees the placeholder.
    assert.equal((JSON.parse(body) as Record<string, string>).authorization, `Bearer ${placeholder}`);

    // Matchlock's request lines (Go's omitempty), with placeholders, never the value.
    const [b, a] = raw.lines;
    assert.deepEqual(Object.keys(b ?? {}).sort(), [
      "callback_id",
      "host",
      "method",
      "path",
      "phase",
      "query",
      "request_headers",
    ]);
    assert.equal(b?.callback_id, "cb1");
    assert.equal(b?.phase, "before");
    assert.equal(b?.host, API);
    assert.equal(b?.method, "GET");
    assert.equal(b?.path, "/headers");
    assert.deepEqual(b?.query, { x: "1" });
    assert.deepEqual(headersOf(b?.request_headers).Authorization, [`Bearer ${placeholder}`]);
    assert.equal(headersOf(b?.request_headers).Host, undefined, "Host is not a header to Go");
    assert.equal(a?.callback_id, "cb2");
    assert.equal(a?.status_code, 200);
    assert.deepEqual(headersOf(a?.response_headers)["X-Echo-Authorization"], [`Bearer ${placeholder}`]);
    assert.deepEqual(headersOf(a?.request_headers)["X-Raw"], ["1"], "after sees the request before sent");
    assert.ok(!JSON.stringify(raw.lines).includes(FAKE_API_KEY), "a callback never sees the secret");

    // The program serving the callbacks crashes: requests its rules cover fail closed.
    await raw.crash();
    const crashMark = t.hits().length;
    const failed = await curl(id, `https://${API}/headers`);
    assert.match(failed, /^matchlock: network hook "raw" failed: .*\n 502$/);
    // A callback that never answers fails its rule after timeout_ms.
    await raw.start(undefined);
    const started = Date.now();
    const late = await curl(id, `https://${API}/headers`);
    assert.match(late, /network hook "raw" failed: .*2000 ms.*\n 502$/);
    assert.ok(Date.now() - started >= 2000);
    assert.deepEqual(
      httpHits(crashMark).map((x) => x.path),
      [],
      "nothing reached the server",
    );
    const reasons = events(id)
      .filter((e) => e.network.blocked)
      .map((e) => String(e.network.block_reason));
    assert.equal(
      reasons.filter((r) => r.startsWith('network hook "raw" failed')).length,
      2,
      reasons.join("\n"),
    );
    assert.match(await curl(id, `https://${API}/`), / 200$/, "requests no rule covers go on");
  } finally {
    await raw.crash();
    await ml(["kill", id]);
  }
});

test("the SDK serves callbacks: block, rewrite, set a body, time out, throw", async () => {
  const program = `
    import { Client, Sandbox } from ${JSON.stringify(join(REPO, "dist", "sdk", "index.js"))};
    const seen = [];
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const sandbox = new Sandbox(${JSON.stringify(TAG)})
      .allowHost("${API}", "example.test")
      .addSecret("K", "sk-sdk-hook-secret-1", "${API}")
      .withNetworkInterception({
        rules: [
          { name: "files", phase: "before", hosts: ["${API}"],
            hook: async (req) => (req.path.startsWith("/v1/files") ? { action: "block" } : null) },
          { name: "tag", phase: "before", path: "/headers",
            hook: (req) => { seen.push(req); return { request: { headers: { ...req.requestHeaders, "X-From-Callback": ["yes"] } } }; } },
          { name: "slow", phase: "before", path: "/query", timeoutMs: 500, hook: async () => { await sleep(3000); return null; } },
          { name: "boom", phase: "before", path: "/model", hook: () => { throw new Error("boom"); } },
        ],
      })
      .onNetworkResponse((res) => { seen.push(res); return { response: { setBody: "replaced by callback\\n" } }; },
        { hosts: ["example.test"], path: "/" });
    const c = new Client();
    await c.launch(sandbox);
    const curl = async (args) => (await c.exec("curl -sS -w ' %{http_code}' " + args)).stdout;
    const out = {
      files: await curl("https://${API}/v1/files/1"),
      other: await curl("https://${API}/v1/other"),
      headers: await curl('-H "Authorization: Bearer $K" https://${API}/headers'),
      slow: await curl("https://${API}/query"),
      boom: await curl("https://${API}/model"),
      body: await curl("http://example.test/"),
    };
    await c.close();
    await c.remove();
    console.log(JSON.stringify({ out, seen }));
  `;
  const mark = t.hits().length;
  const r = await t.execInHost(process.execPath, ["--input-type=module", "-e", program], {
    env: { ...h.env, NODE_EXTRA_CA_CERTS: t.caFile },
    timeoutMs: 240_000,
  });
  assert.equal(r.code, 0, r.stderr);
  const { out, seen } = JSON.parse(r.stdout.toString()) as {
    out: Record<string, string>;
    seen: Array<{ phase: string; requestHeaders: Record<string, string[]>; statusCode: number }>;
  };
  assert.equal(
    out.files,
    'Blocked by policy: blocked by network hook "files" (its callback answered block)\n 403',
  );
  assert.match(out.other ?? "", / 404$/);
  const echoed = JSON.parse((out.headers ?? "").replace(/ 200$/, "")) as Record<string, string>;
  assert.equal(echoed["x-from-callback"], "yes");
  assert.match(
    echoed.authorization ?? "",
    /^Bearer SANDBOX_SECRET_[0-9a-f]{32}$/,
    "scrubbed on the way back",
  );
  assert.match(out.slow ?? "", /^matchlock: network hook "slow" failed: .*\n 502$/);
  assert.match(out.boom ?? "", /^matchlock: network hook "boom" failed: .*boom.*\n 502$/);
  assert.equal(out.body, "replaced by callback\n 200");
  const upstream = httpHits(mark).find((x) => x.path === "/headers");
  assert.equal(upstream?.headers.authorization, "Bearer sk-sdk-hook-secret-1");
  assert.equal(upstream?.headers["x-from-callback"], "yes");
  assert.deepEqual(
    httpHits(mark)
      .map((x) => x.path)
      .filter((p) => p === "/query" || p === "/model" || p.startsWith("/v1/files")),
    [],
    "blocked and failed requests never left",
  );
  const tag = seen.find((s) => s.phase === "before");
  assert.match(tag?.requestHeaders.Authorization?.[0] ?? "", /^Bearer SANDBOX_SECRET_/);
  assert.equal(seen.find((s) => s.phase === "after")?.statusCode, 200);
  assert.ok(!r.stdout.toString().includes("sk-sdk-hook-secret-1"), "callbacks never see the secret");
});
