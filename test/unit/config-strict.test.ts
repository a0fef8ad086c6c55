import assert from "node:assert/strict";
import { describe, test } from "node:test";
import * as v from "valibot";
import { parseSandboxConfig, unsupportedFeatures } from "../../src/api/config.ts";
import { invalidParamsMessage, RpcMethods } from "../../src/api/rpc.ts";
import { suggestKey } from "../../src/api/schema.ts";

/** Unknown config and params keys are refused naming them, never dropped (issue #8). */

const refusal = (input: unknown): string => {
  try {
    parseSandboxConfig(input);
  } catch (e) {
    return (e as Error).message;
  }
  assert.fail(`accepted ${JSON.stringify(input)}`);
};

describe("sandbox config refuses keys it does not know", () => {
  test("resources.memory (a near miss of memory_mb) is refused with a did-you-mean, not booted on 512 MB", () => {
    assert.equal(
      refusal({ resources: { memory: 4096 } }),
      "invalid sandbox config: unknown key resources.memory (did you mean memory_mb?)",
    );
  });

  test("top-level secrets and mounts (misplaced sections) are refused, pointing at where they belong", () => {
    assert.match(
      refusal({ secrets: { K: { value: "v" } } }),
      /unknown key secrets \(did you mean network\.secrets\?\)/,
    );
    assert.match(
      refusal({ mounts: { "/w": { type: "memory" } } }),
      /unknown key mounts \(did you mean vfs\.mounts\?\)/,
    );
  });

  test("unknown keys deep inside are named by their full path", () => {
    assert.match(
      refusal({ network: { secrets: { K: { value: "v", hostz: [] } } } }),
      /network\.secrets\.K\.hostz/,
    );
    assert.match(
      refusal({ vfs: { mounts: { "/w": { type: "overlay", upper: {} } } } }),
      /unknown key vfs\.mounts\.\/w\.upper/,
    );
    assert.match(refusal({ image_config: { workdir: "/x" } }), /unknown key image_config\.workdir/);
    // Fields Matchlock declares but we do not run are refused by name (test/unit/cli-parse.test.ts),
    // and a non-empty id names the rule.
    assert.match(refusal({ id: "vm-12345678" }), /id: the VM id is chosen by matchlock/);
  });

  test("an empty image reference is refused, not replaced by the default image", () => {
    assert.match(refusal({ image: "" }), /image: the image reference is empty/);
    assert.match(refusal({ image: "  " }), /image reference is empty/);
  });

  test("a relative image_config.working_dir is refused", () => {
    assert.match(refusal({ image_config: { working_dir: "rel" } }), /image_config\.working_dir.*absolute/);
  });

  test("every field Matchlock's SDKs send is accepted (Go's null slices included)", () => {
    // What the Go SDK marshals for a network section without an allowlist, and a secret without hosts.
    const c = parseSandboxConfig({
      image: "alpine:latest",
      resources: { cpus: 1, memory_mb: 512, disk_size_mb: 5120, timeout_seconds: 300 },
      privileged: false,
      launch_entrypoint: false,
      network: {
        allowed_hosts: null,
        block_private_ips: true,
        add_hosts: [{ host: "db", ip: "10.0.0.2" }],
        dns_servers: ["198.51.100.53"],
        hostname: "h",
        mtu: 1400,
        no_network: false,
        intercept: false,
        secrets: { K: { value: "v", hosts: null } },
      },
      vfs: { workspace: "/workspace", mounts: { "/workspace/a": { type: "memory", readonly: true } } },
      env: { A: "1" },
      extra_disks: [],
      image_config: { user: "u", working_dir: "/w", entrypoint: ["/e"], cmd: ["c"], env: { B: "2" } },
    });
    assert.deepEqual(c.network.allowed_hosts, []);
    assert.deepEqual(c.network.secrets.K?.hosts, []);
  });

  test("launch_entrypoint, which Matchlock's SDK sends for launch(), is accepted", () => {
    assert.deepEqual(unsupportedFeatures(parseSandboxConfig({ launch_entrypoint: true })), []);
  });

  test("did-you-mean only suggests near misses", () => {
    assert.equal(suggestKey("memory", ["cpus", "memory_mb"]), "memory_mb");
    assert.equal(suggestKey("cpu", ["cpus", "memory_mb"]), "cpus");
    assert.equal(suggestKey("workdir", ["command", "working_dir", "user"]), undefined);
    assert.equal(suggestKey("zzzz", ["cpus"]), undefined);
  });
});

describe("RPC params refuse keys they do not know", () => {
  const messageFor = (method: keyof typeof RpcMethods, params: unknown): string => {
    const r = v.safeParse(RpcMethods[method], params);
    assert.equal(r.success, false, `${method} accepted ${JSON.stringify(params)}`);
    return invalidParamsMessage(method, r.success ? [] : r.issues);
  };

  test("an extra key is refused by every method, naming the key", () => {
    const valid: { [M in keyof typeof RpcMethods]: Record<string, unknown> } = {
      create: {},
      exec: { command: "true" },
      exec_stream: { command: "true" },
      exec_pipe: { command: "true" },
      exec_tty: { command: "true", rows: 24, cols: 80 },
      write_file: { path: "/a", content: "", mode: 0o644 },
      read_file: { path: "/a" },
      list_files: { path: "/a" },
      log: {},
      log_stream: {},
      allow_list_add: { hosts: ["a"] },
      allow_list_delete: { hosts: ["a"] },
      port_forward: { forwards: [{ local_port: 1, remote_port: 2 }], addresses: ["127.0.0.1"] },
      cancel: { id: 1 },
      close: { timeout_seconds: 2 },
      pause: {},
      resume: {},
    };
    for (const [method, params] of Object.entries(valid) as Array<[keyof typeof RpcMethods, object]>) {
      assert.ok(v.safeParse(RpcMethods[method], params).success, `${method} refused valid params`);
      assert.match(messageFor(method, { ...params, bogus_key: 1 }), /unknown key bogus_key/, method);
    }
  });

  test("exec with env (Matchlock sends no per-exec env) is refused, not run without it", () => {
    assert.equal(
      messageFor("exec", { command: "env", env: { A: "1" } }),
      "invalid params for exec: unknown key env",
    );
  });

  test("a relative working_dir is refused by every exec method's schema", () => {
    for (const method of ["exec", "exec_stream", "exec_pipe", "exec_tty"] as const) {
      assert.match(
        messageFor(method, { command: "pwd", working_dir: "rel" }),
        /working_dir: the working directory "rel" is invalid: it must be an absolute path/,
      );
    }
  });

  test("create's nested unknown key is named with its path and a suggestion", () => {
    assert.equal(
      messageFor("create", { resources: { memory: 4096 } }),
      "invalid params for create: unknown key resources.memory (did you mean memory_mb?)",
    );
    assert.match(
      messageFor("port_forward", { forwards: [{ local: 1, remote_port: 2 }] }),
      /forwards\.0\.local/,
    );
  });

  test("a bad network hook rule in create is named by rule and field, as the CLI names it", () => {
    const network = { interception: { rules: [{}, { name: "strip", delete_headers: ["bad header"] }] } };
    assert.equal(
      messageFor("create", { network }),
      'invalid params for create: invalid network interception: rule 2 ("strip"): delete_headers[0]: not a valid header name (an RFC 9110 token: letters, digits and !#$%&\'*+-.^_`|~)',
    );
  });
});
