/**
 * Seed 003 actions (after 103, inside envelopes), mapped to the fleet:
 *   status       {version, component?}             → running version recorded, attempts settled
 *   check_update {component?, version?}            → {update: {version, url, sha256, size, expires_at} | null}
 *   report       {type: progress|error|success, version, component?, percent?, bytes?, total?, message?}
 *   heartbeat    {}                                → {server_time}
 * Responses: 200, 400 (bad input), 401 (revoked since), 404 (unknown action / no update in
 * flight), 500. Every request gets exactly one response.
 */
import semver from 'semver';
import type { FleetContext } from '../../fleet/context.ts';
import { edgeDeviceOnline, recordUpdateSent } from '../../fleet/edge-devices.ts';
import { applyUpdateReport, OPEN_STATES } from '../../fleet/updates.ts';
import { keyauthDownloadUrl } from './downloads.ts';

export interface Response {
  code: number;
  data?: Record<string, unknown>;
  error?: { msg: string; type: string };
  id?: unknown;
}

export interface ActionSession {
  deviceId: string;
  orgId: string;
  identifier: string;
  /** The last `last_seen_at` this connection wrote (for the offline check on close). */
  connectedAt: string;
}

export interface ActionDeps {
  fleet: FleetContext;
  secret: string;
  /** Base URL of the API listener, where downloads are served. */
  downloadBaseUrl: () => string;
  urlTtlSeconds: number;
}

export const VIA = 'edge:keyauth';

export function errorResponse(code: number, type: string, msg: string): Response {
  return { code, error: { msg, type } };
}

class ActionError extends Error {
  constructor(
    readonly code: number,
    readonly type: string,
    message: string,
  ) {
    super(message);
  }
}

const bad = (msg: string) => new ActionError(400, 'InvalidRequest', msg);

function component(data: Record<string, unknown>): string {
  const c = data.component ?? 'firmware';
  if (typeof c !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(c))
    throw bad("data.component must be a name (letters, digits, '_', '.', '-')");
  return c;
}

function version(data: Record<string, unknown>, required: boolean): string | undefined {
  const v = data.version;
  if (v === undefined && !required) return undefined;
  if (typeof v !== 'string' || semver.valid(v) === null)
    throw bad('data.version must be a semantic version such as 1.2.0');
  return v;
}

/** Runs one decrypted request. Never throws: failures become error responses. */
export async function runAction(deps: ActionDeps, session: ActionSession, request: unknown): Promise<Response> {
  const req = (typeof request === 'object' && request !== null && !Array.isArray(request) ? request : {}) as Record<
    string,
    unknown
  >;
  const withId = (r: Response): Response => (req.id !== undefined ? { ...r, id: req.id } : r);
  try {
    const data = req.data === undefined ? {} : req.data;
    if (typeof data !== 'object' || data === null || Array.isArray(data)) throw bad('data must be an object');
    const d = data as Record<string, unknown>;
    switch (req.action) {
      case 'status':
        return withId(await status(deps, session, d));
      case 'check_update':
        return withId(await checkUpdate(deps, session, d));
      case 'report':
        return withId(await report(deps, session, d));
      case 'heartbeat':
        return withId(await heartbeat(deps, session));
      default:
        return withId(
          errorResponse(
            404,
            'UnknownAction',
            `unknown action ${JSON.stringify(req.action ?? null)}; use status, check_update, report or heartbeat`,
          ),
        );
    }
  } catch (err) {
    return withId(toResponse(deps, err));
  }
}

function toResponse(deps: ActionDeps, err: unknown): Response {
  if (err instanceof ActionError) return errorResponse(err.code, err.type, err.message);
  const e = err as { name?: string; code?: string; message?: string };
  if (e?.name === 'FleetError') {
    const map: Record<string, [number, string]> = {
      invalid: [400, 'InvalidRequest'],
      not_found: [404, 'NotFound'],
      forbidden: [401, 'NotAuthorised'],
      conflict: [400, 'Conflict'],
    };
    const [code, type] = map[e.code ?? ''] ?? [500, 'ServerError'];
    return errorResponse(code, type, e.message ?? type);
  }
  deps.fleet.log.error({ err }, 'keyauth action failed');
  return errorResponse(500, 'ServerError', 'the server failed to handle the request; try again later');
}

async function status(deps: ActionDeps, session: ActionSession, data: Record<string, unknown>): Promise<Response> {
  const outcome = await edgeDeviceOnline(deps.fleet, session, {
    version: version(data, true)!,
    component: component(data),
  });
  session.connectedAt = outcome.connectedAt;
  return {
    code: 200,
    data: {
      device_id: session.identifier,
      version: outcome.running.version,
      component: outcome.running.component,
      update_available: outcome.target !== undefined,
    },
  };
}

