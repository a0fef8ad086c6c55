import { MatchlockError } from "../api/errors.ts";
import { type Db, nowIso, stmt, writeTx } from "./db.ts";

/**
 * Per-VM /24 subnets for the host side of a VM's TAP: `10.99.<octet>.0/24`, gateway `.1`, guest
 * `.2`. The octet is UNIQUE in the table and chosen inside a write transaction, so concurrent
 * processes never get the same one.
 */

export const SUBNET_PREFIX = "10.99";
const MIN_OCTET = 1;
const MAX_OCTET = 254;

export interface SubnetAllocation {
  vm_id: string;
  octet: number;
  gateway_ip: string;
  guest_ip: string;
  subnet: string;
  created_at: string;
}

export class SubnetStore {
  private readonly db: Db;
  constructor(db: Db) {
    this.db = db;
  }

  /** The lowest free octet, passing over those `inUse` says the host already routes. */
  allocate(vmId: string, inUse: (subnet: string) => boolean = () => false): SubnetAllocation {
    return writeTx(this.db, () => {
      const existing = this.get(vmId);
      if (existing) return existing;
      const used = new Set(
        (stmt(this.db, "SELECT octet FROM subnet_allocations").all() as Array<{ octet: number }>).map(
          (r) => r.octet,
        ),
      );
      let octet = MIN_OCTET;
      while ((used.has(octet) || inUse(`${SUBNET_PREFIX}.${octet}.0/24`)) && octet <= MAX_OCTET) octet++;
      if (octet > MAX_OCTET) {
        throw new MatchlockError(
          "NETWORK_FAILED",
          `no free subnet: all of ${SUBNET_PREFIX}.1-${MAX_OCTET}.0/24 are allocated or routed`,
          {
            hint: "run `matchlock gc` to release subnets of dead VMs, or use --no-network",
          },
        );
      }
      const row: SubnetAllocation = {
        vm_id: vmId,
        octet,
        gateway_ip: `${SUBNET_PREFIX}.${octet}.1`,
        guest_ip: `${SUBNET_PREFIX}.${octet}.2`,
        subnet: `${SUBNET_PREFIX}.${octet}.0/24`,
        created_at: nowIso(),
      };
      stmt(
        this.db,
        "INSERT INTO subnet_allocations(vm_id, octet, gateway_ip, guest_ip, subnet, created_at) VALUES (?, ?, ?, ?, ?, ?)",
      ).run(row.vm_id, row.octet, row.gateway_ip, row.guest_ip, row.subnet, row.created_at);
      return row;
    });
  }

  get(vmId: string): SubnetAllocation | undefined {
    return stmt(this.db, "SELECT * FROM subnet_allocations WHERE vm_id = ?").get(vmId) as
      | SubnetAllocation
      | undefined;
  }

  list(): SubnetAllocation[] {
    return stmt(this.db, "SELECT * FROM subnet_allocations ORDER BY octet").all() as SubnetAllocation[];
  }

  release(vmId: string): boolean {
    return writeTx(
      this.db,
      () => stmt(this.db, "DELETE FROM subnet_allocations WHERE vm_id = ?").run(vmId).changes > 0,
    );
  }
}
