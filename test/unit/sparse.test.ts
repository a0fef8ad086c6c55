import assert from "node:assert/strict";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { copySparse, dataExtents } from "../../src/host/sparse.ts";

const dir = mkdtempSync(join(tmpdir(), "matchlock-sparse-"));
after(() => rmSync(dir, { recursive: true, force: true }));

describe("sparse copies", () => {
  test("only the data extents are copied: same bytes, holes stay holes", async () => {
    const src = join(dir, "src.img");
    const fd = openSync(src, "w");
    const size = 32 * 1024 * 1024;
    writeSync(fd, Buffer.alloc(8192, 1), 0, 8192, 0);
    writeSync(fd, Buffer.alloc(4096, 2), 0, 4096, 16 * 1024 * 1024);
    writeSync(fd, Buffer.from("tail"), 0, 4, size - 4);
    closeSync(fd);
    const ext = dataExtents(openSync(src, "r"), size);
    assert.ok(ext.length >= 3, `three data regions at least: ${JSON.stringify(ext)}`);
    assert.ok(ext.reduce((n, e) => n + e.length, 0) < 1024 * 1024, "the holes are not data");

    const dst = join(dir, "dst.img");
    await copySparse(src, dst);
    assert.equal(statSync(dst).size, size);
    assert.ok(statSync(dst).blocks * 512 < 2 * 1024 * 1024, "the copy is sparse too");
    assert.ok(readFileSync(dst).equals(readFileSync(src)), "byte-identical");
    await assert.rejects(copySparse(src, dst), /EEXIST/, "never overwrites");
  });

  test("an empty file copies to an empty file", async () => {
    const src = join(dir, "empty");
    closeSync(openSync(src, "w"));
    await copySparse(src, join(dir, "empty2"));
    assert.equal(statSync(join(dir, "empty2")).size, 0);
  });
});
