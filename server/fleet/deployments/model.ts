/**
 * Deployments (docs/deployments.md): a product's firmware rolled out to a target set in stages.
 * This module is the model: creating one (the target set resolved once into
 * `deployment_devices`, stages sized), reading it with per-stage counts, and the operator's
 * transitions (pause, resume, abort, approve). The orchestrator (orchestrator.ts) tells devices.
 * Every transition is audited in its transaction and published after the commit.
 */
import { sql, type ColumnType, type Generated, type Selectable } from 'kysely';
import semver from 'semver';
import { audit, type Actor } from '../../audit.ts';
import type { Db } from '../../db/index.ts';
import type { Firmware, UpdateAttempt } from '../../db/schema.ts';
import { inTransaction, Topics, type FleetContext, type FleetEvent } from '../context.ts';
import { FleetError, isUuid, notFound } from '../errors.ts';
import { OPEN } from '../link-table.ts';
import { type Page, pageBounds } from '../paging.ts';
import { reconcileAttempts, runsComponentSql, variantSql } from '../reconcile.ts';
import { transitionEvent } from '../updates.ts';

export type DeploymentState =
  | 'draft'
  | 'awaiting_approval'
  | 'running'
  | 'paused'
  | 'completed'
  | 'aborted'
  | 'superseded';
/** `superseded`: a plain target deployment replaced by a newer target set of its group, or cleared. */
export const DEPLOYMENT_STATES: readonly DeploymentState[] = [
  'draft',
  'awaiting_approval',
  'running',
  'paused',
  'completed',
  'aborted',
  'superseded',
];
/** `phased`: created as a deployment; `target`: the one-stage deployment a group `target set` makes. */
export type DeploymentKind = 'phased' | 'target';
export const DEPLOYMENT_KINDS: readonly DeploymentKind[] = ['phased', 'target'];
/** States in which a deployment holds its devices (the overlap rule). */
export const ACTIVE_STATES: readonly DeploymentState[] = ['draft', 'awaiting_approval', 'running', 'paused'];
export type DeploymentDeviceState =
  | 'pending'
  | 'in_flight'
  | 'retrying'
  | 'penalty_box'
  | 'succeeded'
  | 'failed'
  | 'cancelled';
export const DEPLOYMENT_DEVICE_STATES: readonly DeploymentDeviceState[] = [
  'pending',
  'in_flight',
  'retrying',
  'penalty_box',
  'succeeded',
  'failed',
  'cancelled',
];
/** Longest wait before a retry, whatever the backoff doubles to (seconds). */
export const MAX_RETRY_BACKOFF_S = 86_400;
export type PauseCause = 'operator' | 'error' | 'success';

declare module '../../db/schema.ts' {
  interface Database {
    deployments: DeploymentsTable;
    deployment_stages: DeploymentStagesTable;
    deployment_devices: DeploymentDevicesTable;
  }
}

type Timestamp = ColumnType<Date, Date | string, Date | string>;

export interface DeploymentsTable {
  id: Generated<string>;
  org_id: string;
  product_id: string;
  firmware_id: string;
  component: Generated<string>;
  kind: Generated<DeploymentKind>;
  name: string | null;
  group_ids: string[];
  tags: ColumnType<string[], string | undefined, string>;
  version_range: string | null;
  platform: string | null;
  architecture: string | null;
  state: DeploymentState;
  paused_reason: string | null;
  pause_cause: PauseCause | null;
  aborted_reason: string | null;
  current_stage: Generated<number>;
  max_concurrent: number | null;
  rate_per_minute: number | null;
  rate: ColumnType<RateSpec, string | undefined, string>;
  in_flight_timeout_s: number | null;
  retries: Generated<number>;
  retry_backoff_s: Generated<number>;
  penalty_failures: number | null;
  penalty_window_s: number | null;
  penalty_hold_s: number | null;
  lease_holder: string | null;
  lease_until: Timestamp | null;
  created_by: string | null;
  created_at: ColumnType<Date, Date | string | undefined, never>;
  updated_at: ColumnType<Date, Date | string | undefined, Date | string>;
  started_at: Timestamp | null;
  ended_at: Timestamp | null;
}

export interface DeploymentStagesTable {
  deployment_id: string;
  stage: number;
  spec: ColumnType<StageSize, string, string>;
  size: number;
  success_count: number | null;
  success_percent: number | null;
  error_count: number | null;
  error_percent: number | null;
  min_finished: Generated<number>;
  on_error: Generated<'pause' | 'abort'>;
  requires_approval: Generated<boolean>;
  soak_s: Generated<number>;
  error_overridden: Generated<boolean>;
  approved_at: Timestamp | null;
  started_at: Timestamp | null;
  succeeded_at: Timestamp | null;
}

export interface DeploymentDevicesTable {
  deployment_id: string;
  device_id: string;
  stage: number;
  position: number;
  state: Generated<DeploymentDeviceState>;
  tries: Generated<number>;
  told_at: Timestamp | null;
  succeeded_at: Timestamp | null;
  failed_at: Timestamp | null;
  failure_reason: string | null;
  attempt_id: string | null;
  /** `retrying` / `penalty_box`: when the device may be told again. */
  retry_at: Timestamp | null;
}

export type DeploymentRow = Selectable<DeploymentsTable>;
export type StageRow = Selectable<DeploymentStagesTable>;
export type DeploymentDeviceRow = Selectable<DeploymentDevicesTable>;

