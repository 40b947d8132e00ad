import type { Selectable } from 'kysely';
import type { AuditLogTable } from '../db/schema.ts';
import type { FleetContext } from './context.ts';
import { isUuid } from './errors.ts';
import { type Page, pageBounds } from './paging.ts';

export type AuditRecord = Selectable<AuditLogTable>;

export interface AuditFilter {
  /** Omit only for server-wide admins. */
  orgId?: string;
  resourceType?: string;
  resourceId?: string;
  action?: string;
  limit?: number;
  offset?: number;
}

/** Audit records, newest first. */
export async function listAuditLog(ctx: FleetContext, filter: AuditFilter = {}): Promise<Page<AuditRecord>> {
  const { limit, offset } = pageBounds(filter.limit, filter.offset);
  if (filter.orgId !== undefined && !isUuid(filter.orgId)) return { items: [], total: 0 };
  let query = ctx.db.selectFrom('audit_log');
  if (filter.orgId) query = query.where('org_id', '=', filter.orgId);
  if (filter.resourceType) query = query.where('resource_type', '=', filter.resourceType);
  if (filter.resourceId) query = query.where('resource_id', '=', filter.resourceId);
  if (filter.action) query = query.where('action', '=', filter.action);
  const [items, count] = await Promise.all([
    query.selectAll().orderBy('id', 'desc').limit(limit).offset(offset).execute(),
    query.select((eb) => eb.fn.countAll<number>().as('n')).executeTakeFirstOrThrow(),
  ]);
  return { items, total: Number(count.n) };
}
