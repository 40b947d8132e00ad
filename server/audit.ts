import type { Db } from './db/index.ts';
import type { ActorType } from './db/schema.ts';

/** Who did something: an operator, an API token, a device, or the server itself. */
export interface Actor {
  type: ActorType;
  id: string | null;
}

export const SYSTEM: Actor = { type: 'system', id: null };

export interface AuditEntry {
  orgId: string | null;
  action: string;
  resourceType?: string;
  resourceId?: string;
  details?: Record<string, unknown>;
}

/** Appends one audit record; callers pass their transaction so the record commits with the change. */
export async function audit(db: Db, actor: Actor, entry: AuditEntry): Promise<void> {
  await db
    .insertInto('audit_log')
    .values({
      org_id: entry.orgId,
      actor_type: actor.type,
      actor_id: actor.id,
      action: entry.action,
      resource_type: entry.resourceType ?? null,
      resource_id: entry.resourceId ?? null,
      details: JSON.stringify(entry.details ?? {}),
    })
    .execute();
}
