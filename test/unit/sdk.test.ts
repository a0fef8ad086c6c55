import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { parseSandboxConfig } from "../../src/api/config.ts";
import { Client, MatchlockError, RPC_CODES, RPCError, Sandbox } from "../../src/sdk/index.ts";

/** The SDK's own behaviour, against small stand-in rpc programs (no VM needed). */

const dir = mkdtempSync(join(tmpdir(), "matchlock-sdk-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function fakeRpc(name: string, body: string): string {
  const path = join(dir, `${name}.mjs`);
  writeFileSync(path, body);
  return path;
}

describe("Sandbox builder", () => {
  test("is immutable: each with… returns a new builder and leaves the old one alone", () => {
    const base = new Sandbox("img:1").withMemory(256);
    const a = base.withEnv("A", "1").withCPUs(2);
    const b = base.withEnv("B", "2").withNoNetwork().withPortForward(8080, 80);
    assert.deepEqual(base.options(), { image: "img:1", resources: { memory_mb: 256 } });
    assert.deepEqual(a.options(), {
      image: "img:1",
      resources: { memory_mb: 256, cpus: 2 },
      env: { A: "1" },
    });
    assert.deepEqual(b.options().env, { B: "2" });
    assert.equal(b.options().network?.no_network, true);
    assert.deepEqual(b.portForwards, [{ localPort: 8080, remotePort: 80 }]);
    assert.deepEqual(base.portForwards, []);
  });

  test("produces the wire config the server validates", () => {
    const s = new Sandbox()
      .withCPUs(1.5)
      .withDiskSize(1024)
      .withTimeout(30)
      .withHostname("h")
      .withUser("user")
      .withEntrypoint("/bin/sh", "-c")
      .withImageConfig({ workingDir: "/work", env: { X: "y" } })
      .addSecret("K", "v", "api.example.com")
      .mountHostDirReadonly("/data", "/srv/data");
    const c = parseSandboxConfig(s.options());
    assert.equal(c.resources.cpus, 1.5);
    assert.equal(c.resources.timeout_seconds, 30);
    assert.deepEqual(c.image_config, {
      user: "user",
      entrypoint: ["/bin/sh", "-c"],
      working_dir: "/work",
      env: { X: "y" },
    });
    assert.deepEqual(c.network.secrets.K, { value: "v", hosts: ["api.example.com"] });
    assert.deepEqual(c.vfs.mounts["/data"], { type: "host_fs", host_path: "/srv/data", readonly: true });
  });
});

describe("Client edge cases", () => {
  test("server errors arrive as RPCError with the JSON-RPC code", async () => {
    const bin = fakeRpc(
      "errors",
      `import { createInterface } from "node:readline";
       for await (const line of createInterface({ input: process.stdin })) {
         const m = JSON.parse(line);
         if (m.id === undefined) continue;
         process.stdout.write(JSON.stringify({ jsonrpc: "2.0", id: m.id, error: { code: -32602, message: "bad " + m.method } }) + "\\n");
       }`,
    );
    const c = new Client({ binaryPath: bin });
    await assert.rejects(
      c.exec("true"),
      (e: Error) => e instanceof RPCError && e.code === RPC_CODES.INVALID_PARAMS && e.message === "bad exec",
    );
    await c.close();
  });

  test("when the rpc process dies, pending calls fail with its stderr in the error", async () => {
    const bin = fakeRpc("dies", `process.stderr.write("kernel exploded: details here\\n"); process.exit(3);`);
    const c = new Client({ binaryPath: bin });
    await assert.rejects(
      c.exec("true"),
      (e: Error) =>
        e instanceof MatchlockError &&
        /exited with code 3/.test(e.message) &&
        /kernel exploded/.test(e.stderr),
    );
  });

  test("close() ends a child that hangs and ignores SIGTERM", async () => {
    const bin = fakeRpc(
      "hangs",
      `process.on("SIGTERM", () => {}); process.stdin.on("data", () => {}); setInterval(() => {}, 1000);`,
    );
    const c = new Client({ binaryPath: bin });
    await assert.rejects(c.exec("true", { timeoutMs: 300 }), /timed out/);
    const t = Date.now();
    await c.close(1);
    assert.ok(Date.now() - t < 30_000);
    await assert.rejects(c.exec("true"), /client is closed/);
  });

  test("an aborted call sends cancel for it", async () => {
    const seen = join(dir, "seen.log");
    const bin = fakeRpc(
      "cancel",
      `import { appendFileSync } from "node:fs";
       import { createInterface } from "node:readline";
       for await (const line of createInterface({ input: process.stdin })) appendFileSync(${JSON.stringify(seen)}, line + "\\n");`,
    );
    const c = new Client({ binaryPath: bin });
    const ac = new AbortController();
    const p = c.exec("sleep 9", { signal: ac.signal });
    setTimeout(() => ac.abort(), 100);
    await assert.rejects(p);
    await new Promise((r) => setTimeout(r, 300));
    const { readFileSync } = await import("node:fs");
    const lines = readFileSync(seen, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    assert.equal(lines[0].method, "exec");
    assert.deepEqual(lines[1].params, { id: lines[0].id });
    assert.equal(lines[1].method, "cancel");
    await c.close(1);
  });

  test("bad port specs are refused client-side", async () => {
    const c = new Client({ binaryPath: "/bin/false" });
    await assert.rejects(c.portForward("1:2:3"), (e: Error) => e instanceof MatchlockError);
  });
});
