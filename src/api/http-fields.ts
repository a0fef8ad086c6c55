/**
 * The grammar of HTTP header fields (RFC 9110 §5), for validating what network hooks put into
 * requests and responses before the proxy sends it: a bad name or value would make Node throw at
 * send time, or worse, inject a header.
 */

/** RFC 9110 §5.6.2: `token = 1*tchar`. Header names and methods are tokens. */
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

export function isToken(s: string): boolean {
  return TOKEN.test(s);
}

// biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is the point
const CONTROL = /[\x00-\x1f\x7f]/;
// biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is the point
const CONTROLS = /[\x00-\x1f\x7f]+/g;

/** Whether `s` holds a C0 control character or DEL (labels, paths and messages must not). */
export function hasControlChar(s: string): boolean {
  return CONTROL.test(s);
}

/** `s` on one line: every run of control characters becomes a space. */
export function withoutControlChars(s: string): string {
  return s.replace(CONTROLS, " ");
}

/** What Node's http module sends in a header value: tab, visible ASCII, space and Latin-1. */
const SENDABLE = /^[\t\x20-\x7e\x80-\xff]*$/;

/** Why `value` cannot be a header value, or undefined when it can. */
export function headerValueProblem(value: string): string | undefined {
  if (/[\r\n\0]/.test(value)) return "the value contains CR, LF or NUL (it would inject headers)";
  if (!SENDABLE.test(value)) {
    return "the value contains a control character or a character above U+00FF (Node cannot send it)";
  }
  return undefined;
}

/**
 * Go's http.CanonicalHeaderKey, the spelling Matchlock's callbacks see: the first letter and every
 * letter after a hyphen upper case, the rest lower case (`x-team-ID` → `X-Team-Id`). A name that is
 * not a token is returned unchanged, as Go does.
 */
export function canonicalHeaderKey(name: string): string {
  if (!isToken(name)) return name;
  let out = "";
  let upper = true;
  for (const c of name) {
    out += upper ? c.toUpperCase() : c.toLowerCase();
    upper = c === "-";
  }
  return out;
}
