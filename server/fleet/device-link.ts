/**
 * The device link: the only code that moves update attempts and device connection state, for
 * every protocol (Phoenix device socket, GRiSP, WiFiDogX, Main Server, keyauth). A protocol
 * translates its frames into the neutral events below and calls `linkEvent`; the link writes the
 * database (one transaction per event, published after the commit), decides each move with the
 * one transition table (link-table.ts) and answers with typed effects the protocol turns back
 * into frames. A move the table does not hold is refused with a typed result (logged), never
 * thrown at a device. The session is small plain JSON the connection keeps.
 */
import type { Device, DeviceProtocol, Firmware, UpdateAttempt, UpdateState } from '../db/schema.ts';
import type { DeviceJoinParams, FirmwareUpdatePayload } from '../../shared/protocol.ts';
import type { Logger } from '../log.ts';
import { sql } from 'kysely';
import { publishAll, Topics, type FleetContext } from './context.ts';
import { deviceDisconnected, deviceJoined } from './connections.ts';
import { edgeDeviceOnline, markEdgeDeviceConnected, recordUpdateSent, type EdgeOnlineOutcome } from './edge-devices.ts';
import { FleetError, type FleetErrorCode } from './errors.ts';
import { OPEN_STATES, TRANSITIONS, type AttemptEvent } from './link-table.ts';
import {
  applyUpdateReport,
  deviceActor,
  firmwareUpdatePayload,
  moveAttempt,
  type UpdateReportEvent,
} from './updates.ts';
import { audit } from '../audit.ts';
import { abortedDeploymentOf } from './deployments/model.ts';

export { OPEN_STATES, FINAL_STATES, TRANSITIONS, isAllowedTransition, type AttemptEvent } from './link-table.ts';

/** Who a link speaks for: set once the protocol has authenticated the device. Plain JSON. */
export interface LinkSession {
  deviceId: string;
  orgId: string;
  protocol: DeviceProtocol;
  /** Phoenix: the certificate that authenticated the connection (a connect is refused once it is revoked). */
  certificateId?: string;
  productId?: string;
  /** When the link recorded this connection; `closed` is a no-op once a newer connection exists. */
  connectedAt?: string;
}

/** What the device says it runs when it connects (or reports in again). */
export interface RunningReport {
  /** The component (default `firmware`). */
  component?: string;
  /** The version it runs (null: the device reports none); undefined: not known yet (presence only). */
  version?: string | null;
  /** Phoenix: the firmware uuid of `device:<uuid>`, and the join params describing it. */
  firmwareUuid?: string;
  params?: DeviceJoinParams;
  platform?: string | null;
  architecture?: string | null;
  /**
   * false: the new image runs but is not committed yet (GRiSP before `validate`): record the
   * version and presence, leave in-flight attempts alone. Default true.
   */
  settle?: boolean;
}

export type ReportKind = 'begun' | 'progress' | 'finished' | 'error' | 'declined' | 'rolled_back';

/** A report on the device's open attempt for `version` (or `firmwareId`, or its newest). */
export interface LinkReport {
  type: 'report';
  kind: ReportKind;
  component?: string;
  version?: string;
  firmwareId?: string;
  percent?: number;
  bytes?: number;
  total?: number;
  errors?: string[];
  /** Why, for the audit record (errors say what the device said). */
  reason?: string;
  /**
   * The protocol has no begin message: a `progress` (or `finished`) on an update not begun yet
   * begins it first. A `progress` without `percent` then only begins it (or, begun, changes nothing).
   */
  begins?: boolean;
}

/** The neutral events every protocol feeds the link. */
export type LinkEvent =
  | { type: 'connected'; running: RunningReport }
  | {
      type: 'update_sent';
      firmware: Firmware;
      via: string;
      poll?: boolean;
      /**
       * How long the protocol waits for the device to take the update up (its answer, or a first
       * report): the link answers `schedule_timer` for `UPDATE_TIMER`, and any report cancels it.
       */
      awaitMs?: number;
    }
  | LinkReport
  | { type: 'boot_confirmed'; component?: string; version: string | null }
  | { type: 'timed_out'; component?: string; firmwareId?: string; reason: string }
  | { type: 'closed'; reason: string };

