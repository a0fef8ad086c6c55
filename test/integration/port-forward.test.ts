import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { connect } from "node:net";
import { after, before, describe, test } from "node:test";
import { Client, Sandbox } from "../../src/sdk/index.ts";
import { CLI, runCli, tempHome } from "../helpers/cli.ts";

/** Port forwarding over the agent channel: VMs here have no NIC at all, and it still works. */

const h = tempHome();
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** Sends `body`, half-closes, and collects everything the server answers until it closes. */
function halfCloseRoundTrip(port: number, body: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = connect({ port, host: "127.0.0.1", allowHalfOpen: true });
    const got: Buffer[] = [];
    s.on("data", (d: Buffer) => got.push(d));
    s.on("end", () => resolve(Buffer.concat(got)));
    s.on("error", reject);
    s.on("connect", () => s.end(body));
  });
}

describe("port forwarding through the SDK", () => {
  let client: Client;
  let big: string;
  before(async () => {
    client = new Client({ env: h.env });
    await client.launch(new Sandbox().withNoNetwork());
    await client.exec(
      "mkdir -p /www && head -c 6000000 /dev/urandom > /www/big.bin && echo hello > /www/index.html",
    );
    big = (await client.exec("sha256sum /www/big.bin | cut -d' ' -f1")).stdout.trim();
    await client.exec("busybox httpd -p 80 -h /www");
  });
  after(async () => {
    await client?.close();
  });

  test("an HTTP server in the guest, reached from the host; a 6 MB response arrives intact", async () => {
    const [b] = await client.portForward("0:80");
    assert.ok(b && b.localPort > 0 && b.remotePort === 80 && b.address === "127.0.0.1");
    const r = await fetch(`http://127.0.0.1:${b.localPort}/index.html`);
    assert.equal(r.status, 200);
    assert.equal(await r.text(), "hello\n");
    const body = Buffer.from(await (await fetch(`http://127.0.0.1:${b.localPort}/big.bin`)).arrayBuffer());
    assert.equal(body.length, 6_000_000);
    assert.equal(sha(body), big);
    // Several at once.
    const many = await Promise.all(
      Array.from({ length: 8 }, () =>
        fetch(`http://127.0.0.1:${b.localPort}/index.html`).then((x) => x.text()),
      ),
    );
    assert.deepEqual(many, Array(8).fill("hello\n"));
  });

  test("half-close: a reply sent after the request's end is not cut off", async () => {
    await client.exec(
      "(busybox nc -l -p 7000 -e sh -c 'cat > /tmp/req; wc -c < /tmp/req; cat /tmp/req') >/dev/null 2>&1 &",
    );
    await new Promise((r) => setTimeout(r, 300));
    const [b] = await client.portForward("0:7000");
    const body = randomBytes(2 * 1024 * 1024);
    const reply = await halfCloseRoundTrip(b?.localPort as number, body);
    const nl = reply.indexOf(10);
    assert.equal(reply.subarray(0, nl).toString().trim(), String(body.length));
    assert.equal(sha(reply.subarray(nl + 1)), sha(body));
  });

  test("a guest port nobody listens on: the host connection is reset, the VM is fine", async () => {
    const [b] = await client.portForward("0:9");
    await assert.rejects(fetch(`http://127.0.0.1:${b?.localPort}/`));
    assert.equal((await client.exec("echo ok")).stdout, "ok\n");
  });

  test("a bad spec is a clear error", async () => {
    await assert.rejects(client.portForward("99999"), /bad remote port/);
  });
});

describe("port forwarding from the CLI", () => {
  after(() => h.cleanup());

  test("run -d -p, and matchlock port-forward through the relay", async () => {
    const d = await runCli(
      [
        "run",
        "-d",
        "-p",
        "0:80",
        "--",
        "sh",
        "-c",
        "mkdir -p /www; echo via-cli > /www/i; busybox httpd -f -p 80 -h /www",
      ],
      { env: h.env },
    );
    assert.equal(d.code, 0, d.stderr);
    const id = d.stdout.toString().trim();
    const pf = spawn(process.execPath, [CLI, "port-forward", id, "0:80"], { env: h.env });
    let out = "";
    pf.stdout.on("data", (x: Buffer) => (out += x.toString()));
    while (!/forwarding 127\.0\.0\.1:\d+/.test(out)) await new Promise((r) => setTimeout(r, 100));
    const port = Number(/127\.0\.0\.1:(\d+)/.exec(out)?.[1]);
    let text = "";
    for (let i = 0; i < 50 && text !== "via-cli\n"; i++) {
      text = await fetch(`http://127.0.0.1:${port}/i`)
        .then((r) => r.text())
        .catch(() => "");
      if (text !== "via-cli\n") await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(text, "via-cli\n");
    pf.kill("SIGINT");
    await new Promise((r) => pf.on("close", r));
    assert.equal((await runCli(["kill", id], { env: h.env })).code, 0);
    await runCli(["rm", id], { env: h.env });
  });

  test("bad -p values are refused before anything boots", async () => {
    for (const spec of ["abc", "1:2:3", "0", "70000"]) {
      const r = await runCli(["run", "-p", spec, "--", "true"], { env: h.env });
      assert.equal(r.code, 1, spec);
      assert.match(r.stderr, /invalid port spec/);
    }
  });
});
