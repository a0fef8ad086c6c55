import type { SandboxConfig } from "../api/config.ts";
import { InvalidArgumentError } from "../api/errors.ts";
import { compileHooks } from "../net/hooks.ts";
import { AllowList, hostPatternProblem } from "../net/host-policy.ts";
import { newPlaceholder, type Secret, SecretBook, validateSecret } from "../net/secrets.ts";
import type { InterceptPolicy } from "../net/vm-network.ts";

/**
 * From a sandbox config to intercept mode's policy (NETWORK.md §1, §6): whether it is on, the
 * allow-list (secret hosts join it, as in Matchlock), the secrets with their placeholders, and the
 * VM's CA. Real secret values leave this module only inside the SecretBook (owner memory); the
 * config the sandbox keeps and records carries placeholders, never values.
 */

/** Matchlock's rule: any allow-list, secret, `intercept` or interception rules turn the proxy on. */
export function interceptRequested(config: SandboxConfig): boolean {
  const n = config.network;
  return (
    n.intercept ||
    n.interception !== undefined ||
    n.allowed_hosts.length > 0 ||
    Object.keys(n.secrets).length > 0
  );
}

/** The guest's env for intercept mode: Matchlock's four CA variables, then the secret placeholders. */
export const GUEST_CA_PATH = "/etc/ssl/certs/matchlock-ca.crt";
export const CA_ENV: Readonly<Record<string, string>> = {
  SSL_CERT_FILE: GUEST_CA_PATH,
  REQUESTS_CA_BUNDLE: GUEST_CA_PATH,
  CURL_CA_BUNDLE: GUEST_CA_PATH,
  NODE_EXTRA_CA_CERTS: GUEST_CA_PATH,
};

export interface PreparedPolicy {
  /** The config with every secret's placeholder filled in and no value: what the sandbox keeps. */
  config: SandboxConfig;
  policy: InterceptPolicy | undefined;
  /** Added to every command's env (CA variables, placeholders). */
  env: Record<string, string>;
}

/**
 * Checks the network policy of a config (one error naming the bad pattern or secret) and builds it.
 * With no network, asking for a policy is an error, as in Matchlock: there is nothing to apply it to.
 */
export async function prepareNetworkPolicy(config: SandboxConfig): Promise<PreparedPolicy> {
  const n = config.network;
  if (!interceptRequested(config)) return { config, policy: undefined, env: {} };
  if (n.no_network) {
    throw new InvalidArgumentError(
      "no_network cannot be combined with an allow-list, secrets or network interception",
      "drop --no-network, or the --allow-host/--secret/--network-intercept flags",
    );
  }
  for (const h of n.allowed_hosts) {
    const problem = hostPatternProblem(h);
    if (problem) throw new InvalidArgumentError(`invalid allowed host: ${problem}`);
  }
  const secrets: Secret[] = Object.entries(n.secrets).map(([name, s]) => {
    if (s.value === undefined || s.value === "") {
      throw new InvalidArgumentError(
        `secret ${name} has no value`,
        `give it as NAME=VALUE@host, or export ${name} before --secret ${name}@host`,
      );
    }
    const secret = {
      name,
      value: s.value,
      placeholder: s.placeholder || newPlaceholder(),
      hosts: [...s.hosts],
    };
    validateSecret(secret);
    return secret;
  });
  const hooks = compileHooks(n.interception);
  const book = new SecretBook(secrets);
  const allow = new AllowList([...n.allowed_hosts, ...book.hosts()]);
  // Loaded here, not at the top: @peculiar/x509 is ~200 files and only intercept mode needs a CA,
  // so a plain `run` (and every other command) starts without it.
  const { MitmCa } = await import("../net/mitm-ca.ts");
  const ca = await MitmCa.create();
  const redacted: SandboxConfig["network"]["secrets"] = {};
  for (const s of secrets) redacted[s.name] = { placeholder: s.placeholder, hosts: s.hosts };
  return {
    config: { ...config, network: { ...n, secrets: redacted } },
    policy: { allow, secrets: book, ca, ...(hooks.isEmpty ? {} : { hooks }) },
    env: { ...CA_ENV, ...book.env() },
  };
}
