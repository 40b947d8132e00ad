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
import { type CreatedAttempt, OPEN_STATES } from './reconcile.ts';

export { OPEN_STATES };

export const UPDATE_STATES: readonly UpdateState[] = [
  'queued',
  'sent',
  'begun',
  'downloading',
  'finished',
  'succeeded',
  'failed',
  'rolled_back',
  'timed_out',
  'cancelled',
];

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

/** Which states each report may move an attempt from. */
const TRANSITIONS: Record<UpdateReportEvent, { from: readonly UpdateState[]; to: UpdateState }> = {
  firmware_update_begin: { from: ['queued', 'sent'], to: 'begun' },
  firmware_update_progress: { from: ['begun', 'downloading'], to: 'downloading' },
  firmware_update_finish: { from: ['begun', 'downloading'], to: 'finished' },
  firmware_update_error: { from: ['queued', 'sent', 'begun', 'downloading', 'finished'], to: 'failed' },
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
  const transition = TRANSITIONS[event];
  if (!transition) throw new FleetError('invalid', `unknown update report ${JSON.stringify(event)}`, { event });
  const report = validateReport(event, payload);
  // A malformed id would fail the whole batch's uuid[] cast; alone it fails only its own report.
  if (event === 'firmware_update_progress' && isUuid(device.deviceId)) {
    return progressBatcherOf(ctx).submit({
      device,
      deviceId: device.deviceId,
      component,
      version: report.version,
      percent: report.percent!,
      bytes: report.bytes!,
      total: report.total!,
    });
  }
  return applyOneReport(ctx, device, event, report, component);
}

/** The single-report path: one transaction that locks the attempt, checks the transition and writes it. */
async function applyOneReport(
  ctx: FleetContext,
  device: DeviceRef,
  event: UpdateReportEvent,
  report: ValidReport,
  component: string,
): Promise<UpdateAttempt> {
  const transition = TRANSITIONS[event];
  return inTransaction(ctx, async (trx, outbox) => {
    const attempt = await trx
      .selectFrom('update_attempts')
      .selectAll()
      .where('device_id', '=', device.deviceId)
      .where('component', '=', component)
      .where('to_version', '=', report.version)
      .where('state', 'in', OPEN_STATES)
      .orderBy('created_at', 'desc')
      .forUpdate()
      .executeTakeFirst();
    if (!attempt) {
      throw new FleetError(
        'not_found',
        `no update to version ${report.version} is in progress for this device; report the version from the firmware_update message`,
        {
          version: report.version,
        },
      );
    }
    if (!transition.from.includes(attempt.state)) {
      throw new FleetError('conflict', `${event} is not allowed while the update is ${attempt.state}`, {
        state: attempt.state,
        event,
      });
    }
    // Database time everywhere: targets' set_at is compared with completed_at across nodes.
    const now = sql<Date>`now()`;
    const updated = await trx
      .updateTable('update_attempts')
      .set({
        state: transition.to,
        updated_at: now,
        ...(event === 'firmware_update_begin' ? { begun_at: now } : {}),
        ...(event === 'firmware_update_progress'
          ? { percent: report.percent, bytes: report.bytes, total: report.total }
          : {}),
        ...(event === 'firmware_update_finish' ? { finished_at: now, percent: 100 } : {}),
        ...(event === 'firmware_update_error' ? { completed_at: now, errors: JSON.stringify(report.errors) } : {}),
      })
      .where('id', '=', attempt.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    if (event !== 'firmware_update_progress') {
      await audit(trx, deviceActor(device), {
        orgId: device.orgId,
        action: `update.${transition.to}`,
        resourceType: 'update_attempt',
        resourceId: attempt.id,
        details: {
          device_id: device.deviceId,
          version: report.version,
          ...(report.errors ? { errors: report.errors } : {}),
        },
      });
    }
    outbox.push(transitionEvent(updated));
    return updated;
  });
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
        applyOneReport(
          ctx,
          r.device,
          'firmware_update_progress',
          { version: r.version, percent: r.percent, bytes: r.bytes, total: r.total },
          r.component,
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
  const changed = await trx
    .updateTable('update_attempts')
    .set({
      state: sql`CASE WHEN firmware_id = ${runningId} THEN 'succeeded' ELSE 'rolled_back' END`,
      completed_at: sql<Date>`now()`,
      updated_at: sql<Date>`now()`,
    })
    .where('device_id', '=', device.deviceId)
    .where('component', '=', component)
    .where((eb) =>
      runningId === null
        ? eb('state', '=', 'finished')
        : eb.or([
            eb.and([eb('firmware_id', '=', runningId), eb('state', 'in', OPEN_STATES)]),
            eb('state', '=', 'finished'),
          ]),
    )
    .returningAll()
    .execute();
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

/**
 * Marks attempts that made no progress for `staleAfterMs` as timed_out (`queued` attempts wait
 * for their device and never time out). Safe to run on every node. Returns how many changed.
 */
export async function sweepStaleUpdates(
  ctx: FleetContext,
  options: { staleAfterMs?: number; now?: Date } = {},
): Promise<number> {
  const cutoff = new Date((options.now ?? new Date()).getTime() - (options.staleAfterMs ?? 30 * 60_000));
  return inTransaction(ctx, async (trx, outbox) => {
    const rows = await trx
      .updateTable('update_attempts')
      .set({ state: 'timed_out', completed_at: sql<Date>`now()`, updated_at: sql<Date>`now()` })
      .where('state', 'in', ['sent', 'begun', 'downloading', 'finished'])
      .where('updated_at', '<', cutoff)
      .returningAll()
      .execute();
    for (const a of rows) {
      await audit(
        trx,
        { type: 'system', id: null },
        {
          orgId: a.org_id,
          action: 'update.timed_out',
          resourceType: 'update_attempt',
          resourceId: a.id,
          details: { device_id: a.device_id, last_state_at: cutoff.toISOString() },
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
