/**
 * The status of an org or a group, per device and for the current target: how many devices, how
 * many online, what they run, what each device resolves to (device target, else its groups' by
 * priority: `resolvedSql`) and whether it runs that, and the state of each device's latest update
 * attempt towards the firmware it resolves to. Each device counts once: earlier attempts, to
 * targets since replaced, do not add up. Set-based: a handful of statements, whatever the size.
 */
import { sql } from 'kysely';
import type { UpdateState } from '../db/schema.ts';
import type { FleetContext } from './context.ts';
import { isUuid } from './errors.ts';
import { resolvedSql, type DeviceSet } from './reconcile.ts';
import { UPDATE_STATES } from './updates.ts';

/** Attempt states after which a device will not reach its target by itself. */
export const FAILED_UPDATE_STATES = ['failed', 'rolled_back', 'timed_out'] as const;

/** How many failing devices a status names (the count is in `updates`). */
export const STATUS_FAILURES_SHOWN = 20;

export interface ResolvedTargetCount {
  firmware_id: string;
  version: string;
  /** Devices that resolve to this firmware. */
  devices: number;
  /** Of them, those running it. */
  running: number;
}

export interface FailingDevice {
  device_id: string;
  identifier: string;
  version: string;
  state: UpdateState;
  errors: string[];
}

export interface FleetStatus {
  devices: number;
  online: number;
  offline: number;
  versions: Record<string, number>;
  /** Per device: the state of its latest attempt at the firmware it resolves to (devices without one are not counted). */
  updates: Record<UpdateState, number>;
  /** Per resolved firmware: how many devices resolve to it and how many run it. */
  targets: ResolvedTargetCount[];
  /** Devices whose latest attempt at their resolved firmware failed (the first STATUS_FAILURES_SHOWN by identifier). */
  failures: FailingDevice[];
}

/** The status of the org's devices, or of one group's members (`groupId`), for `component`'s targets. */
export async function fleetStatus(
  ctx: FleetContext,
  orgId: string,
  groupId?: string,
  component = 'firmware',
): Promise<FleetStatus> {
  const updates = Object.fromEntries(UPDATE_STATES.map((s) => [s, 0])) as Record<UpdateState, number>;
  const empty: FleetStatus = { devices: 0, online: 0, offline: 0, versions: {}, updates, targets: [], failures: [] };
  if (!isUuid(orgId) || (groupId !== undefined && !isUuid(groupId))) return empty;
  const set: DeviceSet = groupId ? { groupId } : { orgId };
  const scope = groupId
    ? sql`d.org_id = ${orgId} AND d.id IN (SELECT device_id FROM group_devices WHERE group_id = ${groupId})`
    : sql`d.org_id = ${orgId}`;
  const resolved = resolvedSql(set, component);
  const latest = sql`
    SELECT DISTINCT ON (ua.device_id) ua.device_id, ua.state, ua.errors, ua.to_version
    FROM update_attempts ua
    JOIN (${resolved}) r ON r.device_id = ua.device_id AND ua.firmware_id = r.target_id
    WHERE ua.component = ${component}
    ORDER BY ua.device_id, ua.created_at DESC, ua.id DESC`;
  const [versionRows, targetRows, stateRows, failureRows] = await Promise.all([
    sql<{ version: string | null; n: string; online: string }>`
      SELECT d.firmware_version AS version, count(*) AS n,
             count(*) FILTER (WHERE d.connection_status = 'online') AS online
      FROM devices d WHERE ${scope} GROUP BY d.firmware_version`.execute(ctx.db),
    sql<{ firmware_id: string; version: string; devices: string; running: string }>`
      SELECT r.release_id AS firmware_id, f.version, count(*) AS devices,
             count(*) FILTER (WHERE r.runs_target) AS running
      FROM (${resolved}) r JOIN firmware f ON f.id = r.release_id
      WHERE r.target_id IS NOT NULL
      GROUP BY r.release_id, f.version ORDER BY count(*) DESC, f.version`.execute(ctx.db),
    sql<{ state: UpdateState; n: string }>`
      SELECT l.state, count(*) AS n FROM (${latest}) l GROUP BY l.state`.execute(ctx.db),
    sql<{ device_id: string; identifier: string; version: string; state: UpdateState; errors: unknown }>`
      SELECT l.device_id, d.identifier, l.to_version AS version, l.state, l.errors
      FROM (${latest}) l JOIN devices d ON d.id = l.device_id
      WHERE l.state IN (${sql.join(FAILED_UPDATE_STATES.map((s) => sql.lit(s)))})
      ORDER BY d.identifier LIMIT ${STATUS_FAILURES_SHOWN}`.execute(ctx.db),
  ]);
  const status = empty;
  for (const r of versionRows.rows) {
    const v = r.version ?? 'unknown';
    status.versions[v] = (status.versions[v] ?? 0) + Number(r.n);
    status.devices += Number(r.n);
    status.online += Number(r.online);
  }
  status.offline = status.devices - status.online;
  for (const r of stateRows.rows) updates[r.state] = Number(r.n);
  status.targets = targetRows.rows.map((r) => ({
    firmware_id: r.firmware_id,
    version: r.version,
    devices: Number(r.devices),
    running: Number(r.running),
  }));
  status.failures = failureRows.rows.map((r) => ({
    device_id: r.device_id,
    identifier: r.identifier,
    version: r.version,
    state: r.state,
    errors: errorList(r.errors),
  }));
  return status;
}

/** The errors column as raw SQL returns it (jsonb: parsed by the driver, or its text). */
function errorList(value: unknown): string[] {
  const parsed = typeof value === 'string' ? (JSON.parse(value) as unknown) : value;
  return Array.isArray(parsed) ? parsed.map(String) : [];
}
