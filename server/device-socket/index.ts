/**
 * The Phoenix socket devices connect to over mutual TLS (the Phoenix device protocol): identity from the client
 * certificate only, then the `device:*` and `group:*` channels. Thin: every callback calls the
 * fleet domain and turns its result into a reply and effects.
 */
import { claimCertificateDevice } from '../fleet/edge-devices.ts';
import { replaceConnection, type FleetContext } from '../fleet/index.ts';
import { createDeviceChannel } from './device-channel.ts';
import { createGroupChannel } from './group-channel.ts';
import type { DeviceAssigns, DeviceSocket, DeviceSocketOptions, DeviceSocketStats } from './types.ts';

export type { DeviceAssigns, DeviceSocket, DeviceSocketOptions, DeviceSocketStats } from './types.ts';

/** The socket id of a device's connection: one per device, across nodes. */
export function deviceSocketId(deviceId: string): string {
  return `device_socket:${deviceId}`;
}

/** Builds the device socket definition for the channel engine (`createEndpoint(createDeviceSocket(ctx, opts), ...)`). */
export function createDeviceSocket(ctx: FleetContext, opts: DeviceSocketOptions): DeviceSocket {
  const stats: DeviceSocketStats = { unknownEvents: 0, rejectedReports: 0 };
  return {
    stats,
    async connect(info) {
      const identity = opts.identityOf(info.request);
      if (!identity) return { ok: false, status: 401, reason: 'a device client certificate is required' };
      // One identifier, one protocol: a GRiSP board's certificate is not a Phoenix credential.
      if (!(await claimCertificateDevice(ctx, identity, 'phoenix'))) {
        ctx.log.warn(
          { device_id: identity.deviceId, identifier: identity.identifier, protocol: identity.protocol },
          'refused a Phoenix socket for a device registered to another protocol',
        );
        return {
          ok: false,
          status: 409,
          reason:
            'this certificate belongs to a device registered to another protocol; a Phoenix device needs its own certificate',
        };
      }
      const id = deviceSocketId(identity.deviceId);
      // A device has one connection: a new one closes the previous. On this node directly (the new
      // socket is not registered yet, so only older ones close); on the node the device is recorded
      // online on, if another, with one message on the device's topic. No cluster-wide broadcast.
      opts.closeLocal(id, 'replaced by a newer connection of this device');
      await replaceConnection(ctx, identity.deviceId, identity.connectedNode).catch((err: unknown) =>
        ctx.log.warn({ err, device_id: identity.deviceId }, 'could not close the previous connection'),
      );
      const { deviceId, orgId, productId, identifier, certificateId } = identity;
      const assigns: DeviceAssigns = { deviceId, orgId, productId, identifier, certificateId };
      return { ok: true, assigns, id };
    },
    channels: [
      { pattern: 'device:*', channel: createDeviceChannel(ctx, stats) },
      { pattern: 'group:*', channel: createGroupChannel(ctx, stats) },
    ],
  };
}

export { deviceErrorReply } from './replies.ts';