/**
 * The rate shape. `constant`: `rate_per_minute` (or no limit). `exponential`, as AWS IoT Jobs
 * define it: `base` devices a minute to start with, multiplied by `factor` each time another
 * `every` devices (default `base`) of the deployment were notified or succeeded (`criterion`),
 * never above `max` (optional). See `currentRate`.
 */
export type RateSpec =
  | { type: 'constant' }
  | {
      type: 'exponential';
      base: number;
      factor: number;
      criterion: 'notified' | 'succeeded';
      every?: number;
      max?: number;
    };
/** How many devices a stage takes: a count, a percentage of the deployment's devices, or the rest. */
export type StageSize = { count: number } | { percent: number } | { rest: true };
/** A threshold: a count of devices, or a percentage (of the stage's devices for success, of its finished ones for errors). */
export type Threshold = { count: number } | { percent: number };

export interface StageInput {
  size: StageSize;
  success?: Threshold;
  error?: Threshold;
  minFinished?: number;
  onError?: 'pause' | 'abort';
  requiresApproval?: boolean;
  soakS?: number;
}

export interface CreateDeploymentInput {
  orgId: string;
  productId: string;
  firmwareId: string;
  name?: string | null;
  groupIds: string[];
  tags?: string[];
  versionRange?: string | null;
  platform?: string | null;
  architecture?: string | null;
  stages?: StageInput[];
  maxConcurrent?: number | null;
  ratePerMinute?: number | null;
  rate?: RateSpec;
  inFlightTimeoutS?: number | null;
  retries?: number;
  retryBackoffS?: number;
  penalty?: { failures: number; windowS: number; holdS: number } | null;
  /** false: create a draft (`resume` starts it). Default true. */
  start?: boolean;
}

/** Per-device counts of one stage (or of the whole deployment). */
export interface StageCounts {
  total: number;
  pending: number;
  told: number;
  in_flight: number;
  succeeded: number;
  failed: number;
  cancelled: number;
  /** Failed or timed out, waiting for its backoff before it is told again (not finished). */
  retrying: number;
  /** Failed `penalty_failures` times within the window: held out until its hold passed (not finished). */
  penalty_box: number;
}

export interface StageView extends StageCounts {
  index: number;
  size_spec: StageSize;
  size: number;
  success: Threshold;
  error: Threshold | null;
  min_finished: number;
  on_error: 'pause' | 'abort';
  requires_approval: boolean;
  soak_s: number;
  error_overridden: boolean;
  approved_at: Date | null;
  started_at: Date | null;
  succeeded_at: Date | null;
}

export interface DeploymentView extends Omit<DeploymentRow, 'tags' | 'lease_until'> {
  tags: string[];
  version: string;
  lease_until: Date | null;
  stages: StageView[];
  counts: StageCounts;
}

export const MAX_DEPLOYMENT_DEVICES = 100_000;

/** Default stages: one stage of every device, all must succeed. */
const DEFAULT_STAGES: StageInput[] = [{ size: { rest: true } }];

export function emptyCounts(): StageCounts {
  return {
    total: 0,
    pending: 0,
    told: 0,
    in_flight: 0,
    succeeded: 0,
    failed: 0,
    cancelled: 0,
    retrying: 0,
    penalty_box: 0,
  };
}

/** The device count each stage resolves to for `total` devices; the last stage takes every device left. */
export function stageSizes(stages: readonly StageInput[], total: number): number[] {
  let left = total;
  return stages.map((s, i) => {
    let n: number;
    if (i === stages.length - 1 || 'rest' in s.size) n = left;
    else if ('count' in s.size) n = Math.min(s.size.count, left);
    else n = Math.min(Math.ceil((total * s.size.percent) / 100), left);
    left -= n;
    return n;
  });
}

function validateInput(input: CreateDeploymentInput): StageInput[] {
  const stages = input.stages?.length ? input.stages : DEFAULT_STAGES;
  const bad = (field: string, message: string) => new FleetError('invalid', message, { field });
  stages.forEach((s, i) => {
    if ('rest' in s.size && i !== stages.length - 1)
      throw bad(`stages[${i}].size`, `stage ${i + 1}: only the last stage can take "the rest"`);
    if ('percent' in s.size && (s.size.percent <= 0 || s.size.percent > 100))
      throw bad(`stages[${i}].size`, `stage ${i + 1}: a percentage is from 1 to 100`);
    if (s.error && 'percent' in s.error && (s.error.percent <= 0 || s.error.percent > 100))
      throw bad(`stages[${i}].error`, `stage ${i + 1}: an error percentage is from 1 to 100`);
  });
  validatePacing(input, bad);
  if (input.versionRange != null && semver.validRange(input.versionRange) === null)
    throw bad('version_range', `version_range ${JSON.stringify(input.versionRange)} is not a semver range`);
  if (input.groupIds.length === 0) throw bad('groups', 'name at least one group');
  return stages;
}

const positiveInt = (n: unknown): n is number => Number.isInteger(n) && (n as number) > 0;

