import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import type * as v from "valibot";
import {
  RpcClientNotifications,
  RpcCode,
  type RpcMethod,
  RpcMethods,
  RpcResults,
  RpcServerNotifications,
} from "../../src/api/rpc.ts";

/**
 * docs/rpc.md is checked against the one declaration of the protocol (src/api/rpc.ts): every
 * method has a row naming its params and result keys, every notification (both ways) and every
 * error code is documented. Adding to the protocol without documenting it fails here.
 */

const doc = readFileSync(new URL("../../docs/rpc.md", import.meta.url), "utf8");
const rows = doc.split("\n").filter((l) => l.startsWith("| `"));

/** The methods table row whose first cell names `method`. */
function rowOf(method: string): string {
  const row = rows.find((r) => (r.split("|")[1] ?? "").includes(`\`${method}\``));
  assert.ok(row, `docs/rpc.md has no row for ${method}`);
  return row;
}

/** Top-level keys of an object schema (through optional/pipe wrappers); [] for anything else. */
function keysOf(schema: v.GenericSchema): string[] {
  let s = schema as v.GenericSchema & { entries?: Record<string, unknown>; wrapped?: v.GenericSchema };
  while (s.wrapped) s = s.wrapped as typeof s;
  return s.entries ? Object.keys(s.entries) : [];
}

describe("docs/rpc.md matches src/api/rpc.ts", () => {
  test("every method has a row naming its params (the config aside) and result keys", () => {
    for (const method of Object.keys(RpcMethods) as RpcMethod[]) {
      const row = rowOf(method);
      const cells = row.split("|");
      // `same` means exec's params (plus any the cell adds).
      const paramsCell = (cells[2] ?? "").trim().startsWith("same") ? `${rowOf("exec")} ${cells[2]}` : row;
      if (method !== "create") {
        for (const key of keysOf(RpcMethods[method])) {
          assert.ok(paramsCell.includes(key), `${method}: param ${key} is not documented`);
        }
      }
      for (const key of keysOf(RpcResults[method])) {
        assert.ok(row.includes(key), `${method}: result key ${key} is not documented`);
      }
    }
  });

  test("every table row is a declared method (nothing documented that does not exist)", () => {
    for (const row of rows) {
      for (const m of (row.split("|")[1] ?? "").matchAll(/`([a-z_]+)`/g)) {
        assert.ok(Object.hasOwn(RpcMethods, m[1] as string), `docs/rpc.md documents unknown method ${m[1]}`);
      }
    }
  });

  test("every notification, both ways, and every error code is documented", () => {
    for (const n of [...Object.keys(RpcServerNotifications), ...Object.keys(RpcClientNotifications)]) {
      assert.ok(doc.includes(`\`${n}`), `notification ${n} is not documented`);
    }
    const errors = doc.slice(doc.indexOf("## Errors"));
    for (const [name, code] of Object.entries(RpcCode)) {
      assert.ok(errors.includes(String(code)), `error ${name} (${code}) is not in the Errors section`);
    }
  });
});
