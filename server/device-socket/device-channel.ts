import type { ChannelDefinition, Effect } from '../channels/types.ts';
import {
  applyUpdateReport,
  deviceDisconnected,
  deviceJoined,
  FleetError,
  Topics,
  UPDATE_REPORT_EVENTS,
  type FleetContext,
  type UpdateReportEvent,
} from '../fleet/index.ts';
import type { DeviceJoinParams } from '../../shared/protocol.ts';
import type { DeviceAssigns, DeviceSocketOptions, DeviceSocketStats } from './types.ts';
import { deviceErrorReply, UNKNOWN_EVENT } from './replies.ts';

/** Plain data kept per device channel. */
export interface DeviceSession {
  firmwareUuid: string;
  /** When the domain recorded this connection; disconnect is a no-op once a newer one exists. */
  connectedAt: string;
}

/** Events on `device_id:<id>` that are forwarded to the device as pushes. */
const FORWARDED = new Set(['firmware_update', 'join', 'leave', 'reboot', 'identify', 'request_logs']);

/**
 * `device:<firmware uuid>`: the identity comes from the certificate (socket assigns); the topic
 * only says which firmware the device runs.
 */
export function createDeviceChannel(
  ctx: FleetContext,
  stats: DeviceSocketStats,
  opts: Pick<DeviceSocketOptions, 'disconnect'>,
): ChannelDefinition<DeviceAssigns, DeviceSession> {
  return {
    async join(topic, params, { assigns }) {
      const firmwareUuid = topic.slice('device:'.length);
      try {
        const joined = await deviceJoined(ctx, assigns, firmwareUuid, joinParams(params));
        const effects: Effect[] = [{ type: 'subscribe', topic: Topics.device(assigns.deviceId) }];
        if (joined.update) effects.push({ type: 'push', event: 'firmware_update', payload: { ...joined.update } });
        return {
          status: 'ok',
          response: { groups: joined.groups },
          session: { firmwareUuid, connectedAt: joined.connectedAt },
          effects,
        };
      } catch (err) {
        if (err instanceof FleetError)
          return {
            status: 'error',
            response: { reason: err.message, details: { code: err.code, ...(err.details ?? {}) } },
          };
        throw err;
      }
    },

    async handleIn(event, payload, _session, { assigns }) {
      if (!isReport(event)) {
        stats.unknownEvents++;
        return { reply: UNKNOWN_EVENT };
      }
      try {
        const attempt = await applyUpdateReport(ctx, assigns, event, payload);
        return { reply: { status: 'ok', response: { state: attempt.state } } };
      } catch (err) {
        stats.rejectedReports++;
        return { reply: deviceErrorReply(err) };
      }
    },

    async handleInfo(message, _session, { assigns, socketId, log }) {
      if (DISCONNECTING.has(message.event) && !otherCertificate(message.payload, assigns)) {
        await opts.disconnect(socketId);
        return { effects: [{ type: 'stop', reason: message.event }] };
      }
      if (FORWARDED.has(message.event))
        return { effects: [{ type: 'push', event: message.event, payload: message.payload }] };
      log.debug({ event: message.event, device_id: assigns.deviceId }, 'device topic event not forwarded');
      return {};
    },

    async terminate(_reason, session, { assigns }) {
      await deviceDisconnected(ctx, assigns.deviceId, session.connectedAt);
    },
  };
}

/** Operator actions after which the device's live connection must end (its next connect is refused or recreated). */
const DISCONNECTING = new Set(['device_deleted', 'device_revoked', 'certificate_revoked']);

/** A certificate revocation of the device's other certificate leaves this connection alone. */
function otherCertificate(payload: Record<string, unknown>, assigns: DeviceAssigns): boolean {
  return typeof payload.certificate_id === 'string' && payload.certificate_id !== assigns.certificateId;
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