/** Pacing, retries and the penalty box: whole numbers where counts, a factor from 1.1 to 5 (as AWS). */
function validatePacing(input: CreateDeploymentInput, bad: (field: string, message: string) => FleetError): void {
  const r = input.rate;
  if (r?.type === 'exponential') {
    if (!positiveInt(r.base) || r.base > 1000)
      throw bad('rate.base', 'rate.base is the starting devices per minute: a whole number from 1 to 1000');
    if (typeof r.factor !== 'number' || !Number.isFinite(r.factor) || r.factor < 1.1 || r.factor > 5)
      throw bad('rate.factor', 'rate.factor multiplies the rate: a number from 1.1 to 5 (e.g. 1.5)');
    if (r.criterion !== 'notified' && r.criterion !== 'succeeded')
      throw bad('rate.criterion', 'rate.criterion is notified or succeeded');
    if (r.every !== undefined && !positiveInt(r.every))
      throw bad('rate.every', 'rate.every is a whole number of devices ≥ 1');
    if (r.max !== undefined && (!positiveInt(r.max) || r.max < r.base))
      throw bad('rate.max', 'rate.max is a whole number of devices a minute, at least rate.base');
    if (input.ratePerMinute != null)
      throw bad('rate_per_minute', 'rate_per_minute is the constant rate; with an exponential rate use rate.max');
  }
  if (input.ratePerMinute != null && !positiveInt(input.ratePerMinute))
    throw bad('rate_per_minute', 'rate_per_minute is a whole number ≥ 1');
  if (input.maxConcurrent != null && !positiveInt(input.maxConcurrent))
    throw bad('max_concurrent', 'max_concurrent is a whole number ≥ 1');
  const retries = input.retries ?? 0;
  if (!Number.isInteger(retries) || retries < 0 || retries > 10)
    throw bad('retries', 'retries is a whole number from 0 to 10');
  const backoff = input.retryBackoffS ?? 60;
  if (!Number.isInteger(backoff) || backoff < 0 || backoff > MAX_RETRY_BACKOFF_S)
    throw bad('retry_backoff_s', `retry_backoff_s is a whole number of seconds from 0 to ${MAX_RETRY_BACKOFF_S}`);
  const p = input.penalty;
  if (p) {
    if (!positiveInt(p.failures)) throw bad('penalty.failures', 'penalty.failures is a whole number ≥ 1');
    if (!positiveInt(p.windowS)) throw bad('penalty.window_s', 'penalty.window_s is a whole number of seconds ≥ 1');
    if (!positiveInt(p.holdS)) throw bad('penalty.hold_s', 'penalty.hold_s is a whole number of seconds ≥ 1');
    if (p.failures > retries)
      throw bad(
        'penalty.failures',
        `a device is held out only while it has retries left: penalty.failures (${p.failures}) must be at most retries (${retries})`,
      );
  }
}

/**
 * Creates a deployment: resolves the target set once (approved devices of the product in any of
 * the groups, with every tag, matching platform/architecture and the version range, not already
 * running the firmware), sizes the stages over them in identifier order, and starts it unless
 * `start: false` (or a first stage waiting for approval). Refuses with `conflict` when any of its
 * devices is in another active deployment (the overlap rule), naming the count.
 */
