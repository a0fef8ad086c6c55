/**
 * Fault injection for the crash-safety tests: MATCHLOCK_TEST_CRASH_AT=<phase> makes the owning
 * process SIGKILL itself right after recording that lifecycle phase, leaving whatever it holds for
 * `matchlock gc` to find. Test-only; documented in the README (Development).
 */
export function crashPoint(phase: string): void {
  if (process.env.MATCHLOCK_TEST_CRASH_AT === phase) process.kill(process.pid, "SIGKILL");
}

/**
 * MATCHLOCK_TEST_FAULT=<point>: the fallback tests make something fail at a named point (a clone
 * made ahead of time dying as it is taken or adopted). Test-only; documented in the README (Development).
 */
export function faultAt(point: string): boolean {
  return process.env.MATCHLOCK_TEST_FAULT === point;
}
