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
  emptyCounts,
  MAX_RETRY_BACKOFF_S,
  type RateSpec,
  setState,
  type PacingCounts,
  type StageCounts,
  type StageRow,
  stepCounts,
  transitioned,
} from './model.ts';

/** How long a lease lasts without renewal: a dead node's deployments are taken over after this. */
export const LEASE_MS = 15_000;
/** At most this many devices are told in one step (a bigger stage takes several steps, one per tick). */
export const MAX_TELL_PER_STEP = 5_000;

export interface StepOutcome {
  /** Devices told in this step (retries included). */
  told: string[];
  /** Of those, devices told again (a retry, after a backoff or a penalty hold). */
  retried: number;
  /** Devices whose outcome this step recorded (a failure to be retried included). */
  finished: number;
  /** Of those, devices that failed and wait to be retried (`retrying`). */
  retrying: number;
  /** Of those, devices put in the penalty box. */
  penalized: number;
  state: DeploymentRow['state'];
}

/**
 * The rate limit (devices told in any 60 s) a deployment has now, or null for none. Constant:
 * `rate_per_minute`. Exponential (AWS IoT Jobs' `exponentialRate`): with `n` the deployment's
 * devices notified (told at least once) or succeeded, per `criterion`, the rate is
 * `floor(base × factor^floor(n / every))` — `base` a minute to start with, multiplied by
 * `factor` each time `n` crosses the next multiple of `every` (default `base`) — capped at `max`.
 */
export function currentRate(
  d: { rate: RateSpec; rate_per_minute: number | null },
  progress: { notified: number; succeeded: number },
): number | null {
  const r = d.rate;
  if (r?.type !== 'exponential') return d.rate_per_minute;
  const n = r.criterion === 'notified' ? progress.notified : progress.succeeded;
  const steps = Math.floor(n / (r.every ?? r.base));
  const cap = r.max ?? MAX_TELL_PER_STEP;
  // factor > 1: past the cap after at most log(cap)/log(factor) steps; stop there (no overflow).
  let rate = r.base;
  for (let k = 0; k < steps && rate < cap; k++) rate *= r.factor;
  return Math.min(cap, Math.floor(rate));
}

/**
 * Claims (or renews) the leases of running or paused deployments (a paused one still records
 * its devices' outcomes) that are free, expired or this node's, in one statement. Returns their ids.
 */
export async function claimDeployments(
  ctx: FleetContext,
  leaseMs = LEASE_MS,
): Promise<{ id: string; kind: 'phased' | 'target' }[]> {
  const { rows } = await sql<{ id: string; kind: 'phased' | 'target' }>`
    UPDATE deployments
    SET lease_holder = ${ctx.nodeName}, lease_until = now() + make_interval(secs => ${leaseMs / 1000})
    WHERE state IN ('running', 'paused')
      AND (lease_holder IS NULL OR lease_holder = ${ctx.nodeName} OR lease_until < now())
    RETURNING id, kind`.execute(ctx.db);
  return rows;
}