export async function createDeployment(
  ctx: FleetContext,
  actor: Actor,
  input: CreateDeploymentInput,
): Promise<{ deployment: DeploymentView; alreadyRunning: number }> {
  const stages = validateInput(input);
  const firmware = await targetFirmware(ctx, input.orgId, input.productId, input.firmwareId);
  const groupIds = [...new Set(input.groupIds.map((g) => g.toLowerCase()))];
  const result = await inTransaction(ctx, async (trx, outbox) => {
    // One creation at a time per product: the overlap check and the insert must not interleave.
    await trx.selectFrom('products').select('id').where('id', '=', input.productId).forUpdate().execute();
    const groups = await trx
      .selectFrom('groups')
      .select(['id', 'product_id'])
      .where('org_id', '=', input.orgId)
      .where('id', 'in', groupIds)
      .execute();
    for (const id of groupIds) {
      const g = groups.find((x) => x.id === id);
      if (!g) throw notFound('group', id);
      if (g.product_id !== input.productId)
        throw new FleetError('invalid', 'every group of a deployment must belong to its product', { group_id: id });
    }
    const candidates = await targetSet(trx, input, firmware, groupIds);
    const inRange =
      input.versionRange != null
        ? candidates.filter(
            (c) =>
              c.running_version !== null &&
              semver.valid(c.running_version) !== null &&
              semver.satisfies(c.running_version, input.versionRange!, { includePrerelease: true }),
          )
        : candidates;
    const chosen = inRange.filter((c) => !c.runs_release);
    const alreadyRunning = inRange.length - chosen.length;
    if (chosen.length > MAX_DEPLOYMENT_DEVICES)
      throw new FleetError('invalid', `a deployment holds at most ${MAX_DEPLOYMENT_DEVICES} devices; narrow it`, {});
    const ids = chosen.map((c) => c.id);
    if (ids.length > 0) {
      const { rows } = await sql<{ n: number; deployments: string[] }>`
        SELECT count(DISTINCT dd.device_id)::int AS n, array_agg(DISTINCT dd.deployment_id::text) AS deployments
        FROM deployment_devices dd JOIN deployments dp ON dp.id = dd.deployment_id
        WHERE dp.state IN (${sql.join(ACTIVE_STATES.map((s) => sql.lit(s)))}) AND dp.kind = 'phased'
          AND dd.device_id = ANY(${ids}::uuid[])`.execute(trx);
      const overlap = rows[0];
      if (overlap && overlap.n > 0)
        throw new FleetError(
          'conflict',
          `${overlap.n} of these devices are in another active deployment; a device can be in one at a time (abort or finish it, or narrow the target set)`,
          { overlapping_devices: overlap.n, deployments: overlap.deployments },
        );
    }
    const sizes = stageSizes(stages, ids.length);
    const firstWaits = stages[0]!.requiresApproval === true;
    const state: DeploymentState = input.start === false ? 'draft' : firstWaits ? 'awaiting_approval' : 'running';
    const deployment = await trx
      .insertInto('deployments')
      .values({
        org_id: input.orgId,
        product_id: input.productId,
        firmware_id: firmware.id,
        component: firmware.component,
        name: input.name ?? null,
        group_ids: groupIds,
        tags: JSON.stringify(input.tags ?? []),
        version_range: input.versionRange ?? null,
        platform: input.platform ?? null,
        architecture: input.architecture ?? null,
        state,
        max_concurrent: input.maxConcurrent ?? null,
        rate_per_minute: input.ratePerMinute ?? null,
        rate: JSON.stringify(input.rate ?? { type: 'constant' }),
        in_flight_timeout_s: input.inFlightTimeoutS ?? null,
        retries: input.retries ?? 0,
        retry_backoff_s: input.retryBackoffS ?? 60,
        penalty_failures: input.penalty?.failures ?? null,
        penalty_window_s: input.penalty?.windowS ?? null,
        penalty_hold_s: input.penalty?.holdS ?? null,
        created_by: `${actor.type}:${actor.id ?? ''}`,
        started_at: state === 'running' ? sql<Date>`now()` : null,
      } as never)
      .returningAll()
      .executeTakeFirstOrThrow();
    await trx
      .insertInto('deployment_stages')
      .values(
        stages.map((s, i) => ({
          deployment_id: deployment.id,
          stage: i,
          spec: JSON.stringify(s.size),
          size: sizes[i]!,
          success_count: s.success && 'count' in s.success ? s.success.count : null,
          success_percent: s.success && 'percent' in s.success ? s.success.percent : s.success ? null : 100,
          error_count: s.error && 'count' in s.error ? s.error.count : null,
          error_percent: s.error && 'percent' in s.error ? s.error.percent : null,
          min_finished: s.minFinished ?? 0,
          on_error: s.onError ?? 'pause',
          requires_approval: s.requiresApproval ?? false,
          soak_s: s.soakS ?? 0,
          started_at: i === 0 && state === 'running' ? sql<Date>`now()` : null,
        })) as never,
      )
      .execute();
    if (ids.length > 0) {
      const stageOf: number[] = [];
      sizes.forEach((n, i) => {
        for (let k = 0; k < n; k++) stageOf.push(i);
      });
      await sql`
        INSERT INTO deployment_devices (deployment_id, device_id, stage, position)
        SELECT ${deployment.id}, t.device_id, t.stage, t.position
        FROM unnest(${ids}::uuid[], ${stageOf}::int[]) WITH ORDINALITY AS t(device_id, stage, position)`.execute(trx);
    }
    await transitioned(trx, outbox, actor, deployment, 'deployment.created', {
      firmware_id: firmware.id,
      version: firmware.version,
      devices: ids.length,
      already_running: alreadyRunning,
      stages: sizes,
    });
    return { id: deployment.id, alreadyRunning };
  });
  return { deployment: await getDeployment(ctx, input.orgId, result.id), alreadyRunning: result.alreadyRunning };
}

/** The firmware a deployment may roll out: of its product, with its image uploaded. */
async function targetFirmware(ctx: FleetContext, orgId: string, productId: string, firmwareId: string) {
  const firmware = isUuid(firmwareId)
    ? await ctx.db
        .selectFrom('firmware')
        .selectAll()
        .where('org_id', '=', orgId)
        .where('id', '=', firmwareId)
        .executeTakeFirst()
    : undefined;
  if (!firmware) throw notFound('firmware', firmwareId);
  if (firmware.product_id !== productId)
    throw new FleetError('invalid', 'the firmware belongs to another product than the deployment', {
      firmware_id: firmware.id,
    });
  if (!firmware.has_blob)
    throw new FleetError('invalid', `firmware ${firmware.version} has no uploaded image; upload it first`, {
      firmware_id: firmware.id,
    });
  return firmware;
}

interface Candidate {
  id: string;
  running_id: string | null;
  running_version: string | null;
  /** It runs a variant of the deployment's release. */
  runs_release: boolean;
}

/**
 * The approved devices of the product in any of the groups that match the filters, in identifier
 * order, that the release concerns (they run its component and it has a variant their protocol
 * installs: reconcile.ts).
 */
