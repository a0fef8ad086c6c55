import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { connect } from "node:net";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { parseSandboxConfig } from "../../src/api/config.ts";
import { paths } from "../../src/api/paths.ts";
import { AgentClient, type ExecHandle } from "../../src/guest/agent-client.ts";
import { Sandbox } from "../../src/sandbox/sandbox.ts";
import { tempHome } from "../helpers/cli.ts";

/** One long-lived VM driven through the sandbox layer: many execs, concurrency, cancel, files. */

const h = tempHome();
let sb: Sandbox;

async function sh(script: string, opts: { user?: string } = {}) {
  let out = "";
  let err = "";
  const handle = sb.exec(
    { argv: ["sh", "-c", script], ...opts },
    {
      onStdout: (d) => {
        out += d.toString();
      },
      onStderr: (d) => {
        err += d.toString();
      },
    },
  );
  const r = await handle.done;
  return { ...r, out, err };
}

before(async () => {
  sb = await Sandbox.create({
    config: parseSandboxConfig({ network: { no_network: true } }),
    paths: paths(h.env),
  });
});
after(async () => {
  await sb?.close();
  h.cleanup();
});

describe("one VM, many commands", () => {
  test("20 execs in a row in the same VM share its filesystem", async () => {
    for (let i = 0; i < 20; i++) {
      const r = await sh(`echo ${i} >> /tmp/count; wc -l < /tmp/count`);
      assert.equal(r.exitCode, 0);
      assert.equal(r.out.trim(), String(i + 1));
    }
  });

  test("4 execs at once each get their own output and exit code", async () => {
    const runs = [0, 1, 2, 3].map((i) => sh(`sleep 1; echo job${i}; echo err${i} >&2; exit ${i + 10}`));
    const started = Date.now();
    const results = await Promise.all(runs);
    results.forEach((r, i) => {
      assert.equal(r.out, `job${i}\n`);
      assert.equal(r.err, `err${i}\n`);
      assert.equal(r.exitCode, i + 10);
    });
    // They overlapped: four 1 s sleeps in parallel take far less than 4 s.
    assert.ok(Date.now() - started < 3900, `took ${Date.now() - started} ms`);
  });

  test("cancel: SIGTERM reaches the whole process group and nothing is left running", async () => {
    const h1 = sb.exec({ argv: ["sh", "-c", "sleep 1001 & sleep 1002 & wait"] });
    await waitForProcess("sleep 1002");
    await sb.terminate(h1, 3000);
    const r = await h1.done;
    assert.equal(r.signal, 15);
    assert.equal(r.exitCode, 143);
    const left = await sh("ps -o args | grep -c '^sleep 100[12]' || true");
    assert.equal(left.out.trim(), "0");
  });

  test("cancel: a command that ignores SIGTERM is SIGKILLed after the grace period", async () => {
    const h2: ExecHandle = sb.exec({ argv: ["sh", "-c", "trap '' TERM; sleep 1003 & wait; wait"] });
    await waitForProcess("sleep 1003");
    const started = Date.now();
    await sb.terminate(h2, 1500);
    const r = await h2.done;
    const took = Date.now() - started;
    assert.equal(r.signal, 9);
    assert.equal(r.exitCode, 137);
    assert.ok(took >= 1400, `killed after ${took} ms, before the grace period`);
    const left = await sh("ps -o args | grep -c '^sleep 1003' || true");
    assert.equal(left.out.trim(), "0");
  });

  test("files: write, read back and list, with modes and parent dirs", async () => {
    const data = randomBytes(3 * 1024 * 1024 + 17);
    await sb.writeFile("/workspace/sub/blob.bin", data, 0o600);
    assert.ok((await sb.readFile("/workspace/sub/blob.bin")).equals(data));
    const r = await sh("stat -c '%a %s' /workspace/sub/blob.bin");
    assert.equal(r.out.trim(), `600 ${data.length}`);
    const entries = await sb.listFiles("/workspace");
    assert.deepEqual(
      entries.map((e) => [e.name, e.isDir]),
      [["sub", true]],
    );
    await assert.rejects(
      sb.readFile("/no/such/file"),
      (e: Error & { code?: string }) => e.code === "FILE_FAILED",
    );
  });

  test("stdin with flow control: 4 MiB into a slow reader arrives whole", async () => {
    const data = randomBytes(4 * 1024 * 1024);
    let out = "";
    const hd = sb.exec(
      { argv: ["sh", "-c", "sleep 1; sha256sum | cut -d' ' -f1"], stdin: true },
      {
        onStdout: (d) => {
          out += d.toString();
        },
      },
    );
    await hd.writeStdin(data);
    hd.endStdin();
    const r = await hd.done;
    assert.equal(r.exitCode, 0);
    const { createHash } = await import("node:crypto");
    assert.equal(out.trim(), createHash("sha256").update(data).digest("hex"));
  });

  test("the VM is still healthy after all of the above", async () => {
    await sb.ping();
    assert.equal((await sh("echo ok")).out, "ok\n");
  });
});

