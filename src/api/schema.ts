import * as v from "valibot";

/**
 * Schema helpers every wire declaration in src/api uses: objects that refuse unknown keys with a
 * "did you mean", and one-line descriptions of the first issue.
 */

/** Levenshtein distance, for "did you mean". */
function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(
        (prev[j] ?? 0) + 1,
        (cur[j - 1] ?? 0) + 1,
        (prev[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    prev = cur;
  }
  return prev[b.length] ?? 0;
}

/**
 * The known key an unknown one most likely meant: `memory` → `memory_mb`, `secrets` →
 * `network.secrets`. A candidate may be a dotted path; its last part is what is compared.
 */
export function suggestKey(key: string, candidates: readonly string[]): string | undefined {
  const k = key.toLowerCase();
  let best: { name: string; score: number } | undefined;
  for (const name of candidates) {
    const leaf = (name.split(".").pop() ?? name).toLowerCase();
    const d = editDistance(k, leaf);
    const prefix = k.length >= 3 && (leaf.startsWith(k) || k.startsWith(leaf));
    const score = d === 0 ? 0 : prefix ? 1 : d <= 2 ? d + 1 : Number.POSITIVE_INFINITY;
    if (score < (best?.score ?? Number.POSITIVE_INFINITY)) best = { name, score };
  }
  return best?.name;
}

/** An issue valibot raises for a key the schema does not declare. */
export function isUnknownKeyIssue(issue: v.BaseIssue<unknown>): boolean {
  return issue.type === "strict_object" && issue.expected === "never";
}

/**
 * An object schema that refuses keys it does not declare: a misspelt or unimplemented field
 * (`resources.memory`, top-level `secrets`) must fail naming it, never boot on defaults.
 * `extraCandidates` adds dotted paths elsewhere in the config worth suggesting.
 */
export function strictObject<const E extends v.ObjectEntries>(
  entries: E,
  extraCandidates: readonly string[] = [],
) {
  const candidates = [...Object.keys(entries), ...extraCandidates];
  return v.strictObject(entries, (issue) => {
    if (issue.expected !== "never" || typeof issue.input !== "string") return issue.message;
    const guess = suggestKey(issue.input, candidates);
    return guess === undefined ? "unknown key" : `unknown key (did you mean ${guess}?)`;
  });
}

/**
 * One line for the first issue, naming where it is: `unknown key resources.memory (did you mean
 * memory_mb?)` or `resources.cpus: Invalid value…`. Shared by the config parser and the RPC edge.
 */
export function describeIssue(issue: v.BaseIssue<unknown> | undefined, root = "params"): string {
  if (!issue) return `${root}: invalid`;
  const where = issue.path?.map((p) => String(p.key)).join(".") || root;
  if (isUnknownKeyIssue(issue)) return issue.message.replace(/^unknown key/, `unknown key ${where}`);
  return `${where}: ${issue.message}`;
}
