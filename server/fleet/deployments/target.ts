/**
 * A plain group `target set` as a one-stage deployment (docs/deployments.md, "Plain `target set`
 * as a one-stage deployment"): targets.ts tells the members as it always did, and records who
 * was told in a `kind = 'target'` deployment the orchestrator tracks (sync, complete), so its
 * counts are per device of that target set. A newer target set of the group, or a clear,
 * supersedes it. Everything runs in the caller's transaction, set-based.
 */
import { sql } from 'kysely';
import type { Actor } from '../../audit.ts';
import type { Db } from '../../db/index.ts';
import type { Firmware } from '../../db/schema.ts';
import type { FleetEvent } from '../context.ts';
import { OPEN } from '../link-table.ts';
import type { TrackOptions } from '../reconcile.ts';
import { type DeploymentRow, setState, transitioned } from './model.ts';
import { syncOutcomes } from './orchestrator.ts';

/**
 * The active (running) target deployment of a group and component, locked, with the outcomes of
 * its finished attempts recorded first: call it before reconcile moves the attempts, so a device
 * that already succeeded counts as succeeded, not as superseded.
 */
export async function activeTargetDeployment(
  trx: Db,
  groupId: string,
  component: string,
): Promise<DeploymentRow | undefined> {
  const { rows } = await sql<DeploymentRow>`
    SELECT * FROM deployments
    WHERE kind = 'target' AND group_ids[1] = ${groupId}::uuid AND component = ${component}
      AND state IN ('running', 'paused')
    FOR UPDATE`.execute(trx);
  const d = rows[0];
  if (d) await syncOutcomes(trx, d);
  return d;
}

/**
 * Opens the target deployment of a group target being set, before reconcile (which fills its rows
 * in the same statement: `track`, reconcile.ts): one stage of the rest, with no success
 * requirement, no error condition, no pacing and no retry, running. The group's previous one
 * ends first (one running target deployment per group and component).
 */
export async function openTargetDeployment(
  trx: Db,
  actor: Actor,
  o: {
    group: { id: string; org_id: string; product_id: string; name: string };
    firmware: Firmware;
    previous: DeploymentRow | undefined;
  },
): Promise<{ deployment: DeploymentRow; ended: DeploymentRow | undefined; track: TrackOptions }> {
  const { group, firmware } = o;
  const ended = o.previous ? await endSuperseded(trx, o.previous) : undefined;
  const deployment = await trx
    .insertInto('deployments')
    .values({
      org_id: group.org_id,
      product_id: group.product_id,
      firmware_id: firmware.id,
      component: firmware.component,
      kind: 'target',
      name: `target ${group.name}`,
      group_ids: [group.id],
      state: 'running',
      retries: 0,
      created_by: `${actor.type}:${actor.id ?? ''}`,
      started_at: sql<Date>`now()`,
    } as never)
    .returningAll()
    .executeTakeFirstOrThrow();
  return {
    deployment,
    ended,
    track: { deploymentId: deployment.id, via: `group:${group.id}` },
  };
}

/**
 * After reconcile filled its rows with the attempts it created (`created` of them;
 * `alreadyRunning` members run the release): the superseded one's devices still in flight on an
 * open attempt to the same release that reconcile kept move over (same attempt, `told_at` and
 * `tries`; positions are then renumbered by identifier), its other ones are cancelled; then its
 * stage (which needs no success: it has succeeded from the start), the audit record, and, with
 * no device to wait for, `completed` at once.
 */
export async function closeTargetDeployment(
  trx: Db,
  outbox: FleetEvent[],
  actor: Actor,
  o: {
    deployment: DeploymentRow;
    ended: DeploymentRow | undefined;
    group: { id: string };
    firmware: Firmware;
    created: number;
    alreadyRunning: number;
  },
): Promise<DeploymentRow> {
  const { deployment, firmware } = o;
  const moved = o.ended ? await carryOver(trx, deployment, o.ended, o.group.id, firmware) : 0;
  const devices = o.created + moved;
  await trx
    .insertInto('deployment_stages')
    .values({
      deployment_id: deployment.id,
      stage: 0,
      spec: JSON.stringify({ rest: true }),
      size: devices,
      success_count: 0,
      success_percent: null,
      started_at: sql<Date>`now()`,
      succeeded_at: sql<Date>`now()`,
    } as never)
    .execute();
  await transitioned(trx, outbox, actor, deployment, 'deployment.created', {
    kind: 'target',
    firmware_id: firmware.id,
    version: firmware.version,
    devices,
    already_running: o.alreadyRunning,
    stages: [devices],
  });
  if (o.ended) await settleSuperseded(trx, outbox, actor, o.ended, deployment.id);
  if (devices > 0) return deployment;
  const done = await setState(trx, deployment.id, { state: 'completed', ended_at: sql<Date>`now()` });
  await transitioned(trx, outbox, actor, done, 'deployment.completed', { succeeded: 0, failed: 0 });
  return done;
}

