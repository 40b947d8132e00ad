/**
 * keyauth actions (after 103, inside envelopes), mapped to the fleet:
 *   status       {version, component?}             → running version recorded, attempts settled
 *   check_update {component?, version?}            → {update: {version, url, sha256, size, expires_at} | null}
 *   report       {type: progress|error|success, version, component?, percent?, bytes?, total?, message?}
 *   heartbeat    {}                                → {server_time}
 * Responses: 200, 400 (bad input), 401 (revoked since), 404 (unknown action / no update in
 * flight), 500. Every request gets exactly one response.
 */
import semver from 'semver';
import type { FleetContext } from '../../fleet/context.ts';
import { linkEvent, runningVersion, updateToPush, type LinkEvent, type LinkSession } from '../../fleet/device-link.ts';
import { FleetError } from '../../fleet/errors.ts';
import { keyauthDownloadUrl } from './downloads.ts';

export interface Response {
  code: number;
  data?: Record<string, unknown>;
  error?: { msg: string; type: string };
  id?: unknown;
}

/** The client's device-link session (its `connectedAt` is the last presence this connection wrote), and its name. */
export interface ActionSession extends LinkSession {
  identifier: string;
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

/** One event on the client's link; the session follows it. A refusal throws (the response maps it). */
async function feed(deps: ActionDeps, session: ActionSession, event: LinkEvent) {
  const result = await linkEvent(deps.fleet, session, event);
  if (!result.ok) throw new FleetError(result.refusal.code, result.refusal.message, result.refusal.details);
  Object.assign(session, result.session);
  return result;
}

async function status(deps: ActionDeps, session: ActionSession, data: Record<string, unknown>): Promise<Response> {
  const outcome = await feed(deps, session, {
    type: 'connected',
    running: { version: version(data, true)!, component: component(data) },
  });
  return {
    code: 200,
    data: {
      device_id: session.identifier,
      version: outcome.running?.version,
      component: outcome.running?.component,
      update_available: updateToPush(outcome) !== undefined,
    },
  };
}

async function checkUpdate(deps: ActionDeps, session: ActionSession, data: Record<string, unknown>): Promise<Response> {
  const comp = component(data);
  const running = version(data, false) ?? (await runningVersion(deps.fleet, session, comp));
  if (!running) throw bad(`send status {version} first, or include data.version (the ${comp} version you run)`);
  const target = updateToPush(
    await feed(deps, session, { type: 'connected', running: { version: running, component: comp } }),
  );
  if (!target) return { code: 200, data: { update: null } };
  // The client fetched the offer: sent, unless it is underway already (polling again does not move it back).
  await feed(deps, session, { type: 'update_sent', firmware: target, via: VIA, poll: true });
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
  let event: LinkEvent;
  switch (data.type) {
    case 'progress':
      event = {
        type: 'report',
        kind: 'progress',
        component: comp,
        version: v,
        begins: true,
        ...(data.percent !== undefined
          ? {
              percent: Math.round(Number(data.percent)),
              bytes: data.bytes === undefined ? 0 : Number(data.bytes),
              total: data.total === undefined ? 0 : Number(data.total),
            }
          : {}),
      };
      break;
    case 'error': {
      const msg =
        typeof data.message === 'string' && data.message
          ? data.message.slice(0, 2000)
          : 'the client reported an update error';
      event = { type: 'report', kind: 'error', component: comp, version: v, errors: [msg] };
      break;
    }
    case 'success':
      // The client runs the new version: the link settles the attempt succeeded.
      event = { type: 'boot_confirmed', component: comp, version: v };
      break;
    default:
      throw bad('data.type must be progress, error or success');
  }
  try {
    const result = await feed(deps, session, event);
    return { code: 200, data: { state: result.attempt?.state ?? null } };
  } catch (err) {
    if (err instanceof FleetError && err.code === 'not_found' && data.type === 'progress')
      throw new ActionError(
        404,
        'NotFound',
        `no update of ${comp} to ${v} is in flight for this client; use the version check_update offered`,
      );
    throw err;
  }
}

async function heartbeat(deps: ActionDeps, session: ActionSession): Promise<Response> {
  try {
    await feed(deps, session, { type: 'connected', running: {} });
  } catch (err) {
    if (err instanceof FleetError && (err.code === 'forbidden' || err.code === 'not_found'))
      throw new ActionError(401, 'NotAuthorised', 'this client key is no longer approved');
    throw err;
  }
  return { code: 200, data: { server_time: session.connectedAt } };
}
