import { sql, type RawBuilder } from 'kysely';
import type { Db } from '../db/index.ts';
import type { ConnectionStatus } from '../db/schema.ts';
import { fromSql, OPEN, stepSql } from './link-table.ts';

export { OPEN, OPEN_STATES } from './link-table.ts';

/** Which devices a reconcile covers: explicit ids or every member of a group. */
export type DeviceSet = { ids: string[] } | { groupId: string };

export interface CreatedAttempt {
  id: string;
  device_id: string;
  firmware_id: string;
  state: 'sent' | 'queued';
}

export interface ReconcileResult {
  created: CreatedAttempt[];
  cancelled: number;
}

function scopeSql(set: DeviceSet): RawBuilder<unknown> {
  return 'groupId' in set
    ? sql`SELECT device_id FROM group_devices WHERE group_id = ${set.groupId}`
    : sql`SELECT unnest(${set.ids}::uuid[]) AS device_id`;
}

/**
 * Target resolution, per device and component (the README quotes this):
 * 1. a device-level target overrides every group target;
 * 2. otherwise the newest deployment that told the device (docs/deployments.md), unless a group
 *    target was set after it told the device;
 * 3. otherwise, among the device's groups that have a target, the group with the lowest
 *    `priority` wins; on a tie, the most recently set target wins.
 * Only approved devices resolve a target.
 */
export function resolvedSql(set: DeviceSet, component: string): RawBuilder<unknown> {
  return sql`
    SELECT d.id AS device_id, d.org_id, d.connection_status,
           CASE WHEN ${component} = 'firmware' THEN d.firmware_uuid ELSE dc.firmware_id END AS running_id,
           CASE WHEN ${component} = 'firmware' THEN d.firmware_version ELSE dc.version END AS running_version,
           COALESCE(dt.firmware_id, CASE WHEN dep.wins THEN dep.firmware_id END, gt.firmware_id) AS target_id,
           COALESCE(dt.set_at, CASE WHEN dep.wins THEN dep.told_at END, gt.set_at) AS target_set_at,
           CASE WHEN dt.firmware_id IS NOT NULL THEN 'device' WHEN dep.wins THEN 'deployment:' || dep.id
                WHEN gt.group_id IS NOT NULL THEN 'group:' || gt.group_id END AS via
    FROM devices d
    JOIN (${scopeSql(set)}) scope ON scope.device_id = d.id
    LEFT JOIN device_components dc ON dc.device_id = d.id AND dc.component = ${component}
    LEFT JOIN targets dt ON dt.device_id = d.id AND dt.component = ${component}
    LEFT JOIN LATERAL (
      SELECT t.firmware_id, t.group_id, t.set_at
      FROM group_devices gd
      JOIN groups g ON g.id = gd.group_id
      JOIN targets t ON t.group_id = g.id AND t.component = ${component}
      WHERE gd.device_id = d.id
      ORDER BY g.priority ASC, t.set_at DESC, t.id DESC
      LIMIT 1
    ) gt ON true
    -- The newest deployment that told the device (docs/deployments.md): it wins over a group
    -- target set before the device was told, while the device is in flight in a running or paused
    -- deployment, and for good once it succeeded there (a device that failed falls back).
    LEFT JOIN LATERAL (
      SELECT dp.id, dp.firmware_id, dd.told_at, (gt.set_at IS NULL OR dd.told_at >= gt.set_at) AS wins
      FROM deployment_devices dd
      JOIN deployments dp ON dp.id = dd.deployment_id
      WHERE dd.device_id = d.id AND dd.told_at IS NOT NULL AND dp.component = ${component}
        AND (dd.state = 'succeeded' OR (dd.state = 'in_flight' AND dp.state IN ('running', 'paused', 'completed')))
      ORDER BY dd.told_at DESC
      LIMIT 1
    ) dep ON true
    WHERE d.approval = 'approved'`;
}

export interface ResolvedRow {
  device_id: string;
  org_id: string;
  connection_status: ConnectionStatus;
  running_id: string | null;
  running_version: string | null;
  target_id: string | null;
  target_set_at: Date | null;
  via: string | null;
}

/** The resolved target of each device in `set` (see `resolvedSql` for the rule). */
export async function resolveTargets(db: Db, set: DeviceSet, component = 'firmware'): Promise<ResolvedRow[]> {
  const { rows } = await sql<ResolvedRow>`${resolvedSql(set, component)}`.execute(db);
  return rows;
}

/**
 * Brings the update attempts of `set` in line with their resolved targets, in bulk:
 * open attempts for anything but the resolved target are cancelled (superseded); devices not
 * running their target get a new attempt — `sent` when online, `queued` when offline — unless
 * one is already open, or one failed or rolled back since the target was set (setting the
 * target again is how an operator retries).
 */
export async function reconcileAttempts(trx: Db, set: DeviceSet, component = 'firmware'): Promise<ReconcileResult> {
  const resolved = resolvedSql(set, component);
  const cancelled = await sql`
    UPDATE update_attempts ua
    SET state = 'cancelled', ${stepSql('cancelled')}
    FROM (${resolved}) r
    WHERE ua.device_id = r.device_id AND ua.component = ${component} AND ua.state IN (${fromSql('cancel')})
      AND ua.firmware_id IS DISTINCT FROM r.target_id
      -- An attempt to what the device already runs stays open to settle, unless a new target
      -- supersedes it: one open attempt per device and component.
      AND (ua.firmware_id IS DISTINCT FROM r.running_id OR r.target_id IS NOT NULL)`.execute(trx);
  const { rows: created } = await sql<CreatedAttempt>`
    INSERT INTO update_attempts (org_id, device_id, firmware_id, component, from_version, to_version, state, via, sent_at)
    SELECT r.org_id, r.device_id, r.target_id, ${component}, r.running_version, f.version,
           CASE WHEN r.connection_status = 'online' THEN 'sent' ELSE 'queued' END,
           r.via,
           CASE WHEN r.connection_status = 'online' THEN now() END
    FROM (${resolved}) r
    JOIN firmware f ON f.id = r.target_id
    WHERE r.running_id IS DISTINCT FROM r.target_id
      AND NOT EXISTS (
        SELECT 1 FROM update_attempts x
        WHERE x.device_id = r.device_id AND x.component = ${component} AND x.firmware_id = r.target_id
          AND (x.state IN (${OPEN}) OR (x.state IN ('failed', 'rolled_back') AND x.completed_at >= r.target_set_at)))
    RETURNING id, device_id, firmware_id, state`.execute(trx);
  return { created, cancelled: Number(cancelled.numAffectedRows ?? 0) };
}

/**
 * Online members of a group that would act wrongly on a group-wide `firmware_update` for
 * `firmwareId`: they resolve another target and do not run that firmware. When there are none,
 * one broadcast on the group topic serves the whole group.
 */
export async function countGroupMembersResolvingElsewhere(
  trx: Db,
  groupId: string,
  firmwareId: string,
  component = 'firmware',
): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM (${resolvedSql({ groupId }, component)}) r
    WHERE r.connection_status = 'online'
      AND r.target_id IS DISTINCT FROM ${firmwareId}
      AND r.running_id IS DISTINCT FROM ${firmwareId}`.execute(trx);
  return Number(rows[0]?.n ?? 0);
}
