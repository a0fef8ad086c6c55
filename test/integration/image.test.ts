import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { runCli, tempHome } from "../helpers/cli.ts";
import { busyboxLayer, dockerSave, makeTar, ociLayout } from "../helpers/images.ts";

/**
 * Images end to end: import docker-save and OCI-layout archives, run them with their config
 * applied, share blobs between tags, remove and collect them, and refuse hostile archives without
 * leaving anything half-written. A private MATCHLOCK_CACHE holds the store (the kernel and agent
 * come from the real cache through MATCHLOCK_KERNEL-free defaults, so only images move).
 */

const h = tempHome();
const cacheEnv = { ...h.env };
after(() => h.cleanup());

function blobsBytes(): number {
  const dir = join(
    process.env.MATCHLOCK_CACHE ?? join(process.env.HOME ?? "/root", ".cache", "matchlock"),
    "images",
    "blobs",
    "sha256",
  );
  if (!existsSync(dir)) return 0;
  return readdirSync(dir).reduce((n, f) => n + statSync(join(dir, f)).size, 0);
}

async function importFile(tag: string, archive: Buffer, name: string) {
  const file = join(h.home, name);
  writeFileSync(file, archive);
  return runCli(["image", "import", tag, "-i", file], { env: cacheEnv });
}