/** One orchestrator step of a deployment this node holds the lease of; undefined when it does not. */
export async function stepDeployment(ctx: FleetContext, deploymentId: string): Promise<StepOutcome | undefined> {
  return inTransaction(ctx, async (trx, outbox) => {
    // Locked, with whether this node still holds its lease (database time), in one statement.
    const { rows: locked } = await sql<DeploymentRow & { held: boolean }>`
      SELECT *, (lease_holder = ${ctx.nodeName} AND lease_until > now()) AS held
      FROM deployments WHERE id = ${deploymentId} FOR UPDATE`.execute(trx);
    const d: DeploymentRow | undefined = locked[0];
    if (!locked[0]?.held || (d?.state !== 'running' && d?.state !== 'paused')) return undefined;
    const { finished, retrying, penalized } = await syncOutcomes(trx, d);
    // Paused: devices in flight still finish and are counted; nothing is decided or told.
    if (d.state === 'paused') return { told: [], retried: 0, finished, retrying, penalized, state: d.state };
    const stages = await trx
      .selectFrom('deployment_stages')
      .selectAll()
      .where('deployment_id', '=', d.id)
      .orderBy('stage')
      .execute();
    const { stages: counts, pacing } = await stepCounts(trx, d.id);
    const current = await evaluate(trx, outbox, d, stages, counts);
    // A plain target's deployment was told when its target was set (targets.ts): nothing to tell.
    const { told, retried } =
      current.state === 'running' && current.kind === 'phased'
        ? await tell(ctx, trx, outbox, current, pacing)
        : { told: [], retried: 0 };
    if (finished > 0 || told.length > 0)
      ctx.log.debug(
        { deployment_id: d.id, finished, retrying, penalized, told: told.length, retried, state: current.state },
        'deployment step',
      );
    return { told, retried, finished, retrying, penalized, state: current.state };
  });
}

/**
 * A failure worth retrying: the update `failed` after the device began it, or `timed_out`. One
 * that failed before it began (the device declined or rejected it), rolled back or was cancelled
 * is final. `ua` is the update_attempts alias.
 */
const RETRYABLE = sql`(ua.state = 'timed_out' OR (ua.state = 'failed' AND ua.begun_at IS NOT NULL))`;

/**
 * Devices in flight whose attempt reached a final state: succeeded only on the link's `confirm`;
 * a retryable failure with retries left (`tries ≤ retries`) waits in `retrying` for its backoff
 * (`retry_backoff_s × 2^(tries−1)`, at most a day, from the failure), or in `penalty_box` for
 * `penalty_hold_s` once it failed `penalty_failures` times within `penalty_window_s` (audited
 * `deployment.device_boxed`, with that count and the hold); anything else is `failed`. One
 * statement, its audit records included.
 */
export async function syncOutcomes(
  trx: Db,
  d: DeploymentRow,
): Promise<{ finished: number; retrying: number; penalized: number }> {
  const finals = sql.join(FINAL_STATES.map((s) => sql.lit(s)));
  const via = `deployment:${d.id}`;
  const boxes = d.penalty_failures !== null && d.penalty_window_s !== null && d.penalty_hold_s !== null;
  // Retryable failures of the device in this deployment within the window before this one.
  const windowFailures = boxes
    ? sql`(SELECT count(*)::int FROM update_attempts ua
           WHERE ua.device_id = o.device_id AND ua.via = ${via} AND ${RETRYABLE}
             AND ua.completed_at > o.completed_at - make_interval(secs => ${d.penalty_window_s})
             AND ua.completed_at <= o.completed_at)`
    : sql`NULL::int`;
  const { rows } = await sql<{ state: string }>`
    WITH outcome AS (
      SELECT dd.device_id, dd.tries, ua.state AS attempt_state, ua.errors,
             COALESCE(ua.completed_at, now()) AS completed_at, ${RETRYABLE} AS retryable
      FROM deployment_devices dd JOIN update_attempts ua ON ua.id = dd.attempt_id
      WHERE dd.deployment_id = ${d.id} AND dd.state = 'in_flight' AND ua.state IN (${finals})
    ), judged AS (
      SELECT o.*, w.failures,
             CASE WHEN o.attempt_state = 'succeeded' THEN 'succeeded'
                  WHEN o.retryable AND o.tries <= ${d.retries} THEN
                    CASE WHEN ${boxes ? sql`w.failures >= ${d.penalty_failures}` : sql`false`}
                      THEN 'penalty_box' ELSE 'retrying' END
                  ELSE 'failed' END AS next
      FROM outcome o CROSS JOIN LATERAL (SELECT ${windowFailures} AS failures) w
    ), moved AS (
      UPDATE deployment_devices dd
      SET state = j.next,
          succeeded_at = CASE WHEN j.next = 'succeeded' THEN j.completed_at END,
          failed_at = CASE WHEN j.next <> 'succeeded' THEN j.completed_at END,
          failure_reason = CASE WHEN j.next <> 'succeeded'
            THEN j.attempt_state || COALESCE(': ' || (j.errors ->> 0), '') END,
          retry_at = CASE j.next
            WHEN 'retrying' THEN j.completed_at + make_interval(secs =>
              LEAST(${MAX_RETRY_BACKOFF_S}::float8, ${d.retry_backoff_s}::float8 * power(2, j.tries - 1)))
            WHEN 'penalty_box' THEN j.completed_at + make_interval(secs => ${d.penalty_hold_s ?? 0})
          END
      FROM judged j
      WHERE dd.deployment_id = ${d.id} AND dd.device_id = j.device_id
      RETURNING dd.device_id, dd.stage, dd.tries, dd.state, dd.retry_at, dd.failure_reason, j.failures
    ), boxed AS (
      INSERT INTO audit_log (org_id, actor_type, actor_id, action, resource_type, resource_id, details)
      SELECT ${d.org_id}::uuid, 'system', NULL, 'deployment.device_boxed', 'deployment', ${d.id},
             jsonb_build_object('device_id', m.device_id, 'stage', m.stage, 'tries', m.tries,
               'failures', m.failures, 'window_s', ${d.penalty_window_s}::int, 'hold_s', ${d.penalty_hold_s}::int,
               'retry_at', m.retry_at, 'failure_reason', m.failure_reason)
      FROM moved m WHERE m.state = 'penalty_box'
    )
    SELECT state FROM moved`.execute(trx);
  return {
    finished: rows.length,
    retrying: rows.filter((r) => r.state === 'retrying').length,
    penalized: rows.filter((r) => r.state === 'penalty_box').length,
  };
}