async function checkUpdate(deps: ActionDeps, session: ActionSession, data: Record<string, unknown>): Promise<Response> {
  const comp = component(data);
  let running = version(data, false);
  if (!running) {
    const row = await deps.fleet.db
      .selectFrom('device_components')
      .select('version')
      .where('device_id', '=', session.deviceId)
      .where('component', '=', comp)
      .executeTakeFirst();
    if (!row?.version) throw bad(`send status {version} first, or include data.version (the ${comp} version you run)`);
    running = row.version;
  }
  const outcome = await edgeDeviceOnline(deps.fleet, session, { version: running, component: comp });
  session.connectedAt = outcome.connectedAt;
  const target = outcome.target;
  if (!target || !outcome.attempt) return { code: 200, data: { update: null } };
  // Polling again must not move an update that is underway back to `sent`.
  if (outcome.attempt.state === 'queued') await recordUpdateSent(deps.fleet, session, target, VIA);
  const { url, expiresAt } = keyauthDownloadUrl({
    baseUrl: deps.downloadBaseUrl(),
    secret: deps.secret,
    firmwareId: target.id,
    deviceId: session.deviceId,
    ttlSeconds: deps.urlTtlSeconds,
  });
  return {
    code: 200,
    data: {
      update: {
        component: target.component,
        version: target.version,
        url,
        sha256: target.sha256,
        size: target.size === null ? null : Number(target.size),
        format: target.format,
        expires_at: expiresAt.toISOString(),
      },
    },
  };
}

async function report(deps: ActionDeps, session: ActionSession, data: Record<string, unknown>): Promise<Response> {
  const comp = component(data);
  const v = version(data, true)!;
  switch (data.type) {
    case 'progress': {
      const attempt = await deps.fleet.db
        .selectFrom('update_attempts')
        .select('state')
        .where('device_id', '=', session.deviceId)
        .where('component', '=', comp)
        .where('to_version', '=', v)
        .where('state', 'in', OPEN_STATES)
        .orderBy('created_at', 'desc')
        .executeTakeFirst();
      if (!attempt)
        throw new ActionError(
          404,
          'NotFound',
          `no update of ${comp} to ${v} is in flight for this client; use the version check_update offered`,
        );
      let state: string = attempt.state;
      if (state === 'queued' || state === 'sent')
        state = (await applyUpdateReport(deps.fleet, session, 'firmware_update_begin', { version: v }, comp)).state;
      if (data.percent !== undefined) {
        const percent = Number(data.percent);
        const total = data.total === undefined ? 0 : Number(data.total);
        const bytes = data.bytes === undefined ? 0 : Number(data.bytes);
        state = (
          await applyUpdateReport(
            deps.fleet,
            session,
            'firmware_update_progress',
            { version: v, percent: Math.round(percent), bytes, total },
            comp,
          )
        ).state;
      }
      return { code: 200, data: { state } };
    }
    case 'error': {
      const msg =
        typeof data.message === 'string' && data.message
          ? data.message.slice(0, 2000)
          : 'the client reported an update error';
      const attempt = await applyUpdateReport(
        deps.fleet,
        session,
        'firmware_update_error',
        { version: v, errors: [msg] },
        comp,
      );
      return { code: 200, data: { state: attempt.state } };
    }
    case 'success': {
      // The client runs the new version: settling marks the attempt succeeded.
      const outcome = await edgeDeviceOnline(deps.fleet, session, { version: v, component: comp });
      session.connectedAt = outcome.connectedAt;
      const last = await deps.fleet.db
        .selectFrom('update_attempts')
        .select('state')
        .where('device_id', '=', session.deviceId)
        .where('component', '=', comp)
        .where('to_version', '=', v)
        .orderBy('updated_at', 'desc')
        .executeTakeFirst();
      return { code: 200, data: { state: last?.state ?? null } };
    }
    default:
      throw bad('data.type must be progress, error or success');
  }
}

async function heartbeat(deps: ActionDeps, session: ActionSession): Promise<Response> {
  const now = new Date();
  const row = await deps.fleet.db
    .updateTable('devices')
    .set({ connection_status: 'online', connected_node: deps.fleet.nodeName, last_seen_at: now, updated_at: now })
    .where('id', '=', session.deviceId)
    .where('approval', '=', 'approved')
    .returning('id')
    .executeTakeFirst();
  if (!row) throw new ActionError(401, 'NotAuthorised', 'this client key is no longer approved');
  session.connectedAt = now.toISOString();
  return { code: 200, data: { server_time: now.toISOString() } };
}
