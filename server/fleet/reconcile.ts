import { sql, type RawBuilder } from 'kysely';
import type { Db } from '../db/index.ts';
import type { ConnectionStatus, DeviceProtocol } from '../db/schema.ts';
import { ANY_FORMAT, baseFirmwareProtocolsSql, installsSql } from './formats.ts';
import { fromSql, OPEN, stepSql } from './link-table.ts';

export { OPEN, OPEN_STATES } from './link-table.ts';

/** Which devices a reconcile covers: explicit ids, every member of a group, or an org's devices. */
export type DeviceSet = { ids: string[] } | { groupId: string } | { orgId: string };

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
  if ('groupId' in set) return sql`SELECT device_id FROM group_devices WHERE group_id = ${set.groupId}`;
  if ('orgId' in set) return sql`SELECT id AS device_id FROM devices WHERE org_id = ${set.orgId}`;
  return sql`SELECT unnest(${set.ids}::uuid[]) AS device_id`;
}

/**
 * Whether the device `d` runs `component` (applicability): it reports the component, or the
 * component is `firmware` and its protocol runs it by nature (formats.ts).
 */
export function runsComponentSql(d: string, component: string): RawBuilder<boolean> {
  return sql<boolean>`(EXISTS (SELECT 1 FROM device_components c WHERE c.device_id = ${sql.ref(`${d}.id`)} AND c.component = ${component})
    OR (${component} = 'firmware' AND ${sql.ref(`${d}.protocol`)} IN (${baseFirmwareProtocolsSql()})))`;
}

/**
 * The variant of the release `release` (a firmware row) that device `d` installs: the record of
 * the same product, component and version, with its image stored, whose format the device's
 * protocol takes first (formats.ts). A relation of one column `id`, empty when there is none.
 */
export function variantSql(d: string, release: string): RawBuilder<unknown> {
  return sql`
    SELECT f.id FROM firmware f
    JOIN ${installsSql()} pf(protocol, format, rank)
      ON pf.protocol = ${sql.ref(`${d}.protocol`)} AND (pf.format = f.format OR pf.format = ${ANY_FORMAT})
    WHERE f.product_id = ${sql.ref(`${release}.product_id`)} AND f.component = ${sql.ref(`${release}.component`)}
      AND f.version = ${sql.ref(`${release}.version`)} AND f.has_blob
    ORDER BY pf.rank, f.format, f.id
    LIMIT 1`;
}

/**
 * Target resolution, per device and component (the README quotes this):
 * 1. a device-level target overrides every group target;
 * 2. otherwise the newest phased deployment that told the device (docs/deployments.md), unless a
 *    group target was set after it told the device (a plain target's deployment is no source);
 * 3. otherwise, among the device's groups that have a target, the group with the lowest
 *    `priority` wins; on a tie, the most recently set target wins.
 * Only approved devices resolve a target. A target names a release (`release_id`, one of its
 * records); the device's `target_id` is the variant of it that its protocol installs — null
 * when the target does not concern the device (it does not run the component, or the release
 * has no variant its protocol installs: not applicable). `runs_target`: it runs a variant of
 * the release.
 */
export function resolvedSql(set: DeviceSet, component: string): RawBuilder<unknown> {
  // The variant a device installs depends only on the release and the device's protocol: it is
  // looked up once per distinct (release, protocol) pair, not once per device.
  return sql`
    WITH base AS MATERIALIZED (${baseResolvedSql(set, component)}),
    variants AS MATERIALIZED (
      SELECT p.release_id, p.protocol, (${variantSql('p', 'tf')}) AS id
      FROM (SELECT DISTINCT release_id, protocol FROM base WHERE release_id IS NOT NULL) p
      JOIN firmware tf ON tf.id = p.release_id)
    SELECT b.device_id, b.org_id, b.connection_status, b.protocol, b.running_id, b.running_version, b.release_id,
           CASE WHEN b.runs_component THEN v.id END AS target_id,
           b.runs_target, b.target_set_at, b.via
    FROM base b
    LEFT JOIN variants v ON v.release_id = b.release_id AND v.protocol = b.protocol`;
}