async function targetSet(
  trx: Db,
  input: CreateDeploymentInput,
  firmware: Firmware,
  groupIds: string[],
): Promise<Candidate[]> {
  const component = firmware.component;
  const { rows } = await sql<Candidate>`
    SELECT d.id,
           CASE WHEN ${component} = 'firmware' THEN d.firmware_uuid ELSE dc.firmware_id END AS running_id,
           CASE WHEN ${component} = 'firmware' THEN d.firmware_version ELSE dc.version END AS running_version,
           COALESCE(rf.product_id = tf.product_id AND rf.component = tf.component AND rf.version = tf.version, false) AS runs_release
    FROM devices d
    JOIN firmware tf ON tf.id = ${firmware.id}
    LEFT JOIN device_components dc ON dc.device_id = d.id AND dc.component = ${component}
    LEFT JOIN firmware rf ON rf.id = CASE WHEN ${component} = 'firmware' THEN d.firmware_uuid ELSE dc.firmware_id END
    WHERE d.org_id = ${input.orgId} AND d.product_id = ${input.productId} AND d.approval = 'approved'
      AND ${runsComponentSql('d', component)} AND EXISTS (${variantSql('d', 'tf')})
      AND EXISTS (SELECT 1 FROM group_devices gd WHERE gd.device_id = d.id AND gd.group_id = ANY(${groupIds}::uuid[]))
      ${input.tags?.length ? sql`AND d.tags @> ${JSON.stringify(input.tags)}::jsonb` : sql``}
      ${input.platform != null ? sql`AND d.platform = ${input.platform}` : sql``}
      ${input.architecture != null ? sql`AND d.architecture = ${input.architecture}` : sql``}
    ORDER BY d.identifier, d.id
    LIMIT ${MAX_DEPLOYMENT_DEVICES + 1}`.execute(trx);
  return rows;
}

/** Audits a deployment transition and queues `deployment_transition` for operators (after the commit). */
export async function transitioned(
  trx: Db,
  outbox: FleetEvent[],
  actor: Actor,
  deployment: Pick<DeploymentRow, 'id' | 'org_id' | 'state' | 'current_stage'>,
  action: string,
  details: Record<string, unknown> = {},
): Promise<void> {
  await audit(trx, actor, {
    orgId: deployment.org_id,
    action,
    resourceType: 'deployment',
    resourceId: deployment.id,
    details: { state: deployment.state, current_stage: deployment.current_stage, ...details },
  });
  outbox.push({
    topic: Topics.operator(deployment.org_id),
    event: 'deployment_transition',
    payload: {
      deployment_id: deployment.id,
      action,
      state: deployment.state,
      current_stage: deployment.current_stage,
      ...details,
    },
  });
  // Every node's orchestrator hears it (the one holding the lease acts).
  outbox.push({ topic: DEPLOYMENTS_TOPIC, event: 'deployment_nudge', payload: { deployment_id: deployment.id } });
}

/** Where orchestrators hear that a deployment may have something to do (an operator acted, a device finished). */
export const DEPLOYMENTS_TOPIC = 'fleet:deployments';

/** The per-device counts of `deployment_devices` rows, as SELECT columns (`StageCounts` but `told`). */
const COUNT_COLUMNS = sql`count(*)::int AS total,
  count(*) FILTER (WHERE state = 'pending')::int AS pending,
  count(*) FILTER (WHERE state = 'in_flight')::int AS in_flight,
  count(*) FILTER (WHERE state = 'succeeded')::int AS succeeded,
  count(*) FILTER (WHERE state = 'failed')::int AS failed,
  count(*) FILTER (WHERE state = 'cancelled')::int AS cancelled,
  count(*) FILTER (WHERE state = 'retrying')::int AS retrying,
  count(*) FILTER (WHERE state = 'penalty_box')::int AS penalty_box`;

/** A counting row of `COUNT_COLUMNS`. */
type CountRow = Omit<StageCounts, 'told'>;
/** `told`: every device but the pending ones (in flight, waiting for a retry or finished). */
const withTold = (c: CountRow): StageCounts => ({ ...c, told: c.total - c.pending });

/** Per-stage per-device counts of a deployment, in one statement. */
export async function stageCounts(db: Db, deploymentId: string): Promise<Map<number, StageCounts>> {
  const { rows } = await sql<CountRow & { stage: number }>`
    SELECT stage, ${COUNT_COLUMNS}
    FROM deployment_devices WHERE deployment_id = ${deploymentId} GROUP BY stage`.execute(db);
  return new Map(rows.map(({ stage, ...c }) => [stage, withTold(c)]));
}

/** What the orchestrator paces by, over the whole deployment (docs/deployments.md, "tell"). */
export interface PacingCounts {
  in_flight: number;
  /** Told (a retry included) in the last 60 s. */
  recent: number;
  /** Told at least once. */
  notified: number;
  succeeded: number;
}

/** `stageCounts` and the deployment's `PacingCounts`, in one statement (one orchestrator step reads both). */
export async function stepCounts(
  db: Db,
  deploymentId: string,
): Promise<{ stages: Map<number, StageCounts>; pacing: PacingCounts }> {
  const { rows } = await sql<CountRow & { stage: number; recent: number; notified: number }>`
    SELECT stage, ${COUNT_COLUMNS},
      count(*) FILTER (WHERE told_at > now() - interval '60 seconds')::int AS recent,
      count(*) FILTER (WHERE tries > 0)::int AS notified
    FROM deployment_devices WHERE deployment_id = ${deploymentId} GROUP BY stage`.execute(db);
  const pacing: PacingCounts = { in_flight: 0, recent: 0, notified: 0, succeeded: 0 };
  const stages = new Map<number, StageCounts>();
  for (const { stage, recent, notified, ...c } of rows) {
    stages.set(stage, withTold(c));
    pacing.in_flight += c.in_flight;
    pacing.recent += recent;
    pacing.notified += notified;
    pacing.succeeded += c.succeeded;
  }
  return { stages, pacing };
}

