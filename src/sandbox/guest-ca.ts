import type { AgentClient } from "../guest/agent-client.ts";
import { GUEST_CA_PATH } from "./network-policy.ts";

/**
 * Puts the VM's CA where guest programs look (NETWORK.md §6). Matchlock's path and variables are
 * kept; ours: the CA is also appended to the image's own bundle, so tools that ignore the variables
 * (Python's ssl default context, Java's, wget) trust it too, and Matchlock's file holds the image's
 * bundle after our CA, so TLS on ports we do not intercept (passed through by address) still verifies
 * public servers for programs that follow SSL_CERT_FILE.
 */

/** Where distributions keep their CA bundle (Debian/Ubuntu/Alpine, Fedora/RHEL, openSUSE, Alpine's link). */
const BUNDLES = [
  "/etc/ssl/certs/ca-certificates.crt",
  "/etc/pki/tls/certs/ca-bundle.crt",
  "/etc/ssl/ca-bundle.pem",
  "/etc/ssl/cert.pem",
];

export async function installGuestCa(agent: AgentClient, caPem: string): Promise<void> {
  const ours = caPem.endsWith("\n") ? caPem : `${caPem}\n`;
  let imageBundle = "";
  for (const path of BUNDLES) {
    let text: string;
    try {
      text = (await agent.readFile(path)).toString("utf8");
    } catch {
      continue; // absent (or unreadable): nothing to extend
    }
    if (text.includes(ours.trim())) continue; // another path linked to a bundle already extended
    if (imageBundle === "") imageBundle = text;
    const sep = text === "" || text.endsWith("\n") ? "" : "\n";
    // Written through: a bundle that is a symlink (Alpine's cert.pem) stays one.
    await agent.writeFile(path, Buffer.from(`${text}${sep}${ours}`), 0o644);
  }
  const tail = imageBundle === "" || imageBundle.endsWith("\n") ? imageBundle : `${imageBundle}\n`;
  await agent.writeFile(GUEST_CA_PATH, Buffer.from(`${ours}${tail}`), 0o644, { replaceLink: true });
}
