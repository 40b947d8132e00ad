import type { ChannelDefinition, Effect } from '../channels/types.ts';
import {
  linkEvent,
  linkNotice,
  openLink,
  Topics,
  UPDATE_REPORT_EVENTS,
  validateReport,
  type FleetContext,
  type LinkRefusal,
  type LinkSession,
  type ReportKind,
  type UpdateReportEvent,
} from '../fleet/index.ts';
import type { DeviceJoinParams } from '../../shared/protocol.ts';
import type { DeviceAssigns, DeviceSocketStats } from './types.ts';
import { deviceErrorReply, UNKNOWN_EVENT } from './replies.ts';

/** Plain data kept per device channel. */
export interface DeviceSession {
  firmwareUuid: string;
  /** The device link's session (it knows when this connection was recorded). */
  link: LinkSession;
}

/** The device-link report each Phoenix report event is. */
const REPORT_KIND: Record<UpdateReportEvent, ReportKind> = {
  firmware_update_begin: 'begun',
  firmware_update_progress: 'progress',
  firmware_update_finish: 'finished',
  firmware_update_error: 'error',
};

/** Events on `device_id:<id>` that are forwarded to the device as pushes. */
const FORWARDED = new Set([
  'firmware_update',
  'update_cancelled',
  'join',
  'leave',
  'reboot',
  'identify',
  'request_logs',
]);

/**
 * `device:<firmware uuid>`: the identity comes from the certificate (socket assigns); the topic
 * only says which firmware the device runs.
 */
export function createDeviceChannel(
  ctx: FleetContext,
  stats: DeviceSocketStats,
): ChannelDefinition<DeviceAssigns, DeviceSession> {
  return {
    async join(topic, params, { assigns }) {
      const firmwareUuid = topic.slice('device:'.length);
      const link = openLink({ ...assigns, protocol: 'phoenix' });
      const joined = await linkEvent(ctx, link, {
        type: 'connected',
        running: { firmwareUuid, params: joinParams(params) },
      });
      if (!joined.ok) return { status: 'error', response: refusalResponse(joined.refusal) };
      const effects: Effect[] = [{ type: 'subscribe', topic: Topics.device(assigns.deviceId) }];
      for (const effect of joined.effects) {
        // A join can only ask for the update to push; the socket has no timers of the link's.
        if (effect.type === 'push_update')
          effects.push({ type: 'push', event: 'firmware_update', payload: { ...effect.payload } });
      }
      return {
        status: 'ok',
        response: { groups: joined.groups ?? [] },
        session: { firmwareUuid, link: joined.session },
        effects,
      };
    },

    async handleIn(event, payload, session) {
      if (!isReport(event)) {
        stats.unknownEvents++;
        return { reply: UNKNOWN_EVENT };
      }
      let report: ReturnType<typeof validateReport>;
      try {
        report = validateReport(event, payload);
      } catch (err) {
        stats.rejectedReports++;
        return { reply: deviceErrorReply(err) };
      }
      const result = await linkEvent(ctx, session.link, { type: 'report', kind: REPORT_KIND[event], ...report });
      if (!result.ok) {
        stats.rejectedReports++;
        return { reply: { status: 'error', response: refusalResponse(result.refusal) } };
      }
      return { reply: { status: 'ok', response: { state: result.attempt!.state } } };
    },

    async handleInfo(message, _session, { assigns, log }) {
      // Revocation, deletion, a newer connection: the link's close effect ends this socket (1008,
      // as the engine's other credential closes), here, with no further message.
      const [close] = linkNotice(message, {
        protocol: 'phoenix',
        certificateId: assigns.certificateId,
        node: ctx.nodeName,
      });
      if (close) return { effects: [{ type: 'close_socket', code: PHOENIX_CLOSE_CODE, reason: close.reason }] };
      if (FORWARDED.has(message.event))
        return { effects: [{ type: 'push', event: message.event, payload: message.payload }] };
      log.debug({ event: message.event, device_id: assigns.deviceId }, 'device topic event not forwarded');
      return {};
    },

    async terminate(reason, session) {
      // The link marks the device offline unless a newer connection has taken over.
      await linkEvent(ctx, session.link, { type: 'closed', reason: String(reason) });
    },
  };
}

/** The close code of a device socket its link closes (policy violation: reconnecting is refused or replaces). */
export const PHOENIX_CLOSE_CODE = 1008;

/** A refusal as the channel's error reply `{reason, details}`. */
function refusalResponse(refusal: LinkRefusal): { reason: string; details: Record<string, unknown> } {
  return { reason: refusal.message, details: { code: refusal.code, ...refusal.details } };
}

function isReport(event: string): event is UpdateReportEvent {
  return (UPDATE_REPORT_EVENTS as readonly string[]).includes(event);
}

function joinParams(params: Record<string, unknown>): DeviceJoinParams {
  const pick = (key: string) => (typeof params[key] === 'string' ? (params[key] as string) : undefined);
  const out: DeviceJoinParams = {};
  for (const key of ['version', 'platform', 'architecture', 'product'] as const) {
    const value = pick(key);
    if (value !== undefined) out[key] = value;
  }
  return out;
}
