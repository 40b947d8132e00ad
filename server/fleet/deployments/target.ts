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
import { resolvedSql } from '../reconcile.ts';
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
 * Creates the target deployment of a group target just set (after reconcile): one stage of the
 * rest, with no success requirement, no error condition, no pacing and no retry, running. Its
 * devices are the members that resolve to this group's target (`via group:<id>`) and do not run
 * the release: each has its open attempt (created now, or kept by reconcile), so they are in
 * flight at once. Devices that were in flight in `previous` on that same attempt keep their
 * `told_at` and `tries` (they move; `supersede` removes them there). No device left: completed.
 */
export async function startTargetDeployment(
  trx: Db,
  outbox: FleetEvent[],
  actor: Actor,
  o: {
    group: { id: string; org_id: string; product_id: string; name: string };
    firmware: Firmware;
    previous: DeploymentRow | undefined;
  },
): Promise<{ deployment: DeploymentRow; devices: number; alreadyRunning: number }> {
  const { group, firmware } = o;
  // The previous one ends first: a group and component has one running target deployment at a time.
  const ended = o.previous ? await endSuperseded(trx, o.previous) : undefined;
  const inserted = await trx
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
  const via = `group:${group.id}`;
  const { rows } = await sql<{ devices: number; already_running: number }>`
    WITH r AS MATERIALIZED (${resolvedSql({ groupId: group.id }, firmware.component)}),
    told AS (
      SELECT r.device_id, d.identifier, ua.id AS attempt_id
      FROM r
      JOIN devices d ON d.id = r.device_id
      JOIN update_attempts ua ON ua.device_id = r.device_id AND ua.component = ${firmware.component}
        AND ua.firmware_id = r.target_id AND ua.state IN (${OPEN})
      WHERE r.via = ${via} AND NOT r.runs_target),
    inserted AS (
      INSERT INTO deployment_devices (deployment_id, device_id, stage, position, state, tries, told_at, attempt_id)
      SELECT ${inserted.id}, t.device_id, 0, row_number() OVER (ORDER BY t.identifier, t.device_id),
             'in_flight', COALESCE(p.tries, 1), COALESCE(p.told_at, now()), t.attempt_id
      FROM told t
      LEFT JOIN deployment_devices p ON p.deployment_id = ${o.previous?.id ?? null}::uuid
        AND p.device_id = t.device_id AND p.state = 'in_flight' AND p.attempt_id = t.attempt_id
      RETURNING 1)
    SELECT (SELECT count(*) FROM inserted)::int AS devices,
           (SELECT count(*) FROM r WHERE r.via = ${via} AND r.runs_target)::int AS already_running`.execute(trx);
  const { devices, already_running: alreadyRunning } = rows[0]!;
  // One stage of every device, which needs no success: it has succeeded from the start.
  await trx
    .insertInto('deployment_stages')
    .values({
      deployment_id: inserted.id,
      stage: 0,
      spec: JSON.stringify({ rest: true }),
      size: devices,
      success_count: 0,
      success_percent: null,
      started_at: sql<Date>`now()`,
      succeeded_at: sql<Date>`now()`,
    } as never)
    .execute();
  await transitioned(trx, outbox, actor, inserted, 'deployment.created', {
    kind: 'target',
    firmware_id: firmware.id,
    version: firmware.version,
    devices,
    already_running: alreadyRunning,
    stages: [devices],
  });
  if (ended) await settleSuperseded(trx, outbox, actor, ended, inserted.id);
  let deployment = inserted;
  if (devices === 0) {
    deployment = await setState(trx, inserted.id, { state: 'completed', ended_at: sql<Date>`now()` });
    await transitioned(trx, outbox, actor, deployment, 'deployment.completed', { succeeded: 0, failed: 0 });
  }
  return { deployment, devices, alreadyRunning };
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
