/**
 * Gateway firmware downloads on the API listener: `GET|HEAD /fw/<firmware>/<device>/<expires>/<hmac>`.
 * Gateways have no client certificate: the signed, expiring path bound to the gateway is the
 * credential, so the gateway's approval and product are checked on every request, and the answer
 * is `no-store` (no proxy keeps bytes under a credential-bearing URL). Served by `serveBlob`.
 */
import type { FastifyInstance, FastifyReply } from 'fastify';
import type { Firmware } from '../../db/schema.ts';
import type { BlobStore } from '../../firmware/blob-store.ts';
import { firmwareBlob, NO_STORE, serveBlob } from '../../firmware/serve-blob.ts';
import { bucketedExpiry, signDownloadUrl, verifyDownload } from '../../firmware/signing.ts';
import { deviceById } from '../../fleet/devices.ts';
import { isUuid } from '../../fleet/errors.ts';
import type { FleetContext } from '../../fleet/index.ts';
import type { Logger } from '../../log.ts';

/** The safe, signed image URL of `firmware` for gateway `deviceId` (the shape `isSafeFirmwareUrl` accepts). */
export function wifidogxFirmwareUrl(o: {
  baseUrl: string;
  secret: string;
  ttlSeconds: number;
  firmware: Pick<Firmware, 'id'>;
  deviceId: string;
}): string {
  return signDownloadUrl({
    baseUrl: o.baseUrl,
    secret: o.secret,
    grant: { route: 'wifidogx', firmwareId: o.firmware.id, deviceId: o.deviceId },
    expiresAt: bucketedExpiry(o.ttlSeconds),
  });
}

export function registerWifidogxDownloads(
  scope: FastifyInstance,
  deps: { fleet: FleetContext; blobs: BlobStore; secret: string; log: Logger },
): void {
  const { fleet } = deps;
  const forbidden = (reply: FastifyReply, message: string) =>
    reply.status(403).send({ error: { code: 'forbidden', message } });
  scope.route({
    method: ['GET', 'HEAD'],
    url: '/fw/:id/:device/:expires/:sig',
    exposeHeadRoute: false,
    schema: { hide: true },
    handler: async (request, reply) => {
      const { id, device: deviceId, ...given } = request.params as Record<'id' | 'device' | 'expires' | 'sig', string>;
      const verdict = verifyDownload(deps.secret, { route: 'wifidogx', firmwareId: id, deviceId }, given);
      if (!verdict.ok)
        return forbidden(
          reply,
          verdict.reason === 'expired'
            ? 'the firmware URL has expired; the server sends a fresh one with the next firmware_upgrade'
            : verdict.reason === 'malformed'
              ? 'the firmware URL is malformed: use the URL of the last firmware_upgrade as it is'
              : 'the firmware URL signature is invalid',
        );
      // The URL names its gateway; the gateway's approval and product are checked now, not when the URL was issued.
      const device = await deviceById(fleet.db, deviceId);
      if (device?.approval !== 'approved') {
        deps.log.info(
          { device_id: deviceId, firmware_id: id, approval: device?.approval ?? 'deleted' },
          'firmware download refused: the gateway is not approved',
        );
        return forbidden(reply, `the gateway is ${device?.approval ?? 'deleted'}: it may not download firmware`);
      }
      const firmware = isUuid(id)
        ? await fleet.db
            .selectFrom('firmware')
            .select(['sha256', 'has_blob', 'product_id', 'uploaded_at'])
            .where('id', '=', id)
            .executeTakeFirst()
        : undefined;
      if (firmware && firmware.product_id !== device.product_id)
        return forbidden(reply, "this firmware does not belong to the gateway's product");
      const missing = (r: FastifyReply) =>
        r.status(404).send({ error: { code: 'not_found', message: 'the firmware image is not stored on the server' } });
      const blob = firmware ? await firmwareBlob(deps.blobs, firmware) : null;
      if (!blob) return missing(reply);
      return serveBlob(request, reply, blob, { blobs: deps.blobs, cacheControl: NO_STORE, missing });
    },
  });
}
