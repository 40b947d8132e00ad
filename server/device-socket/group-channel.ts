import type { ChannelDefinition } from '../channels/types.ts';
import { isGroupMember, NAME_PATTERN, Topics, type FleetContext } from '../fleet/index.ts';
import type { DeviceAssigns, DeviceSocketStats } from './types.ts';
import { UNKNOWN_EVENT } from './replies.ts';

export type GroupSession = Record<string, never>;

const UNAUTHORIZED = { reason: 'unauthorized' } as const;

/**
 * `group:<org>:<product>:<group>`: joined only by devices the database lists as members of
 * exactly that group. Carries the group-wide `firmware_update` untouched (fastlane, one encode);
 * stops on `group_deleted`, and when the device is removed from the group.
 */
export function createGroupChannel(
  ctx: FleetContext,
  stats: DeviceSocketStats,
): ChannelDefinition<DeviceAssigns, GroupSession> {
  return {
    intercept: ['group_deleted'],

    async join(topic, _params, { assigns }) {
      const names = parseGroupTopic(topic);
      if (!names || !(await isGroupMember(ctx.db, assigns.deviceId, names, assigns.certificateId)))
        return { status: 'error', response: UNAUTHORIZED };
      // Removal from the group arrives on the device's own topic as `leave {channel}`.
      return {
        status: 'ok',
        response: {},
        session: {},
        effects: [{ type: 'subscribe', topic: Topics.device(assigns.deviceId) }],
      };
    },

    async handleIn() {
      stats.unknownEvents++;
      return { reply: UNKNOWN_EVENT };
    },

    async handleInfo(message, _session, { topic }) {
      if (message.event === 'leave' && message.payload.channel === topic)
        return { effects: [{ type: 'stop', reason: 'removed from group' }] };
      return {};
    },

    async handleOut(message) {
      if (message.event === 'group_deleted') return { effects: [{ type: 'stop', reason: 'group deleted' }] };
      return { effects: [{ type: 'push', event: message.event, payload: message.payload }] };
    },
  };
}

function parseGroupTopic(topic: string): { org: string; product: string; group: string } | undefined {
  const parts = topic.split(':');
  if (parts.length !== 4 || parts[0] !== 'group') return undefined;
  const [, org, product, group] = parts as [string, string, string, string];
  if (![org, product, group].every((n) => NAME_PATTERN.test(n))) return undefined;
  return { org, product, group };
}