function stageView(s: StageRow, counts: StageCounts | undefined): StageView {
  const c = counts ?? emptyCounts();
  return {
    index: s.stage,
    size_spec: s.spec,
    size: s.size,
    success: s.success_count !== null ? { count: s.success_count } : { percent: s.success_percent ?? 100 },
    error:
      s.error_count !== null
        ? { count: s.error_count }
        : s.error_percent !== null
          ? { percent: s.error_percent }
          : null,
    min_finished: s.min_finished,
    on_error: s.on_error,
    requires_approval: s.requires_approval,
    soak_s: s.soak_s,
    error_overridden: s.error_overridden,
    approved_at: s.approved_at,
    started_at: s.started_at,
    succeeded_at: s.succeeded_at,
    total: c.total,
    pending: c.pending,
    told: c.told,
    in_flight: c.in_flight,
    succeeded: c.succeeded,
    failed: c.failed,
    cancelled: c.cancelled,
    retrying: c.retrying,
    penalty_box: c.penalty_box,
  };
}

/** A deployment with its stages and their per-device counts. */
export async function getDeployment(ctx: FleetContext, orgId: string, id: string): Promise<DeploymentView> {
  const row =
    isUuid(orgId) && isUuid(id)
      ? await ctx.db
          .selectFrom('deployments')
          .innerJoin('firmware', 'firmware.id', 'deployments.firmware_id')
          .selectAll('deployments')
          .select('firmware.version')
          .where('deployments.org_id', '=', orgId)
          .where('deployments.id', '=', id)
          .executeTakeFirst()
      : undefined;
  if (!row) throw notFound('deployment', id);
  const [stages, counts] = await Promise.all([
    ctx.db.selectFrom('deployment_stages').selectAll().where('deployment_id', '=', id).orderBy('stage').execute(),
    stageCounts(ctx.db, id),
  ]);
  const views = stages.map((s) => stageView(s, counts.get(s.stage)));
  const total = emptyCounts();
  for (const v of views) for (const k of Object.keys(total) as (keyof StageCounts)[]) total[k] += v[k];
  return { ...row, stages: views, counts: total };
}

export interface DeploymentFilter {
  orgId: string;
  state?: DeploymentState;
  kind?: DeploymentKind;
  limit?: number;
  offset?: number;
}

/** Deployments of an organization, newest first, with their totals (one counting statement per page). */
export async function listDeployments(
  ctx: FleetContext,
  filter: DeploymentFilter,
): Promise<Page<Omit<DeploymentView, 'stages'>>> {
  const { limit, offset } = pageBounds(filter.limit, filter.offset);
  if (!isUuid(filter.orgId)) return { items: [], total: 0 };
  let query = ctx.db.selectFrom('deployments').where('deployments.org_id', '=', filter.orgId);
  if (filter.state) query = query.where('deployments.state', '=', filter.state);
  if (filter.kind) query = query.where('deployments.kind', '=', filter.kind);
  const [rows, count] = await Promise.all([
    query
      .innerJoin('firmware', 'firmware.id', 'deployments.firmware_id')
      .selectAll('deployments')
      .select('firmware.version')
      .orderBy('deployments.created_at', 'desc')
      .orderBy('deployments.id')
      .limit(limit)
      .offset(offset)
      .execute(),
    query.select((eb) => eb.fn.countAll<number>().as('n')).executeTakeFirstOrThrow(),
  ]);
  const ids = rows.map((r) => r.id);
  const totals = new Map<string, StageCounts>();
  if (ids.length > 0) {
    const { rows: counted } = await sql<CountRow & { deployment_id: string }>`
      SELECT deployment_id, ${COUNT_COLUMNS}
      FROM deployment_devices WHERE deployment_id = ANY(${ids}::uuid[]) GROUP BY deployment_id`.execute(ctx.db);
    for (const { deployment_id, ...c } of counted) totals.set(deployment_id, withTold(c));
  }
  return {
    items: rows.map((r) => ({ ...r, counts: totals.get(r.id) ?? emptyCounts() })),
    total: Number(count.n),
  };
}

/**
 * The current target deployment of a group for `component`: the newest one still running, or
 * completed (null when there is none, or its target was replaced or cleared: superseded).
 */
export async function groupTargetDeployment(
  ctx: FleetContext,
  groupId: string,
  component = 'firmware',
): Promise<{ id: string; state: DeploymentState; version: string; counts: StageCounts } | null> {
  if (!isUuid(groupId)) return null;
  const { rows } = await sql<{ id: string; state: DeploymentState; version: string } & CountRow>`
    SELECT dp.id, dp.state, f.version, c.*
    FROM deployments dp
    JOIN firmware f ON f.id = dp.firmware_id
    CROSS JOIN LATERAL (SELECT ${COUNT_COLUMNS} FROM deployment_devices WHERE deployment_id = dp.id) c
    WHERE dp.kind = 'target' AND dp.group_ids[1] = ${groupId}::uuid AND dp.component = ${component}
      AND dp.state <> 'superseded'
    ORDER BY dp.created_at DESC, dp.id DESC
    LIMIT 1`.execute(ctx.db);
  const row = rows[0];
  if (!row) return null;
  const { id, state, version, ...counts } = row;
  return { id, state, version, counts: withTold(counts) };
}

export interface DeploymentDeviceFilter {
  state?: DeploymentDeviceState;
  stage?: number;
  limit?: number;
  offset?: number;
}

export interface DeploymentDeviceView extends DeploymentDeviceRow {
  identifier: string;
  protocol: string;
  attempt_state: string | null;
}

