import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { REPO } from "../helpers/cli.ts";

/**
 * CLI start-up loads what the command needs and no more: help and version text come from the
 * commands' definitions, which import commander and small helpers only; SQLite, valibot, the
 * sandbox and the x509 library load when a command that uses them runs. Every CLI call pays for
 * what is loaded here (the perf study measured ~200 ms of module loading in `matchlock run`).
 */

const scratch = mkdtempSync(join(tmpdir(), "matchlock-startup-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

const HOOK = join(scratch, "trace.mjs");
writeFileSync(
  HOOK,
  `import { registerHooks } from "node:module";
import { appendFileSync } from "node:fs";
registerHooks({ load(url, ctx, next) { appendFileSync(process.env.TRACE_OUT, url + "\\n"); return next(url, ctx); } });
`,
);

/** The files (outside node:) that `matchlock ARGS` loads, relative to the repository. */
function loaded(args: string[], env: NodeJS.ProcessEnv = {}): string[] {
  const out = join(scratch, `trace-${args.join("_").replace(/\W/g, "")}.txt`);
  const r = spawnSync(process.execPath, ["--import", HOOK, "--", join(REPO, "dist/cli/entry.js"), ...args], {
    env: {
      ...process.env,
      TRACE_OUT: out,
      MATCHLOCK_HOME: join(scratch, "home"),
      MATCHLOCK_CACHE: join(scratch, "cache"),
      ...env,
    },
    encoding: "utf8",
  });
  assert.equal(r.status, 0, r.stderr);
  return spawnSync("cat", [out], { encoding: "utf8" })
    .stdout.split("\n")
    .filter((u) => u.startsWith("file://"))
    .map((u) => u.replace(`file://${REPO}`, ""));
}

const HEAVY = [/node_modules\/better-sqlite3\//, /node_modules\/valibot\//, /node_modules\/@peculiar\//];
/** Ours that pull in the above or much else (small leaf modules such as state/procs.js are fine). */
const HEAVY_OURS = [
  /^dist\/sandbox\/sandbox\.js$/,
  /^dist\/state\/(db|store)\.js$/,
  /^dist\/image\//,
  /^dist\/rpc\//,
  /^dist\/net\//,
  /^dist\/api\/config\.js$/,
];

describe("CLI start-up", () => {
  for (const args of [["--version"], ["--help"], ["run", "--help"], ["exec", "--help"], ["list", "--help"]]) {
    test(`matchlock ${args.join(" ")} loads neither SQLite, valibot, x509 nor the sandbox`, () => {
      const files = loaded(args);
      assert.ok(
        files.some((f) => f.includes("node_modules/commander/")),
        "the tracer sees modules",
      );
      for (const re of [...HEAVY, ...HEAVY_OURS]) {
        const hit = files.find((f) => re.test(f));
        assert.equal(hit, undefined, `${args.join(" ")} loaded ${hit}`);
      }
    });
  }

  test("a command loads its own modules when it runs (list: state.db)", () => {
    const files = loaded(["list"]);
    assert.ok(files.some((f) => f.includes("node_modules/better-sqlite3/")));
    assert.ok(!files.some((f) => f.includes("node_modules/@peculiar/")), "no x509 outside intercept mode");
  });

  test("the sandbox loads intercept mode's proxy and CA only when a sandbox uses them", () => {
    const out = join(scratch, "trace-sandbox.txt");
    const r = spawnSync(
      process.execPath,
      [
        "--import",
        HOOK,
        "--input-type=module",
        "-e",
        `await import(${JSON.stringify(join(REPO, "dist/sandbox/sandbox.js"))})`,
      ],
      { env: { ...process.env, TRACE_OUT: out }, encoding: "utf8" },
    );
    assert.equal(r.status, 0, r.stderr);
    const files = spawnSync("cat", [out], { encoding: "utf8" }).stdout.split("\n");
    assert.ok(
      files.some((f) => f.endsWith("/dist/net/vm-network.js")),
      "the tracer sees the network module",
    );
    for (const re of [/\/dist\/net\/proxy\.js$/, /\/dist\/net\/mitm-ca\.js$/, /node_modules\/@peculiar\//]) {
      const hit = files.find((f) => re.test(f));
      assert.equal(hit, undefined, `loaded ${hit}`);
    }
  });

  test("the compile cache lands in the cache dir, and an unusable one is no error", () => {
    loaded(["--version"]);
    assert.ok(readdirSync(join(scratch, "cache", "node-compile-cache")).length > 0);
    const file = join(scratch, "a-file");
    writeFileSync(file, "");
    loaded(["--version"], { MATCHLOCK_CACHE: file }); // status 0 checked inside
  });
});