/** What the link asks the protocol to do. A closed union: protocols switch over it exhaustively. */
export type LinkEffect =
  | { type: 'push_update'; firmware: Firmware; attempt: UpdateAttempt; payload: FirmwareUpdatePayload }
  | { type: 'cancel_update'; attempt: UpdateAttempt }
  | { type: 'send_command'; command: string; payload: Record<string, unknown> }
  | { type: 'schedule_timer'; key: string; ms: number }
  | { type: 'cancel_timer'; key: string }
  | LinkClose;

/**
 * Close the connection, with why: `revoked` (the device or this connection's certificate was
 * revoked, or the device deleted), `replaced` (a newer connection of the device took over), or
 * `done` (anything else). Each protocol closes with its own code for each cause.
 */
export interface LinkClose {
  type: 'close';
  reason: string;
  cause: 'revoked' | 'replaced' | 'done';
}

export interface LinkRefusal {
  code: FleetErrorCode;
  message: string;
  details: Record<string, unknown>;
}

export type LinkResult =
  | {
      ok: true;
      session: LinkSession;
      effects: LinkEffect[];
      /** The attempt the event moved (reports, update_sent) or the newest for the version (boot_confirmed). */
      attempt?: UpdateAttempt;
      /** connected: the device as recorded, what it runs, and (Phoenix) its group topics. */
      device?: Device;
      running?: { id: string | null; component: string; version: string | null };
      groups?: string[];
    }
  | { ok: false; session: LinkSession; effects: []; refusal: LinkRefusal };

/** A session for a device the protocol has authenticated. */
export function openLink(
  identity: Pick<LinkSession, 'deviceId' | 'orgId' | 'protocol'> & Partial<LinkSession>,
): LinkSession {
  return { ...identity };
}

/**
 * Feeds one event to the device's link. Resolves to the new session and the effects to carry
 * out, or to a refusal (FleetError codes: invalid, not_found, conflict, forbidden) which the
 * protocol turns into its own error. Anything else (the database failing) rejects.
 */
export async function linkEvent(ctx: FleetContext, session: LinkSession, event: LinkEvent): Promise<LinkResult> {
  try {
    return await handle(ctx, session, event);
  } catch (caught) {
    if (!(caught instanceof FleetError)) throw caught;
    const err = event.type === 'report' ? await lateReport(ctx, session, event, caught) : caught;
    ctx.log.info(
      {
        device_id: session.deviceId,
        protocol: session.protocol,
        event: event.type,
        code: err.code,
        reason: err.message,
      },
      'device link refused an event',
    );
    return {
      ok: false,
      session,
      effects: [],
      refusal: { code: err.code, message: err.message, details: err.details ?? {} },
    };
  }
}

/**
 * A report refused for want of an open attempt may be late for an aborted deployment: it is
 * recorded (audit `deployment.late_report`), never counted, and refused saying so.
 */
async function lateReport(
  ctx: FleetContext,
  session: LinkSession,
  r: LinkReport,
  err: FleetError,
): Promise<FleetError> {
  if (err.code !== 'not_found') return err;
  const aborted = await abortedDeploymentOf(ctx.db, session.deviceId, {
    component: r.component ?? 'firmware',
    ...(r.version !== undefined ? { version: r.version } : {}),
  });
  if (!aborted) return err;
  await audit(ctx.db, deviceActor(session), {
    orgId: session.orgId,
    action: 'deployment.late_report',
    resourceType: 'deployment',
    resourceId: aborted.id,
    details: { device_id: session.deviceId, attempt_id: aborted.attempt_id, kind: r.kind, version: r.version ?? null },
  });
  return new FleetError('conflict', `deployment ${aborted.id} was aborted; this update was cancelled`, {
    deployment_id: aborted.id,
    attempt_id: aborted.attempt_id,
  });
}

