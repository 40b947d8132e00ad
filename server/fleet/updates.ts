/**
 * The update state machine: one module every edge calls.
 *
 *   queued → sent → begun → downloading → finished → succeeded | rolled_back
 *   (any open state) → failed (device error) | timed_out (sweeper) | cancelled (superseded)
 *
 * `queued`: the device was offline when its target changed; `sent`: the `firmware_update` was
 * pushed. The device reports begin / progress / finish / error; the outcome is decided when it
 * rejoins: running the target firmware → succeeded, still the old one after `finish` → rolled_back.
 */
import { sql } from 'kysely';
import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { Firmware, UpdateAttempt, UpdateState } from '../db/schema.ts';
import type { FirmwareUpdatePayload } from '../../shared/protocol.ts';
import { inTransaction, publishAll, Topics, type FleetContext, type FleetEvent } from './context.ts';
import { FleetError, isUuid, notFound } from './errors.ts';
import { type Page, pageBounds } from './paging.ts';
import { ProgressBatcher, type ProgressBatchStats, type ProgressReport } from './progress-batch.ts';
import {
  fromSql,
  OPEN_STATES,
  RESUMING_EVENTS,
  stepColumns,
  stepSql,
  stepsOf,
  transitionOf,
  UPDATE_STATES,
  type AttemptEvent,
} from './link-table.ts';
import type { CreatedAttempt } from './reconcile.ts';

export { OPEN_STATES, UPDATE_STATES };

export type UpdateReportEvent =
  | 'firmware_update_begin'
  | 'firmware_update_progress'
  | 'firmware_update_finish'
  | 'firmware_update_error';

export const UPDATE_REPORT_EVENTS: readonly UpdateReportEvent[] = [
  'firmware_update_begin',
  'firmware_update_progress',
  'firmware_update_finish',
  'firmware_update_error',
];

/** The table event (link-table.ts) each Phoenix report is. */
const REPORT_EVENT: Record<UpdateReportEvent, AttemptEvent> = {
  firmware_update_begin: 'begin',
  firmware_update_progress: 'progress',
  firmware_update_finish: 'finish',
  firmware_update_error: 'fail',
};

/** The device a report comes from (from its certificate, never from the payload). */
export interface DeviceRef {
  deviceId: string;
  orgId: string;
}

/** The `firmware_update` payload for one firmware image (the same bytes for every receiver). */
export function firmwareUpdatePayload(ctx: FleetContext, firmware: Firmware): FirmwareUpdatePayload {
  return {
    url: ctx.firmwareUrl(firmware),
    version: firmware.version,
    sha256: firmware.sha256 ?? '',
    size: Number(firmware.size ?? 0),
    ...(firmware.signature ? { signature: firmware.signature } : {}),
    firmware_uuid: firmware.id,
  };
}

/** The small summary operators see live (`operator:<orgId>` `update_transition`). */
export function attemptSummary(a: UpdateAttempt): Record<string, unknown> {
  return {
    id: a.id,
    device_id: a.device_id,
    firmware_id: a.firmware_id,
    to_version: a.to_version,
    state: a.state,
    percent: a.percent,
    via: a.via,
  };
}

interface ValidReport {
  version: string;
  percent?: number;
  bytes?: number;
  total?: number;
  errors?: string[];
}

/** Validates a report payload; throws `invalid` naming the bad field. */
export function validateReport(event: UpdateReportEvent, payload: unknown): ValidReport {
  const p = (typeof payload === 'object' && payload !== null && !Array.isArray(payload) ? payload : {}) as Record<
    string,
    unknown
  >;
  const bad = (field: string, expected: string) =>
    new FleetError('invalid', `${event}: ${field} must be ${expected}`, { field });
  if (typeof p.version !== 'string' || p.version.length === 0 || p.version.length > 100)
    throw bad('version', 'the version being installed (a string)');
  const report: ValidReport = { version: p.version };
  if (event === 'firmware_update_progress') {
    if (!Number.isInteger(p.percent) || (p.percent as number) < 0 || (p.percent as number) > 100)
      throw bad('percent', 'an integer from 0 to 100');
    if (!Number.isSafeInteger(p.bytes) || (p.bytes as number) < 0) throw bad('bytes', 'a non-negative integer');
    if (!Number.isSafeInteger(p.total) || (p.total as number) < 0) throw bad('total', 'a non-negative integer');
    if ((p.total as number) > 0 && (p.bytes as number) > (p.total as number)) throw bad('bytes', 'at most total');
    Object.assign(report, { percent: p.percent, bytes: p.bytes, total: p.total });
  }
  if (event === 'firmware_update_error') {
    const errors = p.errors;
    if (
      !Array.isArray(errors) ||
      errors.length === 0 ||
      errors.length > 50 ||
      !errors.every((e) => typeof e === 'string' && e.length <= 2000)
    ) {
      throw bad('errors', 'a non-empty list of at most 50 strings');
    }
    report.errors = errors as string[];
  }
  return report;
}