/** The devices of a deployment in stage and position order, with their attempt's state. */
export async function listDeploymentDevices(
  ctx: FleetContext,
  orgId: string,
  deploymentId: string,
  filter: DeploymentDeviceFilter = {},
): Promise<Page<DeploymentDeviceView>> {
  const { limit, offset } = pageBounds(filter.limit, filter.offset);
  const deployment = await getDeploymentRow(ctx.db, orgId, deploymentId);
  let query = ctx.db.selectFrom('deployment_devices as dd').where('dd.deployment_id', '=', deployment.id);
  if (filter.state) query = query.where('dd.state', '=', filter.state);
  if (filter.stage !== undefined) query = query.where('dd.stage', '=', filter.stage);
  const [items, count] = await Promise.all([
    query
      .innerJoin('devices as d', 'd.id', 'dd.device_id')
      .leftJoin('update_attempts as ua', 'ua.id', 'dd.attempt_id')
      .selectAll('dd')
      .select(['d.identifier', 'd.protocol', 'ua.state as attempt_state'])
      .orderBy('dd.stage')
      .orderBy('dd.position')
      .limit(limit)
      .offset(offset)
      .execute(),
    query.select((eb) => eb.fn.countAll<number>().as('n')).executeTakeFirstOrThrow(),
  ]);
  return { items: items as DeploymentDeviceView[], total: Number(count.n) };
}

async function getDeploymentRow(db: Db, orgId: string, id: string, lock = false): Promise<DeploymentRow> {
  let query = db.selectFrom('deployments').selectAll().where('org_id', '=', orgId).where('id', '=', id);
  if (lock) query = query.forUpdate();
  const row = isUuid(orgId) && isUuid(id) ? await query.executeTakeFirst() : undefined;
  if (!row) throw notFound('deployment', id);
  return row;
}

/** A plain target deployment has no pacing to act on: pause, resume, approve and abort are refused. */
export const NOT_PACED = 'a plain target is not paced: set another target or clear it';

function notIn(deployment: DeploymentRow, action: string, allowed: readonly DeploymentState[]): never {
  if (deployment.kind === 'target')
    throw new FleetError('conflict', `cannot ${action} deployment ${deployment.id}: ${NOT_PACED}`, {
      kind: deployment.kind,
      state: deployment.state,
    });
  throw new FleetError(
    'conflict',
    `cannot ${action} a deployment that is ${deployment.state} (only when ${allowed.join(' or ')})`,
    { state: deployment.state },
  );
}

/** Pause: nobody new is told; devices in flight finish and are counted. */
export async function pauseDeployment(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  id: string,
  reason?: string,
): Promise<DeploymentView> {
  await inTransaction(ctx, async (trx, outbox) => {
    const d = await getDeploymentRow(trx, orgId, id, true);
    const allowed: DeploymentState[] = ['running', 'awaiting_approval'];
    if (d.kind === 'target' || !allowed.includes(d.state)) notIn(d, 'pause', allowed);
    const updated = await setState(trx, d.id, {
      state: 'paused',
      paused_reason: reason ?? 'paused by an operator',
      pause_cause: 'operator',
    });
    await transitioned(trx, outbox, actor, updated, 'deployment.paused', { reason: updated.paused_reason });
  });
  return getDeployment(ctx, orgId, id);
}

/**
 * Resume a paused deployment (or start a draft): it continues exactly where it stopped. A pause
 * the deployment took itself (a stage's error or success condition) is the operator's to accept:
 * the stages concerned no longer pause it, and succeed once all their devices finished.
 */
export async function resumeDeployment(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  id: string,
): Promise<DeploymentView> {
  await inTransaction(ctx, async (trx, outbox) => {
    const d = await getDeploymentRow(trx, orgId, id, true);
    const allowed: DeploymentState[] = ['paused', 'draft'];
    if (d.kind === 'target' || !allowed.includes(d.state)) notIn(d, 'resume', allowed);
    if (d.state === 'paused' && d.pause_cause !== 'operator' && d.pause_cause !== null) {
      await trx
        .updateTable('deployment_stages')
        .set({ error_overridden: true })
        .where('deployment_id', '=', d.id)
        .where('stage', '<=', d.current_stage)
        .where('succeeded_at', 'is', null)
        .execute();
    }
    const stage = await trx
      .selectFrom('deployment_stages')
      .selectAll()
      .where('deployment_id', '=', d.id)
      .where('stage', '=', d.current_stage)
      .executeTakeFirstOrThrow();
    const waits = stage.started_at === null && stage.requires_approval && stage.approved_at === null;
    const updated = await setState(trx, d.id, {
      state: waits ? 'awaiting_approval' : 'running',
      paused_reason: null,
      pause_cause: null,
      ...(d.started_at === null && !waits ? { started_at: sql<Date>`now()` } : {}),
    });
    await transitioned(trx, outbox, actor, updated, d.state === 'draft' ? 'deployment.started' : 'deployment.resumed');
  });
  return getDeployment(ctx, orgId, id);
}

