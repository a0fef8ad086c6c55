/**
 * Go's path.Match globs, which Matchlock uses for a hook rule's `path`:
 * - `*` any run of characters other than `/` (possibly empty);
 * - `?` one character other than `/`;
 * - `[abc]`, `[a-z]`, `[^a-z]` one character in (or not in) the class;
 * - `\c` the character c itself.
 * A pattern is parsed once; a malformed one is refused with the reason, where Go would report
 * ErrBadPattern only when a request reaches it.
 */

type Token =
  | { kind: "char"; c: number }
  | { kind: "star" }
  | { kind: "one" }
  | { kind: "class"; negated: boolean; ranges: Array<[number, number]> };

export class GlobError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GlobError";
  }
}

function parse(pattern: string): Token[] {
  const cs = Array.from(pattern, (c) => c.codePointAt(0) as number);
  const tokens: Token[] = [];
  let i = 0;
  /** One class member: a character, `\`-escaped or not; `-` and `]` must be escaped there. */
  const member = (): number => {
    const c = cs[i];
    if (c === undefined) throw new GlobError("unclosed [");
    if (c === 0x5c) {
      const e = cs[i + 1];
      if (e === undefined) throw new GlobError("ends with a lone \\");
      i += 2;
      return e;
    }
    if (c === 0x2d || c === 0x5d) {
      throw new GlobError(
        `unescaped ${String.fromCodePoint(c)} in a [class] (write \\${String.fromCodePoint(c)})`,
      );
    }
    i++;
    return c;
  };
  while (i < cs.length) {
    const c = cs[i] as number;
    if (c === 0x2a) {
      i++;
      if (tokens.at(-1)?.kind !== "star") tokens.push({ kind: "star" }); // ** is *
    } else if (c === 0x3f) {
      i++;
      tokens.push({ kind: "one" });
    } else if (c === 0x5c) {
      const e = cs[i + 1];
      if (e === undefined) throw new GlobError("ends with a lone \\");
      i += 2;
      tokens.push({ kind: "char", c: e });
    } else if (c === 0x5b) {
      i++;
      const negated = cs[i] === 0x5e;
      if (negated) i++;
      const ranges: Array<[number, number]> = [];
      while (cs[i] !== 0x5d || ranges.length === 0) {
        const lo = member();
        let hi = lo;
        if (cs[i] === 0x2d) {
          i++;
          hi = member();
          if (hi < lo) {
            throw new GlobError(
              `the range ${String.fromCodePoint(lo)}-${String.fromCodePoint(hi)} is reversed`,
            );
          }
        }
        ranges.push([lo, hi]);
      }
      i++; // the closing ]
      tokens.push({ kind: "class", negated, ranges });
    } else {
      i++;
      tokens.push({ kind: "char", c });
    }
  }
  return tokens;
}

const SLASH = 0x2f;

function matchesOne(t: Token, c: number): boolean {
  switch (t.kind) {
    case "char":
      return t.c === c;
    case "one":
      return c !== SLASH;
    case "class":
      return t.ranges.some(([lo, hi]) => lo <= c && c <= hi) !== t.negated;
    case "star":
      return false;
  }
}

export class PathGlob {
  readonly pattern: string;
  readonly #tokens: Token[];

  /** Throws GlobError naming what is wrong with the pattern. */
  constructor(pattern: string) {
    this.pattern = pattern;
    this.#tokens = parse(pattern);
  }

  /**
   * Greedy matching that remembers only the last `*`: since no `*` crosses a `/`, an earlier star
   * can never reach a position the last one cannot, so backtracking to it alone is complete. Linear
   * in practice, at worst the product of the two lengths.
   */
  matches(path: string): boolean {
    const text = Array.from(path, (c) => c.codePointAt(0) as number);
    const tokens = this.#tokens;
    let i = 0;
    let j = 0;
    let star = -1;
    let resume = 0;
    while (i < text.length) {
      const t = tokens[j];
      if (t?.kind === "star") {
        star = j++;
        resume = i;
      } else if (t !== undefined && matchesOne(t, text[i] as number)) {
        i++;
        j++;
      } else if (star >= 0 && text[resume] !== SLASH) {
        i = ++resume;
        j = star + 1;
      } else return false;
    }
    while (tokens[j]?.kind === "star") j++;
    return j === tokens.length;
  }
}

/** Why `pattern` is not a valid glob, or undefined. */
export function globProblem(pattern: string): string | undefined {
  try {
    new PathGlob(pattern);
    return undefined;
  } catch (e) {
    if (e instanceof GlobError) return e.message;
    throw e;
  }
}
