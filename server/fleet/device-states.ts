/**
 * Where each device stands with its target, one state per device (the status view's per-device
 * counts; attempt counts say how many attempts, these say how many devices).
 */
import { sql } from 'kysely';
import type { FleetContext } from './context.ts';
import { isUuid } from './errors.ts';
import { UPDATE_STATES } from './link-table.ts';
import { resolvedSql } from './reconcile.ts';

/**
 * A device's state with its resolved target for a component: its newest attempt's state for the
 * variant it installs (`succeeded` also when it runs the target after one), or
 * - `up_to_date`: it runs the target, and no attempt brought it there;
 * - `not_applicable`: the target does not concern it (it does not run the component, or the
 *   release has no variant its protocol installs), so it has no attempt;
 * - `no_target`: no target resolves for it;
 * - `not_approved`: pending or revoked (resolves nothing);
 * - `no_attempt`: it should update and has no attempt (an operator sets the target again).
 */
export const DEVICE_TARGET_STATES = [
  ...UPDATE_STATES,
  'up_to_date',
  'not_applicable',
  'no_target',
  'not_approved',
  'no_attempt',
] as const;
export type DeviceTargetState = (typeof DEVICE_TARGET_STATES)[number];

/** Devices of an org (or one group's members) per state with their target for `component`; every state present. */
export async function countDeviceTargetStates(
  ctx: FleetContext,
  scope: { orgId: string; groupId?: string },
  component = 'firmware',
): Promise<Record<DeviceTargetState, number>> {
  const counts = Object.fromEntries(DEVICE_TARGET_STATES.map((s) => [s, 0])) as Record<DeviceTargetState, number>;
  if (!isUuid(scope.orgId) || (scope.groupId !== undefined && !isUuid(scope.groupId))) return counts;
  const set = scope.groupId ? { groupId: scope.groupId } : { orgId: scope.orgId };
  const members = scope.groupId
    ? sql`SELECT gd.device_id FROM group_devices gd JOIN devices x ON x.id = gd.device_id WHERE gd.group_id = ${scope.groupId} AND x.org_id = ${scope.orgId}`
    : sql`SELECT id AS device_id FROM devices WHERE org_id = ${scope.orgId}`;
  const { rows } = await sql<{ state: DeviceTargetState; n: number }>`
    SELECT s.state, count(*)::int AS n FROM (
      SELECT CASE
               WHEN r.device_id IS NULL THEN 'not_approved'
               WHEN r.release_id IS NULL THEN 'no_target'
               WHEN r.target_id IS NULL THEN 'not_applicable'
               WHEN r.runs_target THEN CASE WHEN last.state = 'succeeded' THEN 'succeeded' ELSE 'up_to_date' END
               ELSE COALESCE(last.state, 'no_attempt')
             END AS state
      FROM (${members}) m
      LEFT JOIN (${resolvedSql(set, component)}) r ON r.device_id = m.device_id
      LEFT JOIN LATERAL (
        SELECT ua.state FROM update_attempts ua
        WHERE ua.device_id = r.device_id AND ua.component = ${component} AND ua.firmware_id = r.target_id
        ORDER BY ua.created_at DESC, ua.id DESC
        LIMIT 1
      ) last ON true
    ) s
    GROUP BY s.state`.execute(ctx.db);
  for (const r of rows) counts[r.state] = Number(r.n);
  return counts;
}
