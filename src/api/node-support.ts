/**
 * The Node.js versions matchlock runs on, declared once: package.json's `engines.node` says the same
 * (a unit test holds them together), the CLI's entry and the SDK refuse any other with one line, and
 * `matchlock diagnose` checks it.
 *
 * Why 22.15: the image code imports `createZstdDecompress` from node:zlib (zstd layers), which Node
 * has from 22.15 (and 23.8); an older Node cannot even link the CLI's modules. better-sqlite3 13's
 * prebuilt addon needs Node-API 10 (22.14+): on Node 20 it crashes the process with a segfault.
 * Node 23 is not supported: it is out of support, and 23.0-23.7 lack zstd.
 *
 * The CLI's entry imports this before anything else, on whatever Node the user has, so this file
 * keeps to syntax and APIs that any Node with ES modules parses and has: no imports, no `?.`/`??`.
 */

/** package.json's engines.node. */
export const NODE_ENGINES = "^22.15.0 || >=24";

/** Whether Node `version` ("22.15.0", "v24.1.0") is one matchlock supports: 22.15+ in 22, or 24+. */
export function nodeSupported(version: string): boolean {
  const parts = version.replace(/^v/, "").split(".");
  const major = Number(parts[0]);
  const minor = Number(parts[1]);
  if (!(major >= 0) || !(minor >= 0)) return false;
  return major >= 24 || (major === 22 && minor >= 15);
}

/**
 * The one line that refuses an unsupported Node, naming what is needed and how to get it, or
 * undefined when `version` is supported.
 */
export function unsupportedNodeMessage(version: string): string | undefined {
  if (nodeSupported(version)) return undefined;
  return (
    "matchlock needs Node.js 24, or 22.15 or a later 22 (this is v" +
    version.replace(/^v/, "") +
    "); install it from https://nodejs.org or with your version manager (e.g. nvm install 24)"
  );
}
