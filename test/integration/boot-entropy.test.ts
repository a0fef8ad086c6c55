import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { parseSandboxConfig } from "../../src/api/config.ts";
import { paths } from "../../src/api/paths.ts";
import { Sandbox } from "../../src/sandbox/sandbox.ts";
import type { VmBackend } from "../../src/vm/backend.ts";
import { QemuBackend } from "../../src/vm/qemu/machine.ts";
import { tempHome } from "../helpers/cli.ts";

/**
 * The guest's CRNG without a virtio-rng device: a guest CPU with RDRAND (TCG's `-cpu max` has it)
 * seeds it before any module loads, so the device and its driver are left out. A host without
 * RDRAND gets them back (forced here through the backend, which is how the tests can reach it).
 */

const h = tempHome();
after(() => h.cleanup());

async function bootAndRun(script: string, backend?: VmBackend): Promise<string> {
  const sb = await Sandbox.create({
    config: parseSandboxConfig({ network: { no_network: true } }),
    paths: paths(h.env),
    ...(backend ? { backend } : {}),
  });
  try {
    let out = "";
    const r = await sb.exec(
      { argv: ["sh", "-c", script] },
      {
        onStdout: (d) => {
          out += d.toString();
        },
        onStderr: (d) => {
          out += d.toString();
        },
      },
    ).done;
    assert.equal(r.exitCode, 0, out);
    return out;
  } finally {
    await sb.close();
  }
}

const PROBE = [
  "echo modules: $(cut -d' ' -f1 /proc/modules)",
  "echo devices: $(cat /sys/bus/virtio/devices/*/device)",
  "echo cmdline: $(cat /proc/cmdline)",
  "echo rdrand: $(grep -c -m1 -w rdrand /proc/cpuinfo)",
  // the kernel log in order: when the CRNG was ready relative to /init
  "dmesg | grep -E 'crng init done|Run /init' | sed 's/^\\[[^]]*\\] /log: /'",
  // would block until the CRNG is ready; it must answer at once
  "echo random: $(head -c 16 /dev/random | od -An -tx1 | tr -d ' \\n' | wc -c)",
].join("; ");

describe("guest entropy", () => {
  test("with RDRAND: no virtio-rng device or driver, and the CRNG is ready before /init runs", async () => {
    const out = await bootAndRun(PROBE);
    if (!/^rdrand: 1$/m.test(out)) {
      // KVM on a host without RDRAND: the backend must have given the device back.
      assert.match(out, /^modules:.*\bvirtio_rng\b/m, out);
      return;
    }
    assert.doesNotMatch(out, /^modules:.*\bvirtio_rng\b/m);
    assert.doesNotMatch(out, /^devices:.*0x0004/m, "virtio device id 4 is the entropy source");
    assert.doesNotMatch(out, /matchlock\.rng/);
    const log = out.split("\n").filter((l) => l.startsWith("log: "));
    assert.deepEqual(log, ["log: random: crng init done", "log: Run /init as init process"]);
    assert.match(out, /^random: 32$/m);
  });

  test("a VM given virtio-rng loads its driver, which then feeds the kernel", async () => {
    const backend: VmBackend = {
      name: "qemu",
      start: (spec) => new QemuBackend().start({ ...spec, rng: true }),
    };
    const out = await bootAndRun(
      `${PROBE}; echo hwrng: $(cat /sys/class/misc/hw_random/rng_current)`,
      backend,
    );
    assert.match(out, /^modules:.*\bvirtio_rng\b/m);
    assert.match(out, /^devices:.*0x0004/m);
    assert.match(out, /matchlock\.rng=1/);
    assert.match(out, /^hwrng: virtio_rng\.\d+$/m);
    assert.match(out, /^random: 32$/m);
  });
});
