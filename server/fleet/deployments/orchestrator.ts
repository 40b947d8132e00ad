/**
 * The deployment orchestrator (docs/deployments.md): one per node, acting only on the running
 * deployments whose lease it holds. A step is one transaction of set-based statements — sync the
 * devices whose attempt reached a final state, evaluate the stages, advance, tell the next devices
 * through reconcile — so its cost does not grow with a statement per device. It never moves an
 * update attempt itself: attempts move through the device link (and reconcile's cancel); the step
 * reads their committed states.
 */
import { sql } from 'kysely';
import { SYSTEM } from '../../audit.ts';
import type { Db } from '../../db/index.ts';
import { inTransaction, type FleetContext, type FleetEvent } from '../context.ts';
import { FINAL_STATES, OPEN } from '../link-table.ts';
import { reconcileAttempts } from '../reconcile.ts';
import { pushCreatedAttempts } from '../updates.ts';
import {
  abortInTransaction,
  type DeploymentRow,
  setState,
  type StageCounts,
  stageCounts,
  type StageRow,
  transitioned,
} from './model.ts';

/** How long a lease lasts without renewal: a dead node's deployments are taken over after this. */
export const LEASE_MS = 15_000;
/** At most this many devices are told in one step (a bigger stage takes several steps, one per tick). */
export const MAX_TELL_PER_STEP = 5_000;

export interface StepOutcome {
  /** Devices told in this step. */
  told: string[];
  /** Devices whose outcome this step recorded. */
  finished: number;
  state: DeploymentRow['state'];
}

/**
 * Claims (or renews) the leases of running or paused deployments (a paused one still records
 * its devices' outcomes) that are free, expired or this node's, in one statement. Returns their ids.
 */
export async function claimDeployments(ctx: FleetContext, leaseMs = LEASE_MS): Promise<string[]> {
  const { rows } = await sql<{ id: string }>`
    UPDATE deployments
    SET lease_holder = ${ctx.nodeName}, lease_until = now() + make_interval(secs => ${leaseMs / 1000})
    WHERE state IN ('running', 'paused')
      AND (lease_holder IS NULL OR lease_holder = ${ctx.nodeName} OR lease_until < now())
    RETURNING id`.execute(ctx.db);
  return rows.map((r) => r.id);
}

/** One orchestrator step of a deployment this node holds the lease of; undefined when it does not. */
export async function stepDeployment(ctx: FleetContext, deploymentId: string): Promise<StepOutcome | undefined> {
  return inTransaction(ctx, async (trx, outbox) => {
    const d = await trx
      .selectFrom('deployments')
      .selectAll()
      .where('id', '=', deploymentId)
      .forUpdate()
      .executeTakeFirst();
    if (d?.state !== 'running' && d?.state !== 'paused') return undefined;
    const { rows: held } = await sql<{ held: boolean }>`
      SELECT (${d.lease_holder} = ${ctx.nodeName} AND ${d.lease_until} > now()) AS held`.execute(trx);
    if (!held[0]?.held) return undefined;
    const finished = await syncOutcomes(trx, d.id);
    // Paused: devices in flight still finish and are counted; nothing is decided or told.
    if (d.state === 'paused') return { told: [], finished, state: d.state };
    const stages = await trx
      .selectFrom('deployment_stages')
      .selectAll()
      .where('deployment_id', '=', d.id)
      .orderBy('stage')
      .execute();
    const counts = await stageCounts(trx, d.id);
    const current = await evaluate(trx, outbox, d, stages, counts);
    const told = current.state === 'running' ? await tell(ctx, trx, outbox, current) : [];
    if (finished > 0 || told.length > 0)
      ctx.log.debug({ deployment_id: d.id, finished, told: told.length, state: current.state }, 'deployment step');
    return { told, finished, state: current.state };
  });
}

/** Devices in flight whose attempt reached a final state: succeeded only on the link's `confirm`. */
async function syncOutcomes(trx: Db, deploymentId: string): Promise<number> {
  const finals = sql.join(FINAL_STATES.map((s) => sql.lit(s)));
  const result = await sql`
    UPDATE deployment_devices dd
    SET state = CASE WHEN ua.state = 'succeeded' THEN 'succeeded' ELSE 'failed' END,
        succeeded_at = CASE WHEN ua.state = 'succeeded' THEN ua.completed_at END,
        failed_at = CASE WHEN ua.state <> 'succeeded' THEN ua.completed_at END,
        failure_reason = CASE WHEN ua.state <> 'succeeded'
          THEN ua.state || COALESCE(': ' || (ua.errors ->> 0), '') END
    FROM update_attempts ua
    WHERE dd.deployment_id = ${deploymentId} AND dd.state = 'in_flight'
      AND ua.id = dd.attempt_id AND ua.state IN (${finals})`.execute(trx);
  return Number(result.numAffectedRows ?? 0);
}