/** `resolvedSql` before the variant: the winning release per device, and whether it runs the component. */
function baseResolvedSql(set: DeviceSet, component: string): RawBuilder<unknown> {
  return sql`
    SELECT d.id AS device_id, d.org_id, d.connection_status, d.protocol,
           CASE WHEN ${component} = 'firmware' THEN d.firmware_uuid ELSE dc.firmware_id END AS running_id,
           CASE WHEN ${component} = 'firmware' THEN d.firmware_version ELSE dc.version END AS running_version,
           tf.id AS release_id,
           tf.id IS NOT NULL AND ${runsComponentSql('d', component)} AS runs_component,
           COALESCE(rf.product_id = tf.product_id AND rf.component = tf.component AND rf.version = tf.version, false) AS runs_target,
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
    -- deployment, and for good once it succeeded there (a device that failed falls back). A plain
    -- target's deployment (kind 'target') is no source: its group target (the targets table) is.
    LEFT JOIN LATERAL (
      SELECT dp.id, dp.firmware_id, dd.told_at, (gt.set_at IS NULL OR dd.told_at >= gt.set_at) AS wins
      FROM deployment_devices dd
      JOIN deployments dp ON dp.id = dd.deployment_id
      WHERE dd.device_id = d.id AND dd.told_at IS NOT NULL AND dp.component = ${component} AND dp.kind = 'phased'
        AND (dd.state = 'succeeded' OR (dd.state = 'in_flight' AND dp.state IN ('running', 'paused', 'completed')))
      ORDER BY dd.told_at DESC
      LIMIT 1
    ) dep ON true
    LEFT JOIN firmware tf ON tf.id = COALESCE(dt.firmware_id, CASE WHEN dep.wins THEN dep.firmware_id END, gt.firmware_id)
    LEFT JOIN firmware rf ON rf.id = CASE WHEN ${component} = 'firmware' THEN d.firmware_uuid ELSE dc.firmware_id END
    WHERE d.approval = 'approved'`;
}

export interface ResolvedRow {
  device_id: string;
  org_id: string;
  connection_status: ConnectionStatus;
  protocol: DeviceProtocol;
  running_id: string | null;
  running_version: string | null;
  /** The firmware record the winning target names (its release); null: no target. */
  release_id: string | null;
  /** The variant of that release this device installs; null: none (no target, or not applicable). */
  target_id: string | null;
  /** It runs a variant of the target's release. */
  runs_target: boolean;
  target_set_at: Date | null;
  via: string | null;
}

/** The resolved target of each device in `set` (see `resolvedSql` for the rule). */
export async function resolveTargets(db: Db, set: DeviceSet, component = 'firmware'): Promise<ResolvedRow[]> {
  const { rows } = await sql<ResolvedRow>`${resolvedSql(set, component)}`.execute(db);
  return rows;
}

/**
 * How a group-wide change for one release would reach the online members: `needed` when some
 * online member does not run the release yet; `variant`, the one variant a group-wide
 * `firmware_update` may carry — null when one broadcast cannot serve the group (some online
 * member that does not run the release resolves another target, is not concerned by it, or the
 * members that need it install different variants: each gets its own push).
 */
export interface GroupBroadcast {
  needed: boolean;
  variant: string | null;
}

/**
 * Brings the update attempts of `set` in line with their resolved targets, in bulk and in one
 * statement (the set is resolved once):
 * open attempts for anything but the resolved target are cancelled (superseded); devices not
 * running their target get a new attempt — `sent` when online, `queued` when offline — unless
 * one is already open, or one failed or rolled back since the target was set (setting the
 * target again is how an operator retries).
 * With `broadcastRelease`, the same pass also answers how the release reaches the online members
 * (`GroupBroadcast`).
 */
