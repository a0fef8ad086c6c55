/**
 * Where a sandbox's start went, phase by phase: written to the VM's boot.log so a slow start can be
 * explained after the fact (and benchmarks can show their breakdown without instrumenting code).
 */
export class PhaseTimer {
  private readonly t0 = performance.now();
  private last = this.t0;
  private readonly phases: Array<[string, number]> = [];

  /** Ends the phase called `name` (it began where the previous one ended). */
  mark(name: string): void {
    const now = performance.now();
    this.phases.push([name, now - this.last]);
    this.last = now;
  }

  /** "312 ms: image 4, network 35, …" (phases under 1 ms are left out). */
  summary(): string {
    const parts = this.phases.filter(([, ms]) => ms >= 1).map(([n, ms]) => `${n} ${Math.round(ms)}`);
    return `${Math.round(this.last - this.t0)} ms: ${parts.join(", ")}`;
  }
}