/**
 * Rows of `previous` in flight on an attempt still open to the same release, of members of the
 * group, are copied into `next` (the attempt reconcile kept; by primary key), then `next`'s
 * positions are renumbered by identifier. Returns how many moved.
 */
async function carryOver(
  trx: Db,
  next: DeploymentRow,
  previous: DeploymentRow,
  groupId: string,
  firmware: Firmware,
): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    WITH moved AS (
      INSERT INTO deployment_devices (deployment_id, device_id, stage, position, state, tries, told_at, attempt_id)
      SELECT ${next.id}, p.device_id, 0, 0, 'in_flight', p.tries, p.told_at, p.attempt_id
      FROM deployment_devices p
      JOIN update_attempts x ON x.id = p.attempt_id
      JOIN firmware xf ON xf.id = x.firmware_id
      WHERE p.deployment_id = ${previous.id} AND p.state = 'in_flight' AND x.state IN (${OPEN})
        AND xf.product_id = ${firmware.product_id} AND xf.component = ${firmware.component}
        AND xf.version = ${firmware.version}
        AND EXISTS (SELECT 1 FROM group_devices gd WHERE gd.group_id = ${groupId} AND gd.device_id = p.device_id)
      ON CONFLICT DO NOTHING
      RETURNING 1)
    SELECT count(*)::int AS n FROM moved`.execute(trx);
  const n = rows[0]?.n ?? 0;
  if (n > 0)
    await sql`
      UPDATE deployment_devices dd SET position = o.position
      FROM (SELECT x.device_id, row_number() OVER (ORDER BY d.identifier, d.id) AS position
            FROM deployment_devices x JOIN devices d ON d.id = x.device_id
            WHERE x.deployment_id = ${next.id}) o
      WHERE dd.deployment_id = ${next.id} AND dd.device_id = o.device_id`.execute(trx);
  return n;
}

/**
 * Ends `previous` as `superseded` because its group target was cleared: its devices in flight
 * are `cancelled` (`superseded`). Audited `deployment.superseded`, published as `deployment_transition`.
 */
export async function supersedeTargetDeployment(
  trx: Db,
  outbox: FleetEvent[],
  actor: Actor,
  previous: DeploymentRow,
): Promise<void> {
  await settleSuperseded(trx, outbox, actor, await endSuperseded(trx, previous), null);
}

function endSuperseded(trx: Db, previous: DeploymentRow): Promise<DeploymentRow> {
  return setState(trx, previous.id, {
    state: 'superseded',
    ended_at: sql<Date>`now()`,
    lease_holder: null,
    lease_until: null,
  });
}

/**
 * The devices of a superseded target deployment: those that moved to `by` (the newer one, on the
 * same attempt) leave it; its other devices in flight are `cancelled` (`superseded`). Audited.
 */
async function settleSuperseded(
  trx: Db,
  outbox: FleetEvent[],
  actor: Actor,
  ended: DeploymentRow,
  by: string | null,
): Promise<void> {
  const { rows } = await sql<{ moved: number; cancelled: number }>`
    WITH moved AS (
      DELETE FROM deployment_devices p
      USING deployment_devices n
      WHERE p.deployment_id = ${ended.id} AND p.state = 'in_flight'
        AND n.deployment_id = ${by}::uuid AND n.device_id = p.device_id AND n.attempt_id = p.attempt_id
      RETURNING p.device_id),
    cancelled AS (
      UPDATE deployment_devices
      SET state = 'cancelled',
          failure_reason = ${by ? `superseded: a newer target of the group (deployment ${by})` : 'superseded: the group target was cleared'}
      WHERE deployment_id = ${ended.id} AND state = 'in_flight'
        AND device_id NOT IN (SELECT device_id FROM moved)
      RETURNING 1)
    SELECT (SELECT count(*) FROM moved)::int AS moved, (SELECT count(*) FROM cancelled)::int AS cancelled`.execute(trx);
  const { moved, cancelled } = rows[0]!;
  await transitioned(trx, outbox, actor, ended, 'deployment.superseded', { by, moved, cancelled });
}
