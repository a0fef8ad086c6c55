import { InvalidArgumentError as CommanderArgError } from "commander";

/** Option-value parsers: a bad value gives commander's one-line "option … argument … is invalid". */

export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export function positiveNumber(value: string): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n) || n <= 0)
    throw new CommanderArgError("expected a number > 0");
  return n;
}

export function positiveInt(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value.trim()) || n <= 0) throw new CommanderArgError("expected a whole number > 0");
  return n;
}

export function boolValue(value: string | boolean): boolean {
  if (typeof value === "boolean") return value;
  if (/^(true|1|yes)$/i.test(value)) return true;
  if (/^(false|0|no)$/i.test(value)) return false;
  throw new CommanderArgError("expected true or false");
}

/** Durations as Go writes them: `500ms`, `3s`, `1m30s`, or a bare number of seconds. */
export function durationMs(value: string): number {
  const v = value.trim();
  if (/^\d+(\.\d+)?$/.test(v)) return Number(v) * 1000;
  const units: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  let total = 0;
  let rest = v;
  while (rest.length > 0) {
    const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)/.exec(rest);
    if (!m?.[1] || !m[2]) throw new CommanderArgError("expected a duration such as 500ms, 3s or 1m");
    total += Number(m[1]) * (units[m[2]] ?? 0);
    rest = rest.slice(m[0].length);
  }
  if (v.length === 0) throw new CommanderArgError("expected a duration such as 500ms, 3s or 1m");
  if (total > MAX_DURATION_MS) throw new CommanderArgError("at most 24 days");
  return total;
}

/** Past this a Node timer fires at once (it holds a signed 32-bit count of milliseconds). */
const MAX_DURATION_MS = 2 ** 31 - 1;

/**
 * Terminal-safe text: C0 and C1 control characters (ESC above all), DEL and the Unicode
 * bidirectional and line-separator controls are shown as `\xNN` / `\uNNNN`, so user input echoed
 * into an error (a hostile VM name, a guest's console line) cannot move the cursor, retitle the
 * window or disguise itself. Tab stays; newlines stay only where a multi-line text is expected.
 */
export function escapeControls(text: string, opts: { keepNewlines?: boolean } = {}): string {
  return text.replace(
    // biome-ignore lint/suspicious/noControlCharactersInRegex: matching control characters is the point
    /[\u0000-\u0008\u000a-\u001f\u007f-\u009f\u200e\u200f\u2028-\u202e\u2066-\u2069]/g,
    (c) => {
      if (c === "\n" && opts.keepNewlines) return c;
      const code = c.charCodeAt(0);
      return code < 0x80
        ? `\\x${code.toString(16).padStart(2, "0")}`
        : `\\u${code.toString(16).padStart(4, "0")}`;
    },
  );
}
