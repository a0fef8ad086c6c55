import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { parseSandboxConfig, unsupportedFeatures } from "../../src/api/config.ts";
import { boolValue, durationMs, positiveInt, positiveNumber } from "../../src/cli/parse.ts";

describe("flag values", () => {
  test("durations as Go writes them", () => {
    assert.equal(durationMs("3s"), 3000);
    assert.equal(durationMs("500ms"), 500);
    assert.equal(durationMs("1m30s"), 90_000);
    assert.equal(durationMs("2"), 2000);
    for (const bad of ["", "3x", "s", "-1s"]) assert.throws(() => durationMs(bad));
  });

  test("a duration a Node timer cannot hold (--graceful-shutdown 600h) is refused, not fired at once", () => {
    assert.equal(durationMs("500h"), 500 * 3_600_000);
    assert.throws(() => durationMs("600h"), /at most 24 days/);
  });

  test("numbers", () => {
    assert.equal(positiveNumber("0.5"), 0.5);
    assert.equal(positiveInt("512"), 512);
    for (const bad of ["0", "-1", "abc", ""]) assert.throws(() => positiveNumber(bad));
    for (const bad of ["1.5", "0", "1e3", " "]) assert.throws(() => positiveInt(bad));
  });

  test("--rm=false", () => {
    assert.equal(boolValue(true), true);
    assert.equal(boolValue("false"), false);
    assert.throws(() => boolValue("maybe"));
  });
});

describe("sandbox config", () => {
  test("defaults of PROTOCOLS.md §3", () => {
    const c = parseSandboxConfig({});
    assert.deepEqual(c.resources, { cpus: 1, memory_mb: 512, disk_size_mb: 5120 });
    assert.equal(c.network.mtu, 1500);
    assert.equal(c.network.block_private_ips, true);
  });

  test("a bad field is named in the error", () => {
    assert.throws(() => parseSandboxConfig({ resources: { memory_mb: "lots" } }), /resources\.memory_mb/);
    assert.throws(() => parseSandboxConfig({ resources: { cpus: 0 } }), /resources\.cpus/);
  });

  test("features this build cannot honour are listed, never ignored", () => {
    // Intercept mode is built: an allow-list, secrets and an empty interception (force intercept) run.
    const c = parseSandboxConfig({
      network: { allowed_hosts: ["api.example.com"], secrets: { K: { value: "v" } }, interception: {} },
    });
    assert.deepEqual(unsupportedFeatures(c), []);
    // Network hooks are built: rules and a callback socket are kept, and checked as the config is.
    const hooked = parseSandboxConfig({
      network: { interception: { rules: [{ phase: "before", action: "block" }], callback_socket: "/tmp/s" } },
    });
    assert.deepEqual(unsupportedFeatures(hooked), []);
    assert.equal(hooked.network.interception?.rules?.[0]?.action, "block");
    assert.equal(parseSandboxConfig({ network: { interception: null } }).network.interception, undefined);
    // A bad rule is named the way compileHooks names it, not by its path in the config.
    assert.throws(
      () =>
        parseSandboxConfig({
          network: { interception: { rules: [{ name: "a" }, { name: "b", phase: "during" }] } },
        }),
      /^InvalidArgumentError: invalid network interception: rule 2 \("b"\): phase: must be before or after$/,
    );
    assert.throws(
      () => parseSandboxConfig({ network: { interception: { rules: [{ set_header: { A: "1" } }] } } }),
      /invalid network interception: rule 1: unknown key set_header \(did you mean set_headers\?\)/,
    );
    assert.deepEqual(unsupportedFeatures(parseSandboxConfig({ network: { no_network: true } })), []);
    // Fields Matchlock declares and never uses: empty is fine, anything else is refused by name.
    const unused = { id: "", network: { policy_script: "" }, vfs: { direct_mounts: {} } };
    assert.deepEqual(unsupportedFeatures(parseSandboxConfig(unused)), []);
    const used = { network: { policy_script: "allow()" }, vfs: { direct_mounts: { "/m": "/h" } } };
    assert.deepEqual(unsupportedFeatures(parseSandboxConfig(used)), [
      "vfs.direct_mounts",
      "network.policy_script",
    ]);
    assert.throws(() => parseSandboxConfig({ id: "vm-12345678" }), /id: the VM id is chosen by matchlock/);
    assert.deepEqual(unsupportedFeatures(parseSandboxConfig({})), []);
    // Host folders, file hooks and extra disks are built; a privileged VM is not.
    assert.deepEqual(unsupportedFeatures(parseSandboxConfig({ vfs: { workspace: "/workspace" } })), []);
    assert.deepEqual(
      unsupportedFeatures(parseSandboxConfig({ vfs: { workspace: "/w", interception: { rules: [] } } })),
      [],
    );
    assert.deepEqual(unsupportedFeatures(parseSandboxConfig({ privileged: true })), ["privileged"]);
  });
});

describe("--help", () => {
  test("prose is wrapped by commander as paragraphs, never broken mid-sentence by the source's line ends", async () => {
    const { runCli } = await import("../helpers/cli.ts");
    for (const cmd of [["run"], ["gc"], ["events"], ["exec"]]) {
      const r = await runCli([...cmd, "--help"], { env: { COLUMNS: "80" } });
      assert.equal(r.code, 0, r.stderr);
      const lines = r.stdout.toString().split("\n");
      // A line of a wrapped paragraph is followed by one that starts lower-case only if it was long.
      for (let i = 0; i + 1 < lines.length; i++) {
        const next = lines[i + 1] as string;
        if ((lines[i] as string).length < 40 && /^[a-z]/.test(next))
          assert.fail(`${cmd}: ragged at "${lines[i]}"`);
      }
    }
  });
});