/** `linkEvent` for callers whose protocol reports refusals as exceptions (HTTP edges): throws the FleetError. */
export async function linkEventOrThrow(
  ctx: FleetContext,
  session: LinkSession,
  event: LinkEvent,
): Promise<Extract<LinkResult, { ok: true }>> {
  const result = await linkEvent(ctx, session, event);
  if (!result.ok) throw new FleetError(result.refusal.code, result.refusal.message, result.refusal.details);
  return result;
}

type Accepted = Extract<LinkResult, { ok: true }>;

/**
 * One connection's link, for protocols that keep a connection object: feeds events in the
 * order they are given, keeps the session, and logs a refusal as the device's problem (warn).
 */
export class DeviceLink {
  session: LinkSession;
  readonly #ctx: FleetContext;
  readonly #log: Logger;

  constructor(ctx: FleetContext, session: LinkSession, log: Logger) {
    this.#ctx = ctx;
    this.session = session;
    this.#log = log;
  }

  /** The accepted result, or undefined when the link refused the event (logged). */
  async feed(event: LinkEvent): Promise<Accepted | undefined> {
    const result = await linkEvent(this.#ctx, this.session, event);
    if (!result.ok) {
      const { code, message } = result.refusal;
      this.#log.warn({ event: event.type, code, reason: message }, 'the fleet refused what the device reported');
      return undefined;
    }
    this.session = result.session;
    return result;
  }
}

/** The firmware a result's effects ask the protocol to push, if any (protocols that only start updates). */
export function updateToPush(result: { effects: readonly LinkEffect[] } | undefined): Firmware | undefined {
  for (const effect of result?.effects ?? []) {
    switch (effect.type) {
      case 'push_update':
        return effect.firmware;
      case 'cancel_update':
      case 'send_command':
      case 'schedule_timer':
      case 'cancel_timer':
      case 'close':
        break;
      default:
        assertNever(effect);
    }
  }
  return undefined;
}

/** The timer key of the in-flight update (protocols that keep a per-connection timer use it). */
export const UPDATE_TIMER = 'update';

/** What a connection is, for the notices on its device's topic: its protocol and certificate. */
export interface NoticedConnection {
  protocol?: DeviceProtocol;
  /** The certificate that authenticated it: a revocation of the device's other certificates leaves it. */
  certificateId?: string;
  /** The node it runs on: a takeover announced by this node was carried out here already. */
  node?: string;
}

/**
 * A new Phoenix connection of the device: one message, on the device's own topic, when the device
 * is recorded online on another node (`recordedOn`, read when the connection authenticated), which
 * closes the connection it replaces there (`linkNotice`). Nothing is published otherwise: the
 * caller closes this node's older connections itself. Returns whether it published.
 */
export async function replaceConnection(
  ctx: FleetContext,
  deviceId: string,
  recordedOn: string | null | undefined,
): Promise<boolean> {
  if (!recordedOn || recordedOn === ctx.nodeName) return false;
  await publishAll(ctx, [
    {
      topic: Topics.device(deviceId),
      event: CONNECTION_REPLACED,
      payload: { device_id: deviceId, node: ctx.nodeName, protocol: 'phoenix' },
    },
  ]);
  return true;
}

/** Events on `device_id:<id>` that end the device's connections. */
const REVOKING = new Set(['device_revoked', 'device_deleted', 'certificate_revoked']);

/** A newer Phoenix connection took over the device on `node` (published only to where the device was online). */
export const CONNECTION_REPLACED = 'connection_replaced';

/**
 * The link's answer to a message on the device's topic (`device_id:<id>`), for one connection:
 * `close` when the message ends it (revocation, deletion, a newer connection), otherwise nothing.
 * Pure: every subscriber (the Phoenix device channel, the edge runtime, the device listener for
 * connections not joined yet) asks it, so that one publication closes every connection.
 */
export function linkNotice(message: DeviceTopicMessage, c: NoticedConnection): LinkClose[] {
  const revoked = revocationOf(message);
  if (revoked) {
    // A revoked certificate ends only the connections it authenticated.
    if (revoked.certificateId !== undefined && revoked.certificateId !== c.certificateId) return [];
    return [{ type: 'close', reason: message.event, cause: 'revoked' }];
  }
  const { event, payload } = message;
  if (event === CONNECTION_REPLACED && c.protocol === payload.protocol && c.node !== payload.node)
    return [{ type: 'close', reason: 'replaced by a newer connection of this device', cause: 'replaced' }];
  return [];
}

export interface DeviceTopicMessage {
  event: string;
  payload: Record<string, unknown>;
}

/**
 * Whether a message on the device's topic revokes its connections: all of them (`{}`), or those
 * one certificate authenticated (`{certificateId}`); undefined when it revokes nothing.
 */
export function revocationOf(message: DeviceTopicMessage): { certificateId?: string } | undefined {
  if (!REVOKING.has(message.event)) return undefined;
  if (message.event !== 'certificate_revoked') return {};
  const certificateId = message.payload.certificate_id;
  // A certificate revocation without its id would end nothing it could name: end everything.
  return typeof certificateId === 'string' ? { certificateId } : {};
}

async function handle(ctx: FleetContext, session: LinkSession, event: LinkEvent): Promise<LinkResult> {
  switch (event.type) {
    case 'connected':
      return connected(ctx, session, event.running);
    case 'update_sent': {
      const sent = await updateSent(ctx, session, event.firmware, event.via, event.poll === true);
      if (!sent.ok || event.awaitMs === undefined) return sent;
      return { ...sent, effects: [...sent.effects, { type: 'schedule_timer', key: UPDATE_TIMER, ms: event.awaitMs }] };
    }
    case 'report': {
      // The device took the update up (or ended it): nothing is awaited any more.
      const reported = await report(ctx, session, event);
      return reported.ok
        ? { ...reported, effects: [...reported.effects, { type: 'cancel_timer', key: UPDATE_TIMER }] }
        : reported;
    }
    case 'boot_confirmed':
      return bootConfirmed(ctx, session, event.component ?? 'firmware', event.version);
    case 'timed_out': {
      const attempt = await moveAttempt(
        ctx,
        session,
        'time_out',
        { component: event.component ?? 'firmware', ...(event.firmwareId ? { firmwareId: event.firmwareId } : {}) },
        { reason: event.reason, errors: [event.reason] },
      );
      return { ok: true, session, effects: [{ type: 'cancel_timer', key: UPDATE_TIMER }], attempt };
    }
    case 'closed':
      await deviceDisconnected(ctx, session.deviceId, session.connectedAt, event.reason);
      return { ok: true, session, effects: [{ type: 'cancel_timer', key: UPDATE_TIMER }] };
    default:
      return assertNever(event);
  }
}

async function connected(ctx: FleetContext, session: LinkSession, running: RunningReport): Promise<LinkResult> {
  if (session.protocol === 'phoenix') {
    const joined = await deviceJoined(
      ctx,
      {
        deviceId: session.deviceId,
        orgId: session.orgId,
        productId: session.productId ?? '',
        ...(session.certificateId ? { certificateId: session.certificateId } : {}),
      },
      running.firmwareUuid ?? '',
      running.params ?? {},
    );
    const next = { ...session, connectedAt: joined.connectedAt };
    const effects: LinkEffect[] = [];
    if (joined.update && joined.attempt && joined.target)
      effects.push({ type: 'push_update', firmware: joined.target, attempt: joined.attempt, payload: joined.update });
    return {
      ok: true,
      session: next,
      effects,
      groups: joined.groups,
      running: { id: joined.firmware.id, component: 'firmware', version: joined.firmware.version },
    };
  }
  if (running.version === undefined) {
    const connectedAt = await markEdgeDeviceConnected(ctx, session);
    return { ok: true, session: { ...session, connectedAt }, effects: [] };
  }
  const online = await edgeDeviceOnline(ctx, session, {
    version: running.version,
    ...(running.component ? { component: running.component } : {}),
    ...(running.platform !== undefined ? { platform: running.platform } : {}),
    ...(running.architecture !== undefined ? { architecture: running.architecture } : {}),
    ...(running.settle === false ? { settle: false } : {}),
  });
  return onlineResult(ctx, session, online, online.attempt);
}

/** The answer to an edge device recorded online: the update to push when it does not run its target. */
function onlineResult(
  ctx: FleetContext,
  session: LinkSession,
  online: EdgeOnlineOutcome,
  attempt: UpdateAttempt | undefined,
): LinkResult {
  const effects: LinkEffect[] = [];
  if (online.target && online.attempt)
    effects.push({
      type: 'push_update',
      firmware: online.target,
      attempt: online.attempt,
      payload: firmwareUpdatePayload(ctx, online.target),
    });
  return {
    ok: true,
    session: { ...session, connectedAt: online.connectedAt },
    effects,
    device: online.device,
    running: online.running,
    ...(attempt ? { attempt } : {}),
  };
}

/** Underway states a poll leaves where they are (polling again must not move an update back to `sent`). */
const UNDERWAY: readonly UpdateState[] = ['sent', 'begun', 'downloading', 'finished'];

async function updateSent(
  ctx: FleetContext,
  session: LinkSession,
  firmware: Firmware,
  via: string,
  poll: boolean,
): Promise<LinkResult> {
  if (poll) {
    const open = await openAttemptFor(ctx, session.deviceId, firmware.id);
    if (open && UNDERWAY.includes(open.state)) return { ok: true, session, effects: [], attempt: open };
  }
  const attempt = await recordUpdateSent(ctx, session, firmware, via);
  return { ok: true, session, effects: [], attempt };
}

/** The table event each report kind is. */
const REPORT_STEP: Record<ReportKind, AttemptEvent> = {
  begun: 'begin',
  progress: 'progress',
  finished: 'finish',
  error: 'fail',
  declined: 'decline',
  rolled_back: 'roll_back',
};

/** The Phoenix report each kind shares its validation and batching with. */
const PHOENIX_REPORT: Partial<Record<ReportKind, UpdateReportEvent>> = {
  begun: 'firmware_update_begin',
  progress: 'firmware_update_progress',
  finished: 'firmware_update_finish',
  error: 'firmware_update_error',
};

async function report(ctx: FleetContext, session: LinkSession, r: LinkReport): Promise<LinkResult> {
  const component = r.component ?? 'firmware';
  const select = {
    component,
    ...(r.version !== undefined ? { version: r.version } : {}),
    ...(r.firmwareId !== undefined ? { firmwareId: r.firmwareId } : {}),
  };
  if (r.begins && (r.kind === 'progress' || r.kind === 'finished')) {
    const open = await newestOpenAttempt(ctx, session.deviceId, select);
    const begun =
      open && TRANSITIONS.begin.from.includes(open.state)
        ? await moveAttempt(ctx, session, 'begin', select)
        : undefined;
    // A progress report without a figure only says the update is underway.
    if (r.kind === 'progress' && r.percent === undefined) {
      const attempt = begun ?? open;
      if (!attempt) throw new FleetError('not_found', 'no update to this version is in progress for this device', {});
      return { ok: true, session, effects: [], attempt };
    }
  }
  const phoenix = PHOENIX_REPORT[r.kind];
  let attempt: UpdateAttempt;
  if (phoenix && r.version !== undefined && r.firmwareId === undefined && !r.reason) {
    attempt = await applyUpdateReport(
      ctx,
      session,
      phoenix,
      {
        version: r.version,
        ...(r.kind === 'progress' ? { percent: r.percent ?? 0, bytes: r.bytes ?? 0, total: r.total ?? 0 } : {}),
        ...(r.errors ? { errors: r.errors } : {}),
      },
      component,
    );
  } else {
    attempt = await moveAttempt(ctx, session, REPORT_STEP[r.kind], select, {
      ...(r.percent !== undefined ? { percent: r.percent } : {}),
      ...(r.errors ? { errors: r.errors.map(boundedError) } : {}),
      ...(r.reason ? { reason: r.reason } : {}),
    });
  }
  return { ok: true, session, effects: [], attempt };
}

async function bootConfirmed(
  ctx: FleetContext,
  session: LinkSession,
  component: string,
  version: string | null,
): Promise<LinkResult> {
  const online = await edgeDeviceOnline(ctx, session, { version, component });
  const last =
    version === null
      ? undefined
      : await ctx.db
          .selectFrom('update_attempts')
          .selectAll()
          .where('device_id', '=', session.deviceId)
          .where('component', '=', component)
          .where('to_version', '=', version)
          .orderBy('updated_at', 'desc')
          .executeTakeFirst();
  return onlineResult(ctx, session, online, last);
}

async function openAttemptFor(ctx: FleetContext, deviceId: string, firmwareId: string) {
  return newestOpenAttempt(ctx, deviceId, { firmwareId });
}

async function newestOpenAttempt(
  ctx: FleetContext,
  deviceId: string,
  select: { component?: string; version?: string; firmwareId?: string },
): Promise<UpdateAttempt | undefined> {
  let query = ctx.db
    .selectFrom('update_attempts')
    .selectAll()
    .where('device_id', '=', deviceId)
    .where('state', 'in', OPEN_STATES);
  if (select.component !== undefined) query = query.where('component', '=', select.component);
  if (select.version !== undefined) query = query.where('to_version', '=', select.version);
  if (select.firmwareId !== undefined) query = query.where('firmware_id', '=', select.firmwareId);
  return query.orderBy('created_at', 'desc').limit(1).executeTakeFirst();
}

/** An error text a device sent, stored bounded (2000 characters). */
function boundedError(text: string): string {
  return text.length > 2000 ? `${text.slice(0, 1999)}…` : text;
}

function assertNever(x: never): never {
  throw new Error(`unhandled device-link event ${JSON.stringify(x)}`);
}

/**
 * The device's newest open update of `component`: its attempt and the firmware it installs. For
 * protocols whose update events do not name the version (GRiSP, WiFiDogX) and health checks.
 */
export async function currentUpdate(
  ctx: FleetContext,
  session: LinkSession,
  component = 'firmware',
): Promise<{ attempt: UpdateAttempt; firmware: Firmware } | undefined> {
  const attempt = await newestOpenAttempt(ctx, session.deviceId, { component });
  if (!attempt) return undefined;
  const firmware = await ctx.db
    .selectFrom('firmware')
    .selectAll()
    .where('id', '=', attempt.firmware_id)
    .executeTakeFirstOrThrow();
  return { attempt, firmware };
}

/** The version of `component` the device last reported running (null when it never did). */
export async function runningVersion(
  ctx: FleetContext,
  session: LinkSession,
  component = 'firmware',
): Promise<string | null> {
  const row = await ctx.db
    .selectFrom('device_components')
    .select('version')
    .where('device_id', '=', session.deviceId)
    .where('component', '=', component)
    .executeTakeFirst();
  return row?.version ?? null;
}

/**
 * Marks devices of `protocol` offline whose last word is older than `offlineAfterMs`: the
 * presence sweep of protocols without a connection to lose (Main Server heartbeats). Idempotent,
 * database time: safe on every node. Returns how many went offline.
 */
export async function sweepSilentDevices(
  ctx: FleetContext,
  protocol: DeviceProtocol,
  offlineAfterMs: number,
): Promise<number> {
  const rows = await ctx.db
    .updateTable('devices')
    .set({ connection_status: 'offline', connected_node: null, updated_at: sql<Date>`now()` })
    .where('protocol', '=', protocol)
    .where('connection_status', '=', 'online')
    .where(sql<boolean>`last_seen_at < now() - make_interval(secs => ${offlineAfterMs / 1000})`)
    .returning(['id', 'org_id'])
    .execute();
  await publishAll(
    ctx,
    rows.map((r) => ({
      topic: Topics.operator(r.org_id),
      event: 'device_status',
      payload: { device_id: r.id, status: 'offline', protocol },
    })),
  );
  return rows.length;
}