/**
 * Applies one device report to the device's open attempt for `version`: validates the payload,
 * checks the transition, persists it with an audit record (progress is persisted on the attempt
 * but not audited), then tells operators. Throws `invalid` (payload), `not_found` (no update to
 * that version in flight) or `conflict` (transition not allowed from the current state).
 * Progress reports are written in batches (progress-batch.ts) with the same answers and errors.
 */
export async function applyUpdateReport(
  ctx: FleetContext,
  device: DeviceRef,
  event: UpdateReportEvent,
  payload: unknown,
  component = 'firmware',
): Promise<UpdateAttempt> {
  const step = REPORT_EVENT[event];
  if (!step) throw new FleetError('invalid', `unknown update report ${JSON.stringify(event)}`, { event });
  const report = validateReport(event, payload);
  const startedAt = performance.now();
  const ingested = <T>(attempt: T): T => {
    ctx.observer?.reportIngested?.(event, (performance.now() - startedAt) / 1000);
    return attempt;
  };
  // A malformed id would fail the whole batch's uuid[] cast; alone it fails only its own report.
  if (step === 'progress' && isUuid(device.deviceId)) {
    return progressBatcherOf(ctx)
      .submit({
        device,
        deviceId: device.deviceId,
        component,
        version: report.version,
        percent: report.percent!,
        bytes: report.bytes!,
        total: report.total!,
      })
      .then(ingested);
  }
  return moveAttempt(ctx, device, step, { component, version: report.version }, { ...report, via: event }).then(
    ingested,
  );
}

/** Which open attempt of a device an event is for: its component's newest, or the one for a version or firmware. */
export interface AttemptSelector {
  component?: string;
  version?: string;
  firmwareId?: string;
}

/** What an event carries besides its kind. */
export interface AttemptChange {
  percent?: number;
  bytes?: number;
  total?: number;
  errors?: string[];
  /** Audit detail (why), e.g. `health check failed`. */
  reason?: string;
  /** The protocol's name for the event, in a refusal (default: the table event). */
  via?: string;
}

/**
 * The single-attempt path of the transition table: one transaction that locks the device's
 * open attempt (`select`), checks that `event` may move it (link-table.ts; on a download resumed
 * after a resend that is `begin` and then the event, `stepsOf`) and writes the move with its
 * timestamps, an audit record per move (not for progress) and the operators' event per move. Throws
 * `not_found` (no open attempt) or `conflict` (the table has no such move from its state).
 */
