import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import {
  MAX_ENV_FILE_BYTES,
  readEnvFile,
  validateCommand,
  validateWorkdir,
} from "../../src/sandbox/command.ts";

/** Bad commands and env files are refused up front, with one line naming what is wrong (issue #8). */

const dir = mkdtempSync(join(tmpdir(), "matchlock-cmd-"));
after(() => rmSync(dir, { recursive: true, force: true }));

const req = (over: Partial<Parameters<typeof validateCommand>[0]> = {}) => ({
  argv: ["true"],
  env: ["PATH=/bin"],
  cwd: "/",
  user: "",
  tty: false,
  stdin: false,
  mkdirCwd: true,
  ...over,
});

describe("command limits", () => {
  test("70000 arguments are refused as the caller's error, not a RangeError after boot", () => {
    const argv = ["true", ...Array.from({ length: 70_000 }, (_, i) => String(i))];
    assert.throws(
      () => validateCommand(req({ argv })),
      (e: Error) => {
        return e instanceof InvalidArgumentError && /70001 arguments/.test(e.message);
      },
    );
  });

  test("more than 1 MiB of arguments and environment is refused", () => {
    const big = "x".repeat(100_000);
    assert.throws(
      () => validateCommand(req({ env: Array.from({ length: 12 }, (_, i) => `V${i}=${big}`) })),
      InvalidArgumentError,
    );
  });

  test("a NUL byte in an argument is refused", () => {
    assert.throws(() => validateCommand(req({ argv: ["echo", "a\0b"] })), /NUL/);
  });

  test("-w relative is refused like Docker does, naming the directory", () => {
    assert.throws(
      () => validateWorkdir("relative"),
      /working directory "relative" is invalid: it must be an absolute path/,
    );
    assert.throws(() => validateCommand(req({ cwd: "tmp" })), InvalidArgumentError);
    assert.equal(validateWorkdir("/tmp/x"), "/tmp/x");
  });
});

describe("--env-file reading", () => {
  test("a missing file gives one line naming it", async () => {
    await assert.rejects(readEnvFile("/nonexistent/env"), {
      message: "--env-file /nonexistent/env: no such file",
    });
  });

  test("/dev/zero is refused past the size bound instead of growing without limit", async () => {
    await assert.rejects(readEnvFile("/dev/zero"), /--env-file \/dev\/zero: larger than 1 MiB/);
  });

  test("a directory is refused clearly", async () => {
    await assert.rejects(readEnvFile(dir), /is a directory/);
  });

  test("a file at the bound is read; one byte more is refused", async () => {
    const ok = join(dir, "ok.env");
    writeFileSync(ok, "A=1\n".padEnd(MAX_ENV_FILE_BYTES, "#"));
    assert.equal((await readEnvFile(ok)).length, MAX_ENV_FILE_BYTES);
    const over = join(dir, "over.env");
    writeFileSync(over, "#".repeat(MAX_ENV_FILE_BYTES + 1));
    await assert.rejects(readEnvFile(over), /larger than 1 MiB/);
  });
});
