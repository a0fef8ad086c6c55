import assert from "node:assert/strict";
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Duplex } from "node:stream";
import { after, before, describe, test } from "node:test";
import { paths } from "../../src/api/paths.ts";
import { agentBinaryPath } from "../../src/guest/agent-build.ts";
import { AgentClient } from "../../src/guest/agent-client.ts";
import { FrameDecoder, GuestMsg, HEADER_SIZE, HostMsg } from "../../src/guest/protocol.ts";

/**
 * The host side of the agent protocol against the real agent binary (built by `matchlock setup`) in
 * its --stdio mode: no VM needed, so these run in a second. Then a hostile "guest" that sends
 * broken frames.
 */

const AGENT = agentBinaryPath(paths());

describe("agent client ↔ real agent (--stdio)", () => {
  let child: ChildProcessWithoutNullStreams;
  let client: AgentClient;

  before(async () => {
    assert.ok(existsSync(AGENT), `${AGENT} is missing: run \`matchlock setup\` first`);
    child = spawn(AGENT, ["--stdio"], { stdio: ["pipe", "pipe", "pipe"] });
    client = new AgentClient(Duplex.from({ readable: child.stdout, writable: child.stdin }));
    assert.equal(await client.ready, "matchlock-agent 1");
  });
  after(() => {
    client.close();
    child.kill("SIGKILL");
  });

  async function run(
    argv: string[],
    opts: { stdin?: Buffer; env?: string[]; user?: string; cwd?: string } = {},
  ) {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const h = client.exec(
      {
        argv,
        env: opts.env ?? ["PATH=/usr/bin:/bin"],
        cwd: opts.cwd ?? "",
        user: opts.user ?? "",
        tty: false,
        stdin: opts.stdin !== undefined,
        mkdirCwd: false,
      },
      {
        onStdout: (d) => {
          out.push(d);
        },
        onStderr: (d) => {
          err.push(d);
        },
      },
    );
    if (opts.stdin) {
      await h.writeStdin(opts.stdin);
      h.endStdin();
    }
    const r = await h.done;
    return { ...r, out: Buffer.concat(out), err: Buffer.concat(err).toString() };
  }

  test("exit codes and signals", async () => {
    assert.equal((await run(["sh", "-c", "exit 7"])).exitCode, 7);
    const killed = await run(["sh", "-c", "kill -9 $$"]);
    assert.deepEqual([killed.exitCode, killed.signal], [137, 9]);
  });

  test("a missing program: start error and 127", async () => {
    const r = await run(["/no/such/program"]);
    assert.equal(r.exitCode, 127);
    assert.match(r.startError ?? "", /\/no\/such\/program/);
  });

  test("10 MiB through cat with the 256 KiB flow-control window", async () => {
    const data = randomBytes(10 * 1024 * 1024);
    const r = await run(["cat"], { stdin: data });
    assert.equal(r.exitCode, 0);
    assert.equal(
      createHash("sha256").update(r.out).digest("hex"),
      createHash("sha256").update(data).digest("hex"),
    );
  });

  test("50 execs at once", async () => {
    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) => run(["sh", "-c", `echo ${i}; exit ${i % 5}`])),
    );
    results.forEach((r, i) => {
      assert.equal(r.out.toString(), `${i}\n`);
      assert.equal(r.exitCode, i % 5);
    });
  });

  test("files round trip; errors name the path", async () => {
    const dir = join(tmpdir(), `matchlock-agent-test-${process.pid}`);
    const data = randomBytes(2 * 1024 * 1024 + 3);
    await client.writeFile(join(dir, "a/b.bin"), data, 0o640);
    assert.ok((await client.readFile(join(dir, "a/b.bin"))).equals(data));
    const list = await client.listDir(join(dir, "a"));
    assert.deepEqual(
      list.map((e) => [e.name, e.size, e.mode & 0o777]),
      [["b.bin", data.length, 0o640]],
    );
    await assert.rejects(client.readFile(join(dir, "missing")), /missing/);
    await run(["rm", "-rf", dir]);
  });
});

/** A fake guest: the host connects to it like to the agent port, and it sends what the test says. */
async function hostileGuest(bytes: Buffer): Promise<{ client: AgentClient; guest: Socket; close(): void }> {
  const path = join(tmpdir(), `matchlock-hostile-${process.pid}-${Math.random().toString(16).slice(2)}.sock`);
  let guest: Socket | undefined;
  const server = createServer((s) => {
    guest = s;
    s.on("error", () => {});
    s.write(bytes);
  });
  await new Promise<void>((r) => server.listen(path, r));
  const sock = connect(path);
  const client = new AgentClient(sock);
  await new Promise((r) => sock.once("connect", r));
  await new Promise((r) => setTimeout(r, 50));
  return { client, guest: guest as Socket, close: () => server.close() };
}