export async function reconcileAttempts(
  trx: Db,
  set: DeviceSet,
  component = 'firmware',
  options: { broadcastRelease?: string; track?: TrackOptions } = {},
): Promise<ReconcileResult & { broadcast?: GroupBroadcast; tracked?: { devices: number; already_running: number } }> {
  // The INSERT's NOT EXISTS sees the attempts as they were before the UPDATE (one snapshot):
  // no difference, since it looks for attempts to the target and the UPDATE cancels only others.
  const release = options.broadcastRelease;
  const { rows } = await sql<{
    cancelled: number;
    created: CreatedAttempt[];
    needed: boolean | null;
    variants: number | null;
    elsewhere: number | null;
    variant: string | null;
    tracked: number | null;
    already_running: number | null;
  }>`
    WITH r AS MATERIALIZED (${resolvedSql(set, component)}),
    cancelled AS (
      UPDATE update_attempts ua
      SET state = 'cancelled', ${stepSql('cancelled')}
      FROM r
      WHERE ua.device_id = r.device_id AND ua.component = ${component} AND ua.state IN (${fromSql('cancel')})
        AND ua.firmware_id IS DISTINCT FROM r.target_id
        -- An attempt to what the device already runs stays open to settle, unless a new target
        -- supersedes it: one open attempt per device and component.
        AND (ua.firmware_id IS DISTINCT FROM r.running_id OR r.release_id IS NOT NULL)
      RETURNING 1),
    created AS (
      INSERT INTO update_attempts (org_id, device_id, firmware_id, component, from_version, to_version, state, via, sent_at)
      SELECT r.org_id, r.device_id, r.target_id, ${component}, r.running_version, f.version,
             CASE WHEN r.connection_status = 'online' THEN 'sent' ELSE 'queued' END,
             r.via,
             CASE WHEN r.connection_status = 'online' THEN now() END
      FROM r
      JOIN firmware f ON f.id = r.target_id
      WHERE NOT r.runs_target
        AND NOT EXISTS (
          SELECT 1 FROM update_attempts x
          WHERE x.device_id = r.device_id AND x.component = ${component} AND x.firmware_id = r.target_id
            AND (x.state IN (${OPEN}) OR (x.state IN ('failed', 'rolled_back') AND x.completed_at >= r.target_set_at)))
      RETURNING id, device_id, firmware_id, state, via)
    ${options.track ? trackSql(options.track) : sql``}
    SELECT (SELECT count(*) FROM cancelled)::int AS cancelled,
           COALESCE((SELECT json_agg(json_build_object('id', c.id, 'device_id', c.device_id,
                       'firmware_id', c.firmware_id, 'state', c.state)) FROM created c), '[]'::json) AS created,
           b.needed, b.variants, b.elsewhere, b.variant,
           ${options.track ? sql`(SELECT count(*) FROM tracked)::int` : sql`NULL::int`} AS tracked,
           ${options.track ? sql`(SELECT count(*) FROM r WHERE r.via = ${options.track.via} AND r.runs_target)::int` : sql`NULL::int`} AS already_running
    FROM (${release ? broadcastSql(release) : sql`SELECT NULL::boolean AS needed, NULL::int AS variants, NULL::int AS elsewhere, NULL::text AS variant`}) b`.execute(
    trx,
  );
  const row = rows[0]!;
  const result = {
    created: row.created,
    cancelled: row.cancelled,
    ...(options.track ? { tracked: { devices: row.tracked ?? 0, already_running: row.already_running ?? 0 } } : {}),
  };
  if (!release) return result;
  const variant = row.elsewhere === 0 && row.variants === 1 ? row.variant : null;
  return { ...result, broadcast: { needed: row.needed === true, variant } };
}

/**
 * A group target's deployment (docs/deployments.md): in the same pass, the members that get an
 * attempt through `via` become its rows, in flight on that attempt.
 */
export interface TrackOptions {
  deploymentId: string;
  /** `group:<id>`: the source the members resolve through (the attempt's `via`). */
  via: string;
}

/**
 * The `tracked` CTE: one row per attempt created through `via`, positioned by identifier. The
 * devices are looked up laterally by primary key from the CTE's rows (joined plainly, the
 * planner's one-row estimate of a CTE can make a nested loop over a whole table).
 */
function trackSql(t: TrackOptions): RawBuilder<unknown> {
  return sql`, tracked AS (
      INSERT INTO deployment_devices (deployment_id, device_id, stage, position, state, tries, told_at, attempt_id)
      SELECT ${t.deploymentId}, c.device_id, 0, row_number() OVER (ORDER BY d.identifier, d.id), 'in_flight', 1, now(), c.id
      FROM created c
      CROSS JOIN LATERAL (SELECT dv.id, dv.identifier FROM devices dv WHERE dv.id = c.device_id) d
      WHERE c.via = ${t.via}
      RETURNING 1)`;
}

/** Over the resolved members `r`: online members not running the release `releaseId`, as `GroupBroadcast` needs. */
function broadcastSql(releaseId: string): RawBuilder<unknown> {
  return sql`
    SELECT count(*) > 0 AS needed,
           count(DISTINCT r.target_id)::int AS variants,
           count(*) FILTER (WHERE r.release_id IS DISTINCT FROM ${releaseId} OR r.target_id IS NULL)::int AS elsewhere,
           min(r.target_id::text) AS variant
    FROM r
    WHERE r.connection_status = 'online'
      AND (r.running_id IS NULL OR r.running_id NOT IN (
        SELECT v.id FROM firmware v JOIN firmware t ON t.id = ${releaseId}
        WHERE v.product_id = t.product_id AND v.component = t.component AND v.version = t.version))`;
}