describe("image import and run", () => {
  const tag = `mltest-app-${process.pid}:1`;
  const tag2 = `mltest-app-${process.pid}:again`;
  const ociTag = `mltest-oci-${process.pid}:1`;

  test("a docker-save archive imports, and its Cmd, Env, User and WorkingDir apply", async () => {
    const upper = await makeTar([
      { name: "bin/.wh.wc" },
      { name: "opt/", type: "directory" },
      { name: "opt/hello", content: "from layer two\n" },
    ]);
    const archive = await dockerSave({
      layers: [await busyboxLayer(), upper],
      config: {
        Env: ["FOO=bar", "PATH=/bin"],
        User: "app",
        WorkingDir: "/home/app",
        Cmd: [
          "sh",
          "-c",
          'echo "$FOO $(pwd) $(id -u):$(id -g)"; cat /opt/hello; test -e /bin/wc && echo wc-present || echo wc-gone',
        ],
      },
    });
    const r = await importFile(tag, archive, "app.tar");
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout.toString(), /^docker\.io\/library\/mltest-app-\d+:1 sha256:[0-9a-f]{64}\n$/);
    const run = await runCli(["run", "--image", tag], { env: cacheEnv });
    assert.equal(run.stdout.toString(), "bar /home/app 4242:4343\nfrom layer two\nwc-gone\n", run.stderr);
    const override = await runCli(["run", "--image", tag, "-u", "0", "--", "sh", "-c", "id -u; echo $FOO"], {
      env: cacheEnv,
    });
    assert.equal(override.stdout.toString(), "0\nbar\n");
  });

  test("a second tag of the same image adds no bytes", async () => {
    const before = blobsBytes();
    const archive = await dockerSave({ layers: [await busyboxLayer()], config: { Cmd: ["true"] } });
    await importFile(`mltest-base-${process.pid}:1`, archive, "base1.tar");
    const afterFirst = blobsBytes();
    assert.ok(afterFirst >= before);
    const again = await importFile(tag2, archive, "base2.tar");
    assert.equal(again.code, 0, again.stderr);
    assert.equal(blobsBytes(), afterFirst);
  });

  test("an OCI layout with gzip layers behind a multi-arch index picks linux/amd64", async () => {
    const archive = await ociLayout({
      layers: [await busyboxLayer()],
      config: { Entrypoint: ["/bin/echo"], Cmd: ["oci-default"] },
    });
    const r = await importFile(ociTag, archive, "oci.tar");
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      (await runCli(["run", "--image", ociTag], { env: cacheEnv })).stdout.toString(),
      "oci-default\n",
    );
    assert.equal(
      (await runCli(["run", "--image", ociTag, "--", "given"], { env: cacheEnv })).stdout.toString(),
      "given\n",
    );
  });

  test("image ls, rm and gc", async () => {
    const ls = (await runCli(["image", "ls"], { env: cacheEnv })).stdout.toString();
    assert.match(ls, /matchlock\/default:latest\s+builtin/);
    assert.match(ls, new RegExp(`docker.io/library/mltest-app-${process.pid}:1\\s+local`));
    const json = JSON.parse(
      (await runCli(["image", "ls", "--json"], { env: cacheEnv })).stdout.toString(),
    ) as Array<{
      tag: string;
      scope: string;
      digest: string;
      size: number;
    }>;
    const app = json.find((i) => i.tag === `docker.io/library/mltest-app-${process.pid}:1`);
    assert.equal(app?.scope, "local");
    assert.match(app?.digest ?? "", /^sha256:[0-9a-f]{64}$/);
    assert.ok((app?.size ?? 0) > 0);
    assert.equal(json[0]?.tag, "matchlock/default:latest");
    for (const t of [tag, tag2, ociTag, `mltest-base-${process.pid}:1`]) {
      assert.equal((await runCli(["image", "rm", t], { env: cacheEnv })).code, 0);
    }
    const gc = await runCli(["image", "gc"], { env: cacheEnv });
    assert.match(gc.stdout.toString(), /freed \d+ blobs/);
    const gone = await runCli(["run", "--image", tag, "--", "true"], { env: cacheEnv });
    assert.equal(gone.code, 1);
    // Not in the store, so matchlock tries to pull it; there is no registry for it here.
    assert.match(gone.stderr, /is not here, and pulling it failed/);
  });

  test("image attack: an archive with a ../ entry is refused, naming it, and leaves no blob behind", async () => {
    const before = blobsBytes();
    const evil = await makeTar([{ name: "../../escape.txt", content: "x" }]);
    const archive = await dockerSave({ layers: [await busyboxLayer(), evil] });
    const r = await importFile(`mltest-evil-${process.pid}:1`, archive, "evil.tar");
    assert.equal(r.code, 1);
    assert.match(r.stderr, /escape\.txt/);
    assert.match(r.stderr, /\.\./);
    assert.doesNotMatch(r.stderr, /^\s+at /m);
    assert.equal(blobsBytes(), before);
    const ls = (await runCli(["image", "ls"], { env: cacheEnv })).stdout.toString();
    assert.doesNotMatch(ls, /mltest-evil/);
  });

  test("docker save | matchlock image import TAG reads the archive from stdin", async () => {
    const archive = await dockerSave({
      layers: [await busyboxLayer()],
      config: { Cmd: ["echo", "from-stdin"] },
    });
    const t = `mltest-stdin-${process.pid}:1`;
    const r = await runCli(["image", "import", t], { env: cacheEnv, input: archive });
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await runCli(["run", "--image", t], { env: cacheEnv })).stdout.toString(), "from-stdin\n");
    await runCli(["image", "rm", t], { env: cacheEnv });
  });

  test("file capabilities (binary xattrs) survive import and work in the VM", async () => {
    // GNU tar writes the capability as a raw SCHILY.xattr pax record, as real image builders do.
    const stage = join(h.home, "capstage");
    execFileSync("mkdir", ["-p", join(stage, "opt/cap")]);
    execFileSync("cp", ["/bin/busybox", join(stage, "opt/cap/busybox")]);
    execFileSync("setcap", ["cap_net_raw+ep", join(stage, "opt/cap/busybox")]);
    const layer = execFileSync("tar", ["--xattrs", "--xattrs-include=*", "-C", stage, "-cf", "-", "."], {
      maxBuffer: 64 * 1024 * 1024,
    });
    const t = `mltest-cap-${process.pid}:1`;
    const r = await importFile(t, await dockerSave({ layers: [await busyboxLayer(), layer] }), "cap.tar");
    assert.equal(r.code, 0, r.stderr);
    const run = await runCli(
      ["run", "--image", t, "-u", "4242", "--", "/opt/cap/busybox", "grep", "CapEff", "/proc/self/status"],
      { env: cacheEnv },
    );
    // cap_net_raw is bit 13: a non-root user running the file gets it, as on the host.
    assert.match(run.stdout.toString(), /CapEff:\s+0000000000002000/, run.stderr);
    await runCli(["image", "rm", t], { env: cacheEnv });
  });

  test("not an image archive: one clear error", async () => {
    const r = await importFile("junk:1", await makeTar([{ name: "hello.txt", content: "hi" }]), "junk.tar");
    assert.equal(r.code, 1);
    assert.match(r.stderr, /not an image archive/);
  });
});
