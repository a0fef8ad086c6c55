import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import fc from "fast-check";
import { FUSE_KERNEL_VERSION, Op } from "../../src/vfs/fuse-abi.ts";
import { MemoryProvider } from "../../src/vfs/memory.ts";
import { FuseServer } from "../../src/vfs/server.ts";
import { serveStream } from "../../src/vfs/stream.ts";
import { cstr, message, u32 } from "../helpers/fuse-client.ts";
import { runs } from "../helpers/property.ts";

/** The byte-stream transport (what the virtio-serial port gives): requests cut on their own length. */

const dir = mkdtempSync("/tmp/vfs-stream-");
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;

/** A connected socket pair: `host` is served, `guest` is the relay's end. */
async function pair(): Promise<{ host: Socket; guest: Socket; close: () => void }> {
  const path = join(dir, `s${n++}`);
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(path, r));
  const hostP = new Promise<Socket>((r) => srv.once("connection", r));
  const guest = connect(path);
  const host = await hostP;
  return {
    host,
    guest,
    close: () => {
      guest.destroy();
      host.destroy();
      srv.close();
    },
  };
}

/** Reads whole replies off the guest end, cut on their length. */
function replies(guest: Socket): { next: () => Promise<Buffer> } {
  let buf = Buffer.alloc(0);
  const waiting: (() => void)[] = [];
  guest.on("data", (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    for (const w of waiting.splice(0)) w();
  });
  return {
    next: async () => {
      for (;;) {
        if (buf.length >= 4 && buf.length >= buf.readUInt32LE(0)) {
          const len = buf.readUInt32LE(0);
          const out = buf.subarray(0, len);
          buf = buf.subarray(len);
          return out;
        }
        await new Promise<void>((r) => waiting.push(r));
      }
    },
  };
}

const init = () =>
  message(
    Op.INIT,
    0n,
    Buffer.concat([u32(FUSE_KERNEL_VERSION), u32(31), u32(0), u32(0), Buffer.alloc(48)]),
    1n,
  );

describe("serveStream", () => {
  test("property: requests split at any byte boundaries get one reply each", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.integer({ min: 1, max: 200 }), { minLength: 1, maxLength: 20 }),
        async (cuts) => {
          const { host, guest, close } = await pair();
          const server = new FuseServer({ provider: new MemoryProvider(), log: () => {} });
          serveStream(server, host);
          const r = replies(guest);
          try {
            const msgs = [
              init(),
              ...Array.from({ length: 10 }, (_, i) => message(Op.LOOKUP, 1n, cstr(`n${i}`), BigInt(i + 2))),
            ];
            const bytes = Buffer.concat(msgs);
            let at = 0;
            for (const c of cuts) {
              if (at >= bytes.length) break;
              guest.write(bytes.subarray(at, at + c));
              at += c;
            }
            if (at < bytes.length) guest.write(bytes.subarray(at));
            const uniques = new Set<bigint>();
            for (let i = 0; i < msgs.length; i++) uniques.add((await r.next()).readBigUInt64LE(8));
            assert.equal(uniques.size, msgs.length);
          } finally {
            close();
          }
        },
      ),
      runs(50),
    );
  });

  test("a length the framing cannot survive closes the stream; the server is unharmed", async () => {
    const { host, guest, close } = await pair();
    const server = new FuseServer({ provider: new MemoryProvider(), log: () => {} });
    const served = serveStream(server, host);
    try {
      const bad = Buffer.alloc(8);
      bad.writeUInt32LE(0xffffffff, 0);
      guest.write(bad);
      assert.match((await served.done) ?? "", /request length 4294967295/);
      // The same server keeps answering on a new stream.
      const again = await pair();
      serveStream(server, again.host);
      const r = replies(again.guest);
      again.guest.write(init());
      assert.equal((await r.next()).readInt32LE(4), 0);
      again.close();
    } finally {
      close();
    }
  });
});
