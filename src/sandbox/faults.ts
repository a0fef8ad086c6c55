/**
 * Fault injection for the crash-safety tests: MATCHLOCK_TEST_CRASH_AT=<phase> makes the owning
 * process SIGKILL itself right after recording that lifecycle phase, leaving whatever it holds for
 * `matchlock gc` to find. Test-only; documented in docs/testing.md.
 */
export function crashPoint(phase: string): void {
  if (process.env.MATCHLOCK_TEST_CRASH_AT === phase) process.kill(process.pid, "SIGKILL");
}
