import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { runCli, tempHome } from "../helpers/cli.ts";
import { importDebianImage } from "../helpers/debian.ts";

/**
 * A realistic image: the shared Debian test image (test/helpers/debian.ts: debootstrap minbase plus curl,
 * ca-certificates, python3 and python3-requests, and a non-root user), imported and run in a VM. Its
 * rootfs tar is cached between runs (~/.cache/matchlock-test); a fresh machine builds it (~1–2 min).
 */

const TAG = `mltest-debian-${process.pid}:12`;
const h = tempHome();

describe("a realistic Debian image", () => {
  before(async () => {
    await importDebianImage(h.env, TAG);
  });
  after(async () => {
    await runCli(["image", "rm", TAG], { env: h.env });
    await runCli(["image", "gc"], { env: h.env });
    h.cleanup();
  });

  test("python3, curl and a non-root user work in the VM", async () => {
    const r = await runCli(
      ["run", "--image", TAG, "--", "sh", "-c", "python3 -c 'print(6*7)'; curl --version | head -1; id; pwd"],
      { env: h.env },
    );
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.toString().split("\n");
    assert.equal(lines[0], "42");
    assert.match(lines[1] ?? "", /^curl \d+\.\d+/);
    assert.equal(lines[2], "uid=1001(tester) gid=1001(tester) groups=1001(tester)");
    assert.equal(lines[3], "/home/tester");
  });

  test("the image's files keep their owners, modes and links", async () => {
    const r = await runCli(
      [
        "run",
        "--image",
        TAG,
        "-u",
        "0",
        "--",
        "sh",
        "-c",
        "stat -c '%U %a' /usr/bin/passwd /tmp /home/tester; readlink /usr/bin/python3; test -L /lib && echo lib-is-link",
      ],
      { env: h.env },
    );
    assert.equal(
      r.stdout.toString(),
      "root 4755\nroot 1777\ntester 755\npython3.11\nlib-is-link\n",
      r.stderr,
    );
  });
});