/** Devices with no final outcome yet: not told, in flight, or waiting to be retried. */
const unfinished = (c: StageCounts) => c.pending + c.in_flight + c.retrying + c.penalty_box;

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
  const none = emptyCounts();
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
    const allFinished = unfinished(c) === 0;
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
    } else if (allFinished && d.kind === 'phased') {
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
      const left = [...counts.values()].reduce((n, c) => n + unfinished(c), 0);
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
 * Tells the next devices: pending devices of started stages, and devices whose retry backoff or
 * penalty hold has passed, that are online, as many as the concurrency limit and the rate
 * (devices told in the last 60 s, retries included) leave room for, in stage and position order.
 * They are marked in flight and get their attempt through reconcile, in this transaction: a
 * device is told at most once per try, whatever happens to the process afterwards.
 */
async function tell(
  ctx: FleetContext,
  trx: Db,
  outbox: FleetEvent[],
  d: DeploymentRow,
  { in_flight, recent, notified, succeeded }: PacingCounts,
): Promise<{ told: string[]; retried: number }> {
  let room = MAX_TELL_PER_STEP;
  if (d.max_concurrent !== null) room = Math.min(room, d.max_concurrent - in_flight);
  const rate = currentRate(d, { notified, succeeded });
  if (rate !== null) room = Math.min(room, rate - recent);
  if (room <= 0) return { told: [], retried: 0 };
  // A device leaving the penalty box is audited (`deployment.device_released`) in the same statement.
  const { rows: picked } = await sql<{ device_id: string; tries: number }>`
    WITH picked AS (
      UPDATE deployment_devices dd
      SET state = 'in_flight', told_at = now(), tries = dd.tries + 1, retry_at = NULL, attempt_id = NULL
      FROM (
        SELECT x.device_id, x.state AS was, x.retry_at AS held_until FROM deployment_devices x
        JOIN devices dev ON dev.id = x.device_id
        WHERE x.deployment_id = ${d.id} AND x.stage <= ${d.current_stage}
          AND (x.state = 'pending' OR (x.state IN ('retrying', 'penalty_box') AND x.retry_at <= now()))
          AND dev.connection_status = 'online' AND dev.approval = 'approved'
        ORDER BY x.stage, x.position
        LIMIT ${room}
      ) pick
      WHERE dd.deployment_id = ${d.id} AND dd.device_id = pick.device_id
      RETURNING dd.device_id, dd.stage, dd.tries, pick.was, pick.held_until
    ), released AS (
      INSERT INTO audit_log (org_id, actor_type, actor_id, action, resource_type, resource_id, details)
      SELECT ${d.org_id}::uuid, 'system', NULL, 'deployment.device_released', 'deployment', ${d.id},
             jsonb_build_object('device_id', p.device_id, 'stage', p.stage, 'tries', p.tries, 'held_until', p.held_until)
      FROM picked p WHERE p.was = 'penalty_box'
    )
    SELECT device_id, tries FROM picked`.execute(trx);
  const ids = picked.map((p) => p.device_id);
  if (ids.length === 0) return { told: [], retried: 0 };
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
  return { told: ids, retried: picked.filter((p) => p.tries > 1).length };
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
  /**
   * Milliseconds a nudge waits before its tick (default 100): the nudges of that window — a
   * storm of devices finishing at once — share one step instead of a step each, since a step's
   * sync reads every device in flight.
   */
  nudgeMs?: number;
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
  readonly #nudgeMs: number;
  #timer: NodeJS.Timeout | undefined;
  /** When the scheduled tick runs (Date.now() time). */
  #dueAt = 0;
  #running: Promise<void> | undefined;
  #again = false;
  #stopped = true;
  /** Steps run, devices told, retries scheduled and devices penalty-boxed by this node, for tests and metrics. */
  readonly stats = { ticks: 0, steps: 0, told: 0, retried: 0, penalized: 0 };

  constructor(ctx: FleetContext, options: OrchestratorOptions = {}) {
    this.#ctx = ctx;
    this.#tickMs = options.tickMs ?? 1000;
    this.#leaseMs = options.leaseMs ?? LEASE_MS;
    this.#idleMs = options.idleMs ?? this.#leaseMs;
    this.#nudgeMs = options.nudgeMs ?? 100;
  }

  start(): void {
    this.#stopped = false;
    this.#schedule(0);
  }

  /**
   * Something may have changed: tick within `nudgeMs` (coalesced with the nudges of that window,
   * and with a tick already running). Never postpones a tick due sooner.
   */
  nudge(): void {
    if (this.#stopped) return;
    if (this.#running) this.#again = true;
    else if (this.#timer === undefined || this.#dueAt > Date.now() + this.#nudgeMs) this.#schedule(this.#nudgeMs);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#timer);
    await this.#running;
  }

  #schedule(ms: number): void {
    clearTimeout(this.#timer);
    this.#dueAt = Date.now() + ms;
    this.#timer = setTimeout(() => this.#tick(), ms);
    this.#timer.unref();
  }

  #tick(): void {
    this.#timer = undefined;
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
        this.#schedule(again ? this.#nudgeMs : busy ? this.#tickMs : this.#idleMs);
      });
  }

  /**
   * One tick; returns how many phased deployments this node holds (0: nothing needs the 1 s tick).
   * A plain target's deployment has no pacing, soak or tell step: only its attempts finishing
   * change it, and they nudge; the idle tick (every lease) renews its lease and catches up.
   */
  async #run(): Promise<number> {
    this.stats.ticks++;
    const claimed = await claimDeployments(this.#ctx, this.#leaseMs);
    for (const { id } of claimed) {
      if (this.#stopped) break;
      const outcome = await stepDeployment(this.#ctx, id);
      this.stats.steps++;
      if (outcome) {
        this.stats.told += outcome.told.length;
        this.stats.retried += outcome.retried;
        this.stats.penalized += outcome.penalized;
      }
    }
    return claimed.filter((d) => d.kind === 'phased').length;
  }
}
