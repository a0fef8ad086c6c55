import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { runCli, tempHome } from "../helpers/cli.ts";
import { dockerSave } from "../helpers/images.ts";

/**
 * A realistic image: a Debian rootfs made with debootstrap (minbase plus curl, ca-certificates and
 * python3) and a non-root user, packed as a docker-save archive, imported, and run in a VM. The
 * rootfs tar is cached between runs (~/.cache/matchlock-test); a fresh machine builds it (~1 min).
 */

const PACKAGES = "python3,curl,ca-certificates";
const CACHE = join(homedir(), ".cache", "matchlock-test");
const LAYER = join(CACHE, `debian-bookworm-minbase-${PACKAGES.replaceAll(",", "+")}.tar`);
const TAG = `mltest-debian-${process.pid}:12`;
const h = tempHome();

function buildLayer(): void {
  if (existsSync(LAYER)) return;
  const root = join(tmpdir(), `matchlock-debootstrap-${process.pid}`);
  rmSync(root, { recursive: true, force: true });
  try {
    execFileSync(
      "debootstrap",
      ["--variant=minbase", `--include=${PACKAGES}`, "bookworm", root, "http://deb.debian.org/debian"],
      { stdio: ["ignore", "ignore", "pipe"], timeout: 15 * 60_000 },
    );
    execFileSync("chroot", [root, "useradd", "-m", "-u", "1001", "tester"]);
    mkdirSync(CACHE, { recursive: true });
    execFileSync("tar", ["--numeric-owner", "-C", root, "-cf", `${LAYER}.tmp`, "."]);
    renameSync(`${LAYER}.tmp`, LAYER);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

describe("a realistic Debian image", () => {
  before(async () => {
    buildLayer();
    const archive = await dockerSave(
      {
        layers: [readFileSync(LAYER)],
        config: {
          Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
          Cmd: ["bash"],
          User: "tester",
          WorkingDir: "/home/tester",
        },
      },
      "debian-test:12",
    );
    const file = join(h.home, "debian.tar");
    writeFileSync(file, archive);
    const r = await runCli(["image", "import", TAG, "-i", file], { env: h.env, timeoutMs: 300_000 });
    assert.equal(r.code, 0, r.stderr);
    rmSync(file);
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