/** Approve the stage waiting for approval (the first stage, or the next one after a stage succeeded). */
export async function approveDeployment(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  id: string,
): Promise<DeploymentView> {
  await inTransaction(ctx, async (trx, outbox) => {
    const d = await getDeploymentRow(trx, orgId, id, true);
    if (d.kind === 'target' || d.state !== 'awaiting_approval') notIn(d, 'approve', ['awaiting_approval']);
    const waiting = await trx
      .selectFrom('deployment_stages')
      .select('stage')
      .where('deployment_id', '=', d.id)
      .where('started_at', 'is', null)
      .where('requires_approval', '=', true)
      .where('approved_at', 'is', null)
      .orderBy('stage')
      .limit(1)
      .executeTakeFirst();
    if (waiting)
      await trx
        .updateTable('deployment_stages')
        .set({ approved_at: sql<Date>`now()` })
        .where('deployment_id', '=', d.id)
        .where('stage', '=', waiting.stage)
        .execute();
    const updated = await setState(trx, d.id, {
      state: 'running',
      ...(d.started_at === null ? { started_at: sql<Date>`now()` } : {}),
    });
    await transitioned(trx, outbox, actor, updated, 'deployment.approved', { stage: waiting?.stage ?? null });
  });
  return getDeployment(ctx, orgId, id);
}

/**
 * Abort: nobody new is told; devices in flight are cancelled (their rows `cancelled`, their open
 * attempts cancelled through reconcile now that they no longer resolve to the release) and each
 * gets `update_cancelled` on its device topic.
 */
export async function abortDeployment(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  id: string,
  reason?: string,
): Promise<DeploymentView> {
  await inTransaction(ctx, async (trx, outbox) => {
    const d = await getDeploymentRow(trx, orgId, id, true);
    if (d.kind === 'target' || !ACTIVE_STATES.includes(d.state)) notIn(d, 'abort', ACTIVE_STATES);
    await abortInTransaction(trx, outbox, actor, d, reason ?? 'aborted by an operator');
  });
  return getDeployment(ctx, orgId, id);
}

/** The abort itself, inside the caller's transaction (an operator's, or a stage's error action). */
export async function abortInTransaction(
  trx: Db,
  outbox: FleetEvent[],
  actor: Actor,
  d: DeploymentRow,
  reason: string,
): Promise<void> {
  const updated = await setState(trx, d.id, {
    state: 'aborted',
    aborted_reason: reason,
    ended_at: sql<Date>`now()`,
    lease_holder: null,
    lease_until: null,
  });
  const { rows: cancelled } = await sql<{ device_id: string; attempt_id: string | null }>`
    UPDATE deployment_devices SET state = 'cancelled', failure_reason = 'cancelled: the deployment was aborted'
    WHERE deployment_id = ${d.id} AND state = 'in_flight'
    RETURNING device_id, attempt_id`.execute(trx);
  // Waiting for a retry: not told again; their last failure stands.
  await sql`
    UPDATE deployment_devices SET state = 'failed', retry_at = NULL
    WHERE deployment_id = ${d.id} AND state IN ('retrying', 'penalty_box')`.execute(trx);
  const ids = cancelled.map((c) => c.device_id);
  if (ids.length > 0) {
    // They no longer resolve to the release: reconcile cancels their open attempts (link-table `cancel`).
    await reconcileAttempts(trx, { ids }, d.component);
    const attemptIds = cancelled.map((c) => c.attempt_id).filter((a): a is string => a !== null);
    const { rows: attempts } = await sql<UpdateAttempt>`
      SELECT * FROM update_attempts WHERE id = ANY(${attemptIds}::uuid[]) AND state = 'cancelled'`.execute(trx);
    for (const a of attempts) {
      outbox.push(transitionEvent(a));
      outbox.push({
        topic: Topics.device(a.device_id),
        event: 'update_cancelled',
        payload: { version: a.to_version, firmware_uuid: a.firmware_id, reason: `deployment ${d.id} was aborted` },
      });
    }
  }
  await transitioned(trx, outbox, actor, updated, 'deployment.aborted', { reason, cancelled: ids.length });
}

/** Sets columns of a deployment (and `updated_at`), returning the row. */
export async function setState(trx: Db, id: string, set: Record<string, unknown>): Promise<DeploymentRow> {
  return trx
    .updateTable('deployments')
    .set({ ...set, updated_at: sql<Date>`now()` } as never)
    .where('id', '=', id)
    .returningAll()
    .executeTakeFirstOrThrow();
}

/**
 * Why a report on an attempt is refused when its deployment was aborted: the newest attempt of
 * the device for `version` (or of `component`) was cancelled by an aborted deployment.
 */
export async function abortedDeploymentOf(
  db: Db,
  deviceId: string,
  select: { component: string; version?: string },
): Promise<{ id: string; attempt_id: string } | undefined> {
  if (!isUuid(deviceId)) return undefined;
  const { rows } = await sql<{ id: string; attempt_id: string }>`
    SELECT dp.id, ua.id AS attempt_id
    FROM update_attempts ua
    JOIN deployment_devices dd ON dd.attempt_id = ua.id AND dd.device_id = ua.device_id
    JOIN deployments dp ON dp.id = dd.deployment_id
    WHERE ua.device_id = ${deviceId} AND ua.component = ${select.component}
      ${select.version !== undefined ? sql`AND ua.to_version = ${select.version}` : sql``}
      AND ua.state = 'cancelled' AND dp.state = 'aborted'
      AND NOT EXISTS (SELECT 1 FROM update_attempts o WHERE o.device_id = ua.device_id AND o.component = ua.component AND o.state IN (${OPEN}))
    ORDER BY ua.created_at DESC LIMIT 1`.execute(db);
  return rows[0];
}