/** A client of the VM's exec relay, as `matchlock exec` is. */
async function relayClient(): Promise<AgentClient> {
  const sock = connect(join(sb.dir, "relay.sock"));
  await new Promise((r) => sock.once("connect", r));
  const client = new AgentClient(sock);
  await client.ready;
  return client;
}

describe("exec relay clients", () => {
  test("files stream through the relay both ways; a write that fails (ENOSPC) leaves no file", async () => {
    const c = await relayClient();
    try {
      const data = randomBytes(8 * 1024 * 1024);
      await c.writeFile("/tmp/relay/big.bin", data, 0o600);
      assert.ok((await c.readFile("/tmp/relay/big.bin")).equals(data));
      assert.equal(
        (await sh("mkdir -p /mnt/tiny && mount -t tmpfs -o size=1m tmpfs /mnt/tiny && echo ok")).out,
        "ok\n",
      );
      await assert.rejects(c.writeFile("/mnt/tiny/f", data), /No space left/);
      assert.equal((await sh("test -e /mnt/tiny/f && echo left || echo gone")).out, "gone\n");
      // A failed write to a device never removes the device.
      await assert.rejects(c.writeFile("/dev/full", data), /No space left/);
      assert.equal((await sh("test -c /dev/full && echo dev")).out, "dev\n");
    } finally {
      c.close();
    }
  });

  test("guest attack: an endless file read through the relay is cut at the client's limit and cancelled in the guest", async () => {
    const c = await relayClient();
    try {
      await assert.rejects(c.readFile("/dev/zero", 4 * 1024 * 1024), /larger than 4194304 bytes/);
      assert.equal((await c.readFile("/etc/hostname")).toString(), `${sb.hostname}\n`);
      // The agent (PID 1) closed the file: nothing keeps reading /dev/zero.
      await new Promise((r) => setTimeout(r, 300));
      assert.equal((await sh("ls -l /proc/1/fd | grep -c /dev/zero")).out, "0\n");
    } finally {
      c.close();
    }
  });

  test("slow reader: a relay client that never takes output holds the guest at the window", async () => {
    const c = await relayClient();
    let delivered = 0;
    const h = c.exec(
      {
        argv: ["head", "-c", "67108864", "/dev/zero"],
        env: [],
        cwd: "",
        user: "",
        tty: false,
        stdin: false,
        mkdirCwd: false,
      },
      {
        onStdout: (d) => {
          delivered += d.length;
          return new Promise<void>(() => {}); // never done with it: never acknowledged
        },
      },
    );
    await new Promise((r) => setTimeout(r, 3000));
    assert.ok(delivered > 0 && delivered <= 256 * 1024, `${delivered} bytes delivered unacknowledged`);
    const running = "ps -o args | grep -c '^head -c 67108864'";
    assert.equal((await sh(running)).out, "1\n", "the writer should be blocked, not finished");
    c.close(); // the client goes away: its command is cancelled
    await h.done.catch(() => {});
    for (let i = 0; i < 50 && (await sh(running)).out !== "0\n"; i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal((await sh(running)).out, "0\n");
  });
});

async function waitForProcess(args: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const r = await sh(`ps -o args | grep -q '^${args}' && echo yes || echo no`);
    if (r.out.trim() === "yes") return;
    await new Promise((res) => setTimeout(res, 50));
  }
  throw new Error(`${args} never started`);
}