function required(stage: StageRow): number {
  if (stage.success_count !== null) return Math.min(stage.success_count, stage.size);
  return Math.ceil((stage.size * (stage.success_percent ?? 100)) / 100);
}

/** Whether a stage's error condition holds: enough finished, and too many of them failed. */
function errorTripped(stage: StageRow, c: StageCounts): string | undefined {
  if (stage.error_overridden) return undefined;
  if (stage.error_count === null && stage.error_percent === null) return undefined;
  const finished = c.succeeded + c.failed;
  if (finished < stage.min_finished || c.failed === 0) return undefined;
  if (stage.error_count !== null && c.failed >= stage.error_count)
    return `stage ${stage.stage + 1} error condition: ${c.failed} failed (≥ ${stage.error_count})`;
  if (stage.error_percent !== null && c.failed * 100 >= stage.error_percent * finished)
    return `stage ${stage.stage + 1} error condition: ${c.failed} of ${finished} finished failed (${Math.round(
      (c.failed * 100) / finished,
    )}% ≥ ${stage.error_percent}%)`;
  return undefined;
}

/**
 * Evaluates the started stages in order: an error condition pauses or aborts; a stage reaching
 * its success condition is marked succeeded; the current stage's success (and soak) starts the
 * next stage, or asks for approval; the last stage's, with nothing left, completes the deployment.
 */
async function evaluate(
  trx: Db,
  outbox: FleetEvent[],
  d: DeploymentRow,
  stages: StageRow[],
  counts: Map<number, StageCounts>,
): Promise<DeploymentRow> {
  const none: StageCounts = { total: 0, pending: 0, told: 0, in_flight: 0, succeeded: 0, failed: 0, cancelled: 0 };
  let current = d;
  for (const stage of stages) {
    if (stage.stage > current.current_stage || stage.started_at === null) break;
    const c = counts.get(stage.stage) ?? none;
    const tripped = errorTripped(stage, c);
    if (tripped) {
      if (stage.on_error === 'abort') {
        await abortInTransaction(trx, outbox, SYSTEM, current, tripped);
        return { ...current, state: 'aborted' };
      }
      const paused = await setState(trx, d.id, { state: 'paused', paused_reason: tripped, pause_cause: 'error' });
      await transitioned(trx, outbox, SYSTEM, paused, 'deployment.paused', {
        reason: tripped,
        stage: stage.stage,
        succeeded: c.succeeded,
        failed: c.failed,
      });
      return paused;
    }
    if (stage.succeeded_at !== null) continue;
    const allFinished = c.pending === 0 && c.in_flight === 0;
    const succeeded = stage.error_overridden ? allFinished : c.succeeded >= required(stage);
    if (succeeded) {
      const { rows } = await sql<StageRow>`
        UPDATE deployment_stages SET succeeded_at = now()
        WHERE deployment_id = ${d.id} AND stage = ${stage.stage} RETURNING *`.execute(trx);
      stage.succeeded_at = rows[0]!.succeeded_at;
      await transitioned(trx, outbox, SYSTEM, current, 'deployment.stage_succeeded', {
        stage: stage.stage,
        succeeded: c.succeeded,
        failed: c.failed,
      });
    } else if (allFinished) {
      const reason = `stage ${stage.stage + 1} finished short of its success condition: ${c.succeeded} of ${stage.size} succeeded, ${required(stage)} required`;
      const paused = await setState(trx, d.id, { state: 'paused', paused_reason: reason, pause_cause: 'success' });
      await transitioned(trx, outbox, SYSTEM, paused, 'deployment.paused', { reason, stage: stage.stage });
      return paused;
    }
  }
  // Advance past succeeded stages (a stage of 0 devices succeeds at once).
  for (;;) {
    const stage = stages[current.current_stage]!;
    if (stage.succeeded_at === null) break;
    const next = stages[current.current_stage + 1];
    if (!next) {
      const left = [...counts.values()].reduce((n, c) => n + c.pending + c.in_flight, 0);
      if (left === 0) {
        const done = await setState(trx, d.id, {
          state: 'completed',
          ended_at: sql<Date>`now()`,
          lease_holder: null,
          lease_until: null,
        });
        const total = [...counts.values()].reduce(
          (t, c) => ({ succeeded: t.succeeded + c.succeeded, failed: t.failed + c.failed }),
          { succeeded: 0, failed: 0 },
        );
        await transitioned(trx, outbox, SYSTEM, done, 'deployment.completed', total);
        return done;
      }
      break;
    }
    if (stage.soak_s > 0) {
      const { rows } = await sql<{ soaked: boolean }>`
        SELECT ${stage.succeeded_at}::timestamptz + make_interval(secs => ${stage.soak_s}) <= now() AS soaked`.execute(
        trx,
      );
      if (!rows[0]?.soaked) break;
    }
    if (next.requires_approval && next.approved_at === null) {
      if (current.state !== 'awaiting_approval') {
        current = await setState(trx, d.id, { state: 'awaiting_approval' });
        await transitioned(trx, outbox, SYSTEM, current, 'deployment.awaiting_approval', { stage: next.stage });
      }
      return current;
    }
    const { rows } = await sql<StageRow>`
      UPDATE deployment_stages SET started_at = now()
      WHERE deployment_id = ${d.id} AND stage = ${next.stage} RETURNING *`.execute(trx);
    next.started_at = rows[0]!.started_at;
    current = await setState(trx, d.id, { current_stage: next.stage });
    await transitioned(trx, outbox, SYSTEM, current, 'deployment.stage_started', { stage: next.stage });
    const c = counts.get(next.stage) ?? none;
    if (next.size === 0 || c.total === 0) {
      const { rows: done } = await sql<StageRow>`
        UPDATE deployment_stages SET succeeded_at = now()
        WHERE deployment_id = ${d.id} AND stage = ${next.stage} RETURNING *`.execute(trx);
      next.succeeded_at = done[0]!.succeeded_at;
    }
  }
  // The current stage may not have started yet (approved after waiting, or resumed from a draft).
  const stage = stages[current.current_stage]!;
  if (stage.started_at === null) {
    if (stage.requires_approval && stage.approved_at === null) {
      current = await setState(trx, d.id, { state: 'awaiting_approval' });
      await transitioned(trx, outbox, SYSTEM, current, 'deployment.awaiting_approval', { stage: stage.stage });
      return current;
    }
    await sql`UPDATE deployment_stages SET started_at = now() WHERE deployment_id = ${d.id} AND stage = ${stage.stage}`.execute(
      trx,
    );
    await transitioned(trx, outbox, SYSTEM, current, 'deployment.stage_started', { stage: stage.stage });
  }
  return current;
}