function frame(type: number, stream: number, payload: Buffer, claimedLen = payload.length): Buffer {
  const h = Buffer.alloc(HEADER_SIZE);
  h.writeUInt32LE(claimedLen, 0);
  h.writeUInt8(type, 4);
  h.writeUInt32LE(stream, 5);
  return Buffer.concat([h, payload]);
}

describe("hostile guest frames", () => {
  test("guest attack: an oversized frame header fails the connection with a protocol error, no allocation", async () => {
    const g = await hostileGuest(frame(GuestMsg.READY, 0, Buffer.alloc(0)));
    const h = g.client.exec({
      argv: ["x"],
      env: [],
      cwd: "",
      user: "",
      tty: false,
      stdin: false,
      mkdirCwd: false,
    });
    g.guest.write(frame(GuestMsg.STDOUT, 1, Buffer.alloc(16), 0xfffffff0));
    await assert.rejects(h.done, (e: Error & { code?: string }) => e.code === "AGENT_PROTOCOL");
    assert.match(g.client.failed?.message ?? "", /limit/);
    g.close();
  });

  test("guest attack: unknown frame types and malformed EXIT payloads are protocol errors", async () => {
    const bads = [
      (s: number) => frame(0x7f, s, Buffer.alloc(0)),
      (s: number) => frame(GuestMsg.EXIT, s, Buffer.alloc(3)),
    ];
    for (const bad of bads) {
      const g = await hostileGuest(frame(GuestMsg.READY, 0, Buffer.alloc(0)));
      const h = g.client.exec({
        argv: ["x"],
        env: [],
        cwd: "",
        user: "",
        tty: false,
        stdin: false,
        mkdirCwd: false,
      });
      g.guest.write(bad(h.stream));
      await assert.rejects(h.done, (e: Error & { code?: string }) => e.code === "AGENT_PROTOCOL");
      g.close();
    }
  });

  test("guest attack: frames for streams that do not exist are ignored, the client keeps working", async () => {
    const g = await hostileGuest(frame(GuestMsg.READY, 0, Buffer.alloc(0)));
    g.guest.write(frame(GuestMsg.STDOUT, 999, Buffer.from("spoof")));
    g.guest.write(frame(GuestMsg.EXIT, 12345, Buffer.alloc(8)));
    const h = g.client.exec({
      argv: ["x"],
      env: [],
      cwd: "",
      user: "",
      tty: false,
      stdin: false,
      mkdirCwd: false,
    });
    const exit = Buffer.alloc(8);
    exit.writeInt32LE(3, 0);
    g.guest.write(frame(GuestMsg.EXIT, h.stream, exit));
    assert.equal((await h.done).exitCode, 3);
    assert.equal(g.client.failed, undefined);
    g.client.close();
    g.close();
  });

  test("guest attack: output beyond the flow-control window cuts the guest off instead of being buffered", async () => {
    const g = await hostileGuest(frame(GuestMsg.READY, 0, Buffer.alloc(0)));
    let bytes = 0;
    const h = g.client.exec(
      { argv: ["x"], env: [], cwd: "", user: "", tty: false, stdin: false, mkdirCwd: false },
      {
        // A reader that never finishes: nothing is acknowledged, so the guest may send one window.
        onStdout: (d) => {
          bytes += d.length;
          return new Promise<void>(() => {});
        },
      },
    );
    const chunk = frame(GuestMsg.STDOUT, h.stream, Buffer.alloc(64 * 1024, 0x41));
    for (let i = 0; i < 64 && !g.client.failed; i++) {
      // The client may cut us off mid-write: never wait for a drain that cannot come.
      if (!g.guest.write(chunk)) await new Promise((r) => setTimeout(r, 20));
    }
    await assert.rejects(h.done, /without acknowledgement/);
    assert.ok(bytes <= 256 * 1024, `${bytes} bytes delivered past the window`);
    g.client.close();
    g.close();
  });

  test("output is acknowledged to the guest only once the reader is done with it", async () => {
    const g = await hostileGuest(frame(GuestMsg.READY, 0, Buffer.alloc(0)));
    let release!: () => void;
    const h = g.client.exec(
      { argv: ["x"], env: [], cwd: "", user: "", tty: false, stdin: false, mkdirCwd: false },
      {
        onStdout: () =>
          new Promise<void>((r) => {
            release = r;
          }),
      },
    );
    const acks: number[] = [];
    const decoder = new FrameDecoder("host");
    g.guest.on("data", (d: Buffer) => {
      for (const f of decoder.push(d)) if (f.type === HostMsg.ACK) acks.push(f.payload.readUInt32LE(0));
    });
    g.guest.write(frame(GuestMsg.STDOUT, h.stream, Buffer.alloc(64 * 1024, 0x41)));
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(acks, [], "acknowledged before the reader took it");
    release();
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(acks, [64 * 1024]);
    g.guest.write(frame(GuestMsg.EXIT, h.stream, Buffer.alloc(8)));
    await h.done;
    g.client.close();
    g.close();
  });
});
