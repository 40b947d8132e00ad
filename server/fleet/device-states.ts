/**
 * Where each device stands with its target, one state per device (the status view's per-device
 * counts; attempt counts say how many attempts, these say how many devices).
 */
import { sql } from 'kysely';
import type { FleetContext } from './context.ts';
import { FleetError, isUuid } from './errors.ts';
import { UPDATE_STATES } from './link-table.ts';
import { type Page, pageBounds } from './paging.ts';
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

/** Which devices: an org's, or one group's members. */
export interface DeviceStateScope {
  orgId: string;
  groupId?: string;
}

/** One device with its resolved target for a component and where it stands with it. */
export interface DeviceTargetRow {
  device_id: string;
  identifier: string;
  protocol: string;
  connection_status: string;
  running_version: string | null;
  /** The version of the release its target names; null: no target resolves (or not approved). */
  target_version: string | null;
  /** The variant of that release it installs; null: none (no target, or not applicable). */
  target_firmware_id: string | null;
  /** What set the target: `device`, `group:<id>`, `deployment:<id>`. */
  via: string | null;
  state: DeviceTargetState;
  /** Its newest attempt for that variant. */
  attempt_id: string | null;
  attempt_state: string | null;
  attempt_percent: number | null;
  attempt_updated_at: Date | null;
}

/** One row per device of the scope: its target and state (see `DEVICE_TARGET_STATES`). */
function deviceTargetStatesSql(scope: DeviceStateScope, component: string) {
  const set = scope.groupId ? { groupId: scope.groupId } : { orgId: scope.orgId };
  const members = scope.groupId
    ? sql`SELECT gd.device_id FROM group_devices gd JOIN devices x ON x.id = gd.device_id WHERE gd.group_id = ${scope.groupId} AND x.org_id = ${scope.orgId}`
    : sql`SELECT id AS device_id FROM devices WHERE org_id = ${scope.orgId}`;
  return sql`
    SELECT d.id AS device_id, d.identifier, d.protocol, d.connection_status,
           CASE WHEN ${component} = 'firmware' THEN d.firmware_version ELSE dc.version END AS running_version,
           tf.version AS target_version, r.target_id AS target_firmware_id, r.via,
           CASE
             WHEN r.device_id IS NULL THEN 'not_approved'
             WHEN r.release_id IS NULL THEN 'no_target'
             WHEN r.target_id IS NULL THEN 'not_applicable'
             WHEN r.runs_target THEN CASE WHEN last.state = 'succeeded' THEN 'succeeded' ELSE 'up_to_date' END
             ELSE COALESCE(last.state, 'no_attempt')
           END AS state,
           last.id AS attempt_id, last.state AS attempt_state, last.percent AS attempt_percent,
           last.updated_at AS attempt_updated_at
    FROM (${members}) m
    JOIN devices d ON d.id = m.device_id
    LEFT JOIN device_components dc ON dc.device_id = d.id AND dc.component = ${component}
    LEFT JOIN (${resolvedSql(set, component)}) r ON r.device_id = m.device_id
    LEFT JOIN firmware tf ON tf.id = r.release_id
    LEFT JOIN LATERAL (
      SELECT ua.id, ua.state, ua.percent, ua.updated_at FROM update_attempts ua
      WHERE ua.device_id = r.device_id AND ua.component = ${component} AND ua.firmware_id = r.target_id
      ORDER BY ua.created_at DESC, ua.id DESC
      LIMIT 1
    ) last ON true`;
}

/** Devices of an org (or one group's members) per state with their target for `component`; every state present. */
export async function countDeviceTargetStates(
  ctx: FleetContext,
  scope: DeviceStateScope,
  component = 'firmware',
): Promise<Record<DeviceTargetState, number>> {
  const counts = Object.fromEntries(DEVICE_TARGET_STATES.map((s) => [s, 0])) as Record<DeviceTargetState, number>;
  if (!isUuid(scope.orgId) || (scope.groupId !== undefined && !isUuid(scope.groupId))) return counts;
  const { rows } = await sql<{ state: DeviceTargetState; n: number }>`
    SELECT s.state, count(*)::int AS n FROM (${deviceTargetStatesSql(scope, component)}) s
    GROUP BY s.state`.execute(ctx.db);
  for (const r of rows) counts[r.state] = Number(r.n);
  return counts;
}

/**
 * One page of the devices of an org (or one group's members), by identifier, each with its
 * resolved target for `component`, running version, state and newest attempt; `state` filters.
 */
export async function listDeviceTargetStates(
  ctx: FleetContext,
  scope: DeviceStateScope,
  options: { component?: string; state?: DeviceTargetState; limit?: unknown; offset?: unknown } = {},
): Promise<Page<DeviceTargetRow>> {
  const { limit, offset } = pageBounds(options.limit, options.offset);
  if (options.state !== undefined && !DEVICE_TARGET_STATES.includes(options.state))
    throw new FleetError('invalid', `state must be one of ${DEVICE_TARGET_STATES.join(', ')}`, { field: 'state' });
  if (!isUuid(scope.orgId) || (scope.groupId !== undefined && !isUuid(scope.groupId))) return { items: [], total: 0 };
  const { rows } = await sql<DeviceTargetRow & { total: number }>`
    SELECT s.*, count(*) OVER ()::int AS total FROM (${deviceTargetStatesSql(scope, options.component ?? 'firmware')}) s
    ${options.state === undefined ? sql`` : sql`WHERE s.state = ${options.state}`}
    ORDER BY s.identifier, s.device_id
    LIMIT ${limit} OFFSET ${offset}`.execute(ctx.db);
  // A page past the end still says how many there are.
  const total = rows[0]
    ? Number(rows[0].total)
    : offset === 0
      ? 0
      : (await listDeviceTargetStates(ctx, scope, { ...options, limit: 1, offset: 0 })).total;
  return {
    items: rows.map(({ total: _total, ...row }) => ({
      ...row,
      attempt_percent: row.attempt_percent === null ? null : Number(row.attempt_percent),
    })),
    total,
  };
}
