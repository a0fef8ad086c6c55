import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  DEFAULT_PATH,
  mergeEnv,
  parseEnvFile,
  parseEnvSpec,
  resolveArgv,
  validateUser,
} from "../../src/sandbox/command.ts";

describe("Docker's rules for argv, env and user", () => {
  const image = { entrypoint: ["/entry"], cmd: ["default", "args"] };

  test("argv = entrypoint + cmd, with the run's command replacing Cmd", () => {
    assert.deepEqual(resolveArgv(image, []), ["/entry", "default", "args"]);
    assert.deepEqual(resolveArgv(image, ["x"]), ["/entry", "x"]);
  });

  test("--entrypoint replaces the entrypoint and drops the image's Cmd", () => {
    assert.deepEqual(resolveArgv(image, [], ["/other"]), ["/other"]);
    assert.deepEqual(resolveArgv(image, ["a"], ["/other"]), ["/other", "a"]);
  });

  test('--entrypoint "" clears it', () => {
    assert.deepEqual(resolveArgv(image, ["ls"], []), ["ls"]);
    assert.throws(() => resolveArgv(image, [], []), /no command to run/);
    assert.throws(() => resolveArgv({}, []), /no command to run/);
  });

  test("env layers override in order and PATH is defaulted", () => {
    assert.deepEqual(mergeEnv({ A: "1", B: "1" }, { B: "2" }, undefined, { C: "3" }), [
      "A=1",
      "B=2",
      "C=3",
      `PATH=${DEFAULT_PATH}`,
    ]);
    assert.deepEqual(mergeEnv({ PATH: "/x" }), ["PATH=/x"]);
  });

  test("-e KEY=VALUE keeps '=' in values; a bare KEY copies the host value", () => {
    assert.deepEqual(parseEnvSpec("A=b=c"), ["A", "b=c"]);
    assert.deepEqual(parseEnvSpec("A="), ["A", ""]);
    assert.deepEqual(parseEnvSpec("HOSTY", { HOSTY: "v" }), ["HOSTY", "v"]);
    assert.throws(() => parseEnvSpec("NOPE", {}), /not set on the host/);
    assert.throws(() => parseEnvSpec("1BAD=x"), /invalid environment variable name/);
    assert.throws(() => parseEnvSpec("=x"), /invalid environment variable name/);
  });

  test("env files skip comments and blanks and name the bad line", () => {
    assert.deepEqual(parseEnvFile("# c\n\nA=1\r\n  B=two words \n", "f"), [
      ["A", "1"],
      ["B", "two words"],
    ]);
    assert.throws(() => parseEnvFile("A=1\nbad key=1\n", "vars.env"), /vars\.env:2/);
  });

  test("user specs: uid, uid:gid, name, name:group; anything else is refused", () => {
    for (const ok of ["0", "1000", "1000:1000", "user", "user:users", "www-data"])
      assert.equal(validateUser(ok), ok);
    for (const bad of ["", "a b", "x:y:z", ":1", "1:", "../etc"])
      assert.throws(() => validateUser(bad), /invalid user/);
  });
});