export async function moveAttempt(
  ctx: FleetContext,
  device: DeviceRef,
  event: AttemptEvent,
  select: AttemptSelector,
  change: AttemptChange = {},
): Promise<UpdateAttempt> {
  const component = select.component ?? 'firmware';
  return inTransaction(ctx, async (trx, outbox) => {
    let query = trx
      .selectFrom('update_attempts')
      .selectAll()
      .where('device_id', '=', device.deviceId)
      .where('component', '=', component)
      .where('state', 'in', OPEN_STATES);
    if (select.version !== undefined) query = query.where('to_version', '=', select.version);
    if (select.firmwareId !== undefined) query = query.where('firmware_id', '=', select.firmwareId);
    const attempt = await query.orderBy('created_at', 'desc').limit(1).forUpdate().executeTakeFirst();
    if (!attempt) {
      throw new FleetError(
        'not_found',
        select.version !== undefined
          ? `no update to version ${select.version} is in progress for this device; report the version from the firmware_update message`
          : 'no update is in progress for this device',
        select.version !== undefined ? { version: select.version } : {},
      );
    }
    // The moves the event makes (two on a resumed download: begin, then its own), each from the table.
    const moves: { event: AttemptEvent; from: UpdateState; to: UpdateState }[] = [];
    for (const step of stepsOf(event, attempt)) {
      const from = moves.at(-1)?.to ?? attempt.state;
      const to = transitionOf(step, from);
      if (!to) throw refused(change.via ?? event, event, attempt.state);
      moves.push({ event: step, from, to });
    }
    const to = moves.at(-1)!.to;
    const updated = await trx
      .updateTable('update_attempts')
      .set({
        state: to,
        ...Object.assign({}, ...moves.map((m) => stepColumns(m.to))),
        ...(event === 'progress' ? { percent: change.percent, bytes: change.bytes, total: change.total } : {}),
        ...(event !== 'progress' && change.percent !== undefined ? { percent: change.percent } : {}),
        ...(change.errors ? { errors: JSON.stringify(change.errors) } : {}),
      })
      .where('id', '=', attempt.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    for (const m of moves) {
      if (m.event === 'progress') continue;
      const implied = m.event !== event;
      await audit(trx, deviceActor(device), {
        orgId: device.orgId,
        action: `update.${m.to}`,
        resourceType: 'update_attempt',
        resourceId: attempt.id,
        details: {
          device_id: device.deviceId,
          version: attempt.to_version,
          from_state: m.from,
          ...(implied ? { reason: `resumed: ${change.via ?? event} on an update sent again mid-download` } : {}),
          ...(!implied && change.reason ? { reason: change.reason } : {}),
          ...(!implied && change.errors ? { errors: change.errors } : {}),
        },
      });
    }
    // Every move is its own transition for operators and webhooks, in order: an implied begin
    // (state `begun`, as a begin reported by the device publishes) before the event's own move.
    for (const m of moves.slice(0, -1)) outbox.push(transitionEvent({ ...attempt, state: m.to }));
    outbox.push(transitionEvent(updated));
    return updated;
  });
}

/** The refusal of `event` (named `via` to the device) on an attempt in `state`; says what is missing when it is the begin. */
function refused(via: string, event: AttemptEvent, state: UpdateState): FleetError {
  const unbegun = RESUMING_EVENTS.includes(event) && transitionOf('begin', state) !== undefined;
  return new FleetError(
    'conflict',
    `${via} is not allowed while the update is ${state}${unbegun ? '; report the begin of the update first' : ''}`,
    { state, event: via },
  );
}

/** A progress report waiting for its batch, with the device it came from (for the single-report path). */
interface QueuedProgress extends ProgressReport {
  device: DeviceRef;
}

const progressBatchers = new WeakMap<FleetContext, ProgressBatcher<QueuedProgress>>();

/** The context's progress batcher, created on first use (a context is one process's fleet). */
function progressBatcherOf(ctx: FleetContext): ProgressBatcher<QueuedProgress> {
  let batcher = progressBatchers.get(ctx);
  if (!batcher) {
    batcher = new ProgressBatcher<QueuedProgress>({
      db: ctx.db,
      applyOne: (r) =>
        moveAttempt(
          ctx,
          r.device,
          'progress',
          { component: r.component, version: r.version },
          { percent: r.percent, bytes: r.bytes, total: r.total, via: 'firmware_update_progress' },
        ),
      committed: (attempts) => publishAll(ctx, attempts.map(transitionEvent)),
    });
    progressBatchers.set(ctx, batcher);
  }
  return batcher;
}

/** How progress ingest has gone for this context: reports, batch statements, fallbacks to the single-report path. */
export function progressIngestStats(ctx: FleetContext): ProgressBatchStats {
  return { ...(progressBatchers.get(ctx)?.stats ?? { reports: 0, batches: 0, applied: 0, fallbacks: 0, failed: 0 }) };
}

export function deviceActor(device: { deviceId: string }): Actor {
  return { type: 'device', id: device.deviceId };
}

export function transitionEvent(attempt: UpdateAttempt): FleetEvent {
  return { topic: Topics.operator(attempt.org_id), event: 'update_transition', payload: attemptSummary(attempt) };
}

/**
 * Decides the outcome of in-flight attempts when a device (re)joins running `runningId` (null:
 * firmware the catalogue does not hold): an attempt for the running firmware → succeeded; an
 * attempt that reached `finished` for other firmware → rolled_back (the device came back on
 * another image). Returns the changed attempts.
 */
export async function settleAttemptsOnJoin(
  trx: Db,
  device: DeviceRef,
  runningId: string | null,
  outbox: FleetEvent[],
  component = 'firmware',
): Promise<UpdateAttempt[]> {
  // confirm: any open attempt for the running firmware's release (any variant of that product,
  // component and version); roll_back: a finished one for other firmware.
  const running = sql`(SELECT v.id FROM firmware v JOIN firmware r ON r.id = ${runningId}::uuid
    WHERE v.product_id = r.product_id AND v.component = r.component AND v.version = r.version)`;
  const { rows: changed } = await sql<UpdateAttempt>`
    UPDATE update_attempts
    SET state = CASE WHEN firmware_id IN ${running} THEN 'succeeded' ELSE 'rolled_back' END,
        ${stepSql('succeeded')}
    WHERE device_id = ${device.deviceId} AND component = ${component}
      AND ((firmware_id IN ${running} AND state IN (${fromSql('confirm')}))
        OR (firmware_id NOT IN ${running} AND state = 'finished' AND state IN (${fromSql('roll_back')})))
    RETURNING *`.execute(trx);
  for (const a of changed) {
    await audit(trx, deviceActor(device), {
      orgId: device.orgId,
      action: `update.${a.state}`,
      resourceType: 'update_attempt',
      resourceId: a.id,
      details: { device_id: device.deviceId, version: a.to_version, running_firmware: runningId },
    });
    outbox.push(transitionEvent(a));
  }
  return changed;
}

/** The in-flight timeout when neither the product nor the server configures one: 30 minutes. */
export const DEFAULT_UPDATE_TIMEOUT_S = 30 * 60;

export interface SweepOptions {
  /** The server's in-flight timeout, for products without their own (`products.update_timeout_seconds`). */
  defaultTimeoutS?: number;
  /** The clock the sweep compares with (tests move it forward). */
  now?: Date;
}

/**
 * The one timeout sweep, for every protocol: attempts that made no progress for their
 * deployment's in-flight timeout (docs/deployments.md), else their product's (or the server's) become `timed_out` (`queued` attempts wait for their device
 * and never time out). Safe to run on every node. Returns how many changed.
 */
export async function sweepStaleUpdates(ctx: FleetContext, options: SweepOptions = {}): Promise<number> {
  const now = options.now ?? new Date();
  const fallback = options.defaultTimeoutS ?? DEFAULT_UPDATE_TIMEOUT_S;
  // A deployment's attempt (via `deployment:<id>`) takes its deployment's timeout first.
  const timeout = sql`COALESCE(
    (SELECT dp.in_flight_timeout_s FROM deployments dp WHERE ua.via = 'deployment:' || dp.id::text),
    p.update_timeout_seconds, ${fallback})`;
  return inTransaction(ctx, async (trx, outbox) => {
    const { rows } = await sql<UpdateAttempt & { timeout_s: number }>`
      UPDATE update_attempts ua
      SET state = 'timed_out', ${stepSql('timed_out')}
      FROM devices d JOIN products p ON p.id = d.product_id
      WHERE d.id = ua.device_id AND ua.state IN (${fromSql('time_out')})
        AND ua.updated_at < ${now}::timestamptz - ${timeout} * interval '1 second'
      RETURNING ua.*, (${timeout})::int AS timeout_s`.execute(trx);
    for (const { timeout_s, ...a } of rows) {
      await audit(
        trx,
        { type: 'system', id: null },
        {
          orgId: a.org_id,
          action: 'update.timed_out',
          resourceType: 'update_attempt',
          resourceId: a.id,
          details: { device_id: a.device_id, version: a.to_version, via: a.via, timeout_s },
        },
      );
      outbox.push(transitionEvent(a));
    }
    if (rows.length > 0) ctx.log.info({ count: rows.length }, 'update attempts timed out');
    return rows.length;
  });
}

export interface AttemptFilter {
  orgId: string;
  deviceId?: string;
  groupId?: string;
  state?: UpdateState;
  limit?: number;
  offset?: number;
}

/** Update attempts of an organization (optionally one device's, or a group's members'), newest first. */
export async function listUpdateAttempts(ctx: FleetContext, filter: AttemptFilter): Promise<Page<UpdateAttempt>> {
  const { limit, offset } = pageBounds(filter.limit, filter.offset);
  if (
    !isUuid(filter.orgId) ||
    (filter.deviceId && !isUuid(filter.deviceId)) ||
    (filter.groupId && !isUuid(filter.groupId))
  )
    return { items: [], total: 0 };
  if (filter.state && !UPDATE_STATES.includes(filter.state))
    throw new FleetError('invalid', `state must be one of ${UPDATE_STATES.join(', ')}`, { field: 'state' });
  let query = ctx.db.selectFrom('update_attempts').where('update_attempts.org_id', '=', filter.orgId);
  if (filter.deviceId) query = query.where('update_attempts.device_id', '=', filter.deviceId);
  if (filter.groupId) {
    const groupId = filter.groupId;
    query = query.where('update_attempts.device_id', 'in', (eb) =>
      eb.selectFrom('group_devices').select('device_id').where('group_id', '=', groupId),
    );
  }
  if (filter.state) query = query.where('update_attempts.state', '=', filter.state);
  const [items, count] = await Promise.all([
    query.selectAll().orderBy('created_at', 'desc').orderBy('id').limit(limit).offset(offset).execute(),
    query.select((eb) => eb.fn.countAll<number>().as('n')).executeTakeFirstOrThrow(),
  ]);
  return { items, total: Number(count.n) };
}

/** How many attempts are in each state, for an organization or one group's members (every state present, 0 when none). */
export async function countUpdateStates(
  ctx: FleetContext,
  scope: { orgId: string; groupId?: string; firmwareId?: string },
): Promise<Record<UpdateState, number>> {
  const counts = Object.fromEntries(UPDATE_STATES.map((s) => [s, 0])) as Record<UpdateState, number>;
  if (
    !isUuid(scope.orgId) ||
    (scope.groupId && !isUuid(scope.groupId)) ||
    (scope.firmwareId && !isUuid(scope.firmwareId))
  )
    return counts;
  let query = ctx.db.selectFrom('update_attempts').where('org_id', '=', scope.orgId);
  if (scope.groupId) {
    const groupId = scope.groupId;
    query = query.where('device_id', 'in', (eb) =>
      eb.selectFrom('group_devices').select('device_id').where('group_id', '=', groupId),
    );
  }
  if (scope.firmwareId) query = query.where('firmware_id', '=', scope.firmwareId);
  const rows = await query
    .select(['state', (eb) => eb.fn.countAll<number>().as('n')])
    .groupBy('state')
    .execute();
  for (const r of rows) counts[r.state] = Number(r.n);
  return counts;
}

/** Queues `firmware_update` on the device topic of every `sent` attempt (one payload per firmware). */
export async function pushCreatedAttempts(
  ctx: FleetContext,
  trx: Db,
  outbox: FleetEvent[],
  created: CreatedAttempt[],
): Promise<void> {
  const sent = created.filter((a) => a.state === 'sent');
  if (sent.length === 0) return;
  const ids = [...new Set(sent.map((a) => a.firmware_id))];
  const firmware = await trx.selectFrom('firmware').selectAll().where('id', 'in', ids).execute();
  const payloads = new Map(firmware.map((f) => [f.id, firmwareUpdatePayload(ctx, f)]));
  for (const a of sent) {
    const payload = payloads.get(a.firmware_id);
    if (!payload) throw notFound('firmware', a.firmware_id);
    outbox.push({ topic: Topics.device(a.device_id), event: 'firmware_update', payload: { ...payload } });
  }
}
