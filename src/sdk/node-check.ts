import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { UnsupportedNodeError } from "../api/errors.ts";
import { unsupportedNodeMessage } from "../api/node-support.ts";

/**
 * The SDK's first import: on a Node.js matchlock does not support, importing the SDK throws one
 * UnsupportedNodeError (code UNSUPPORTED_NODE) whose message is one line naming the Node needed,
 * before anything else loads, instead of a sandbox that dies later (the CLI's segfault on Node 20).
 *
 * The SDK starts the CLI on this program's Node (client.ts passes it to bin/matchlock), so this
 * program's Node is the CLI's, except in a checkout of matchlock: there `npm ci` brought the
 * package's own Node 24, which bin/matchlock prefers, and any Node may drive it.
 */

const ownNode = fileURLToPath(new URL("../../node_modules/.bin/node", import.meta.url));
const refusal = unsupportedNodeMessage(process.versions.node);
if (refusal !== undefined && !existsSync(ownNode)) throw new UnsupportedNodeError(refusal);
