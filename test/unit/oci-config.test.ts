import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { InvalidArgumentError } from "../../src/api/errors.ts";
import { readOciConfig } from "../../src/image/oci-config.ts";
import { imageConfigOf } from "../../src/image/store.ts";

/** Image configs come from archives and registries: untrusted JSON, checked before any field is used. */

const dir = mkdtempSync(join(tmpdir(), "matchlock-oci-config-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function config(json: string) {
  const path = join(dir, "config.json");
  writeFileSync(path, json);
  return readOciConfig(path, "registry.test/app");
}

test("hostile image configs (null, Env: 5, Cmd: [5], garbage) are one InvalidArgumentError naming the field", () => {
  for (const [json, where] of [
    ["null", /registry\.test\/app: the image config/],
    ['{"config": {"Env": 5}}', /at config\.Env/],
    ['{"config": {"Cmd": [5]}}', /at config\.Cmd\.0/],
    ['{"os": {}}', /at os/],
    ["{not json", /not valid JSON/],
  ] as const) {
    assert.throws(
      () => config(json),
      (e: unknown) => e instanceof InvalidArgumentError && where.test(e.message),
      json,
    );
  }
});

test("a valid config gives the run settings, unknown fields ignored", () => {
  const oci = config(
    '{"os":"linux","architecture":"amd64","config":{"Env":["A=1","B"],"Cmd":["sh"],"User":"1000","Labels":{}},"rootfs":{}}',
  );
  assert.deepEqual(imageConfigOf(oci), { env: { A: "1" }, cmd: ["sh"], user: "1000" });
  assert.deepEqual(imageConfigOf(config('{"config": null}')), { env: {} });
});