/**
 * Tells the next devices: pending devices of started stages that are online, as many as the
 * concurrency limit and the rate (devices told in the last 60 s) leave room for, in stage and
 * position order. They are marked in flight and get their attempt through reconcile, in this
 * transaction: a device is told at most once, whatever happens to the process afterwards.
 */
async function tell(ctx: FleetContext, trx: Db, outbox: FleetEvent[], d: DeploymentRow): Promise<string[]> {
  const { rows: load } = await sql<{ in_flight: number; recent: number }>`
    SELECT count(*) FILTER (WHERE state = 'in_flight')::int AS in_flight,
           count(*) FILTER (WHERE told_at > now() - interval '60 seconds')::int AS recent
    FROM deployment_devices WHERE deployment_id = ${d.id}`.execute(trx);
  const { in_flight, recent } = load[0] ?? { in_flight: 0, recent: 0 };
  let room = MAX_TELL_PER_STEP;
  if (d.max_concurrent !== null) room = Math.min(room, d.max_concurrent - in_flight);
  if (d.rate_per_minute !== null) room = Math.min(room, d.rate_per_minute - recent);
  if (room <= 0) return [];
  const { rows: picked } = await sql<{ device_id: string }>`
    UPDATE deployment_devices dd
    SET state = 'in_flight', told_at = now(), tries = dd.tries + 1
    FROM (
      SELECT x.device_id FROM deployment_devices x
      JOIN devices dev ON dev.id = x.device_id
      WHERE x.deployment_id = ${d.id} AND x.state = 'pending' AND x.stage <= ${d.current_stage}
        AND dev.connection_status = 'online' AND dev.approval = 'approved'
      ORDER BY x.stage, x.position
      LIMIT ${room}
    ) pick
    WHERE dd.deployment_id = ${d.id} AND dd.device_id = pick.device_id
    RETURNING dd.device_id`.execute(trx);
  const ids = picked.map((p) => p.device_id);
  if (ids.length === 0) return [];
  // They now resolve to the deployment's firmware (reconcile.ts): the existing path creates and sends.
  const { created } = await reconcileAttempts(trx, { ids }, d.component);
  await pushCreatedAttempts(ctx, trx, outbox, created);
  await sql`
    UPDATE deployment_devices dd SET attempt_id = ua.id
    FROM update_attempts ua
    WHERE dd.deployment_id = ${d.id} AND dd.device_id = ANY(${ids}::uuid[])
      AND ua.device_id = dd.device_id AND ua.component = ${d.component}
      AND ua.via = ${`deployment:${d.id}`} AND ua.state IN (${OPEN})`.execute(trx);
  // Told but given no attempt: already running it (succeeded), or something else decides its target.
  await sql`
    UPDATE deployment_devices dd
    SET state = CASE WHEN r.running THEN 'succeeded' ELSE 'failed' END,
        succeeded_at = CASE WHEN r.running THEN now() END,
        failed_at = CASE WHEN r.running THEN NULL ELSE now() END,
        failure_reason = CASE WHEN r.running THEN NULL
          ELSE 'superseded: another target (a device target or a newer group target) decides this device' END
    FROM (
      -- Running any variant of the deployment's release (reconcile.ts) counts.
      SELECT dev.id,
             COALESCE(rf.product_id = tf.product_id AND rf.component = tf.component AND rf.version = tf.version, false) AS running
      FROM devices dev
      JOIN firmware tf ON tf.id = ${d.firmware_id}::uuid
      LEFT JOIN device_components dc ON dc.device_id = dev.id AND dc.component = ${d.component}
      LEFT JOIN firmware rf ON rf.id = CASE WHEN ${d.component} = 'firmware' THEN dev.firmware_uuid ELSE dc.firmware_id END
      WHERE dev.id = ANY(${ids}::uuid[])
    ) r
    WHERE dd.deployment_id = ${d.id} AND dd.device_id = r.id AND dd.attempt_id IS NULL AND dd.state = 'in_flight'`.execute(
    trx,
  );
  return ids;
}

