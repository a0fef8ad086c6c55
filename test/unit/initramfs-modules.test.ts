import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { stripModule, withoutSignature } from "../../src/guest/initramfs.ts";

/**
 * The guest's kernel modules go into the initramfs without their signature and BTF. A stand-in
 * module: a relocatable ELF with `.BTF`/`.BTF.ext` sections, built with the C compiler setup
 * installs, and a signature trailer laid out as the kernel's sign-file appends it.
 */

const MAGIC = "~Module signature appended~\n";

/** sign-file's trailer: signature, struct module_signature (id_type 2 = PKCS#7, sig_len BE), magic. */
function signed(body: Buffer, sigLen = 470): Buffer {
  const info = Buffer.alloc(12);
  info[2] = 2;
  info.writeUInt32BE(sigLen, 8);
  return Buffer.concat([body, Buffer.alloc(sigLen, 0xa5), info, Buffer.from(MAGIC, "latin1")]);
}

let scratch = "";
let elf = Buffer.alloc(0);

before(() => {
  scratch = mkdtempSync(join(tmpdir(), "matchlock-modules-"));
  writeFileSync(
    join(scratch, "m.c"),
    'const char btf[] __attribute__((section(".BTF"), used)) = "types";\n' +
      'const char btf_ext[] __attribute__((section(".BTF.ext"), used)) = "lines";\n' +
      "int keep_me(int x) { return x + 1; }\n",
  );
  const r = spawnSync(process.env.CC ?? "cc", ["-c", "-o", join(scratch, "m.ko"), join(scratch, "m.c")]);
  assert.equal(r.status, 0, r.stderr?.toString());
  elf = readFileSync(join(scratch, "m.ko"));
});

after(() => rmSync(scratch, { recursive: true, force: true }));

function sections(ko: Buffer): string {
  const f = join(scratch, "check.ko");
  writeFileSync(f, ko);
  const r = spawnSync("readelf", ["-S", "-W", f]);
  assert.equal(r.status, 0, r.stderr.toString());
  return r.stdout.toString();
}

describe("module signature", () => {
  test("the trailer comes off exactly, down to the ELF it was appended to", () => {
    const body = Buffer.from("\x7fELF and the rest of a module");
    assert.ok(withoutSignature(signed(body)).equals(body));
    assert.ok(withoutSignature(signed(body, 0)).equals(body));
  });

  test("an unsigned module is returned as it is", () => {
    const body = Buffer.from("\x7fELF unsigned");
    assert.equal(withoutSignature(body), body);
    assert.equal(withoutSignature(Buffer.from(MAGIC, "latin1")).length, MAGIC.length);
  });

  test("a signature longer than the file is an error, not a slice from the wrong place", () => {
    assert.throws(() => withoutSignature(signed(Buffer.from("x")).subarray(400)), /malformed signature/);
  });
});

describe("stripModule", () => {
  test("removes the signature, .BTF and .BTF.ext and keeps the code", async () => {
    assert.match(sections(elf), /\.BTF\.ext/, "the stand-in has BTF to strip");
    const out = await stripModule(signed(elf), scratch, "m");
    const s = sections(out);
    assert.doesNotMatch(s, /\.BTF/);
    assert.match(s, / \.text /);
    assert.ok(!out.subarray(-MAGIC.length).equals(Buffer.from(MAGIC, "latin1")), "no signature left");
    const syms = spawnSync("nm", [join(scratch, "check.ko")]).stdout.toString();
    assert.match(syms, / T keep_me$/m);
  });

  test("a module with no BTF and no signature passes through objcopy unharmed", async () => {
    const plain = await stripModule(await stripModule(elf, scratch, "a"), scratch, "b");
    assert.match(sections(plain), / \.text /);
  });
});