export interface OrchestratorOptions {
  /** Milliseconds between two ticks while this node steps a deployment (pacing, soak, devices that came online). Default 1000. */
  tickMs?: number;
  leaseMs?: number;
  /**
   * Milliseconds between two ticks while there is none to step (default: the lease, so a lease
   * another node left behind is taken over within two leases). Operators' actions and finished
   * attempts nudge it at once.
   */
  idleMs?: number;
}

/**
 * A node's orchestrator: ticks on a timer and on `nudge()` (an attempt of a deployment finished,
 * an operator acted), claims the leases it may hold and steps each of those deployments. With
 * none to step it ticks only every `idleMs`: an idle server sends no statement a second.
 */
export class DeploymentOrchestrator {
  readonly #ctx: FleetContext;
  readonly #tickMs: number;
  readonly #leaseMs: number;
  readonly #idleMs: number;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #again = false;
  #stopped = true;
  /** Steps run and devices told, for tests and metrics. */
  readonly stats = { ticks: 0, steps: 0, told: 0 };

  constructor(ctx: FleetContext, options: OrchestratorOptions = {}) {
    this.#ctx = ctx;
    this.#tickMs = options.tickMs ?? 1000;
    this.#leaseMs = options.leaseMs ?? LEASE_MS;
    this.#idleMs = options.idleMs ?? this.#leaseMs;
  }

  start(): void {
    this.#stopped = false;
    this.#schedule(0);
  }

  /** Something may have changed: tick soon (coalesced with a tick already running). */
  nudge(): void {
    if (this.#stopped) return;
    if (this.#running) this.#again = true;
    else this.#schedule(0);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#timer);
    await this.#running;
  }

  #schedule(ms: number): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#tick(), ms);
    this.#timer.unref();
  }

  #tick(): void {
    if (this.#stopped || this.#running) return;
    let busy = true;
    this.#running = this.#run()
      .then((claimed) => {
        busy = claimed > 0;
      })
      .catch((err: unknown) => this.#ctx.log.error({ err }, 'deployment orchestrator tick failed'))
      .finally(() => {
        this.#running = undefined;
        if (this.#stopped) return;
        const again = this.#again;
        this.#again = false;
        this.#schedule(again ? 0 : busy ? this.#tickMs : this.#idleMs);
      });
  }

  /** One tick; returns how many deployments this node holds (0: nothing to step). */
  async #run(): Promise<number> {
    this.stats.ticks++;
    const ids = await claimDeployments(this.#ctx, this.#leaseMs);
    for (const id of ids) {
      if (this.#stopped) break;
      const outcome = await stepDeployment(this.#ctx, id);
      this.stats.steps++;
      if (outcome) this.stats.told += outcome.told.length;
    }
    return ids.length;
  }
}
