/**
 * How keyauth clients get firmware: `check_update` answers a signed, expiring URL on the API
 * listener, `GET /api/keyauth/firmware/<id>?device=<uuid>&expires=<unix>&sig=<hmac>`. The HMAC
 * binds firmware, device and expiry (the TCP channel proved the device's key); the client
 * verifies the sha256 the encrypted offer carried. Range supported; the digest is in
 * `X-Checksum-SHA256` too.
 */
import type { FastifyInstance, FastifyReply } from 'fastify';
import type { BlobStore } from '../../firmware/blob-store.ts';
import { firmwareBlob, NO_STORE, packageHeaders, serveBlob } from '../../firmware/serve-blob.ts';
import { signDownloadUrl, verifyDownload } from '../../firmware/signing.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { deviceById } from '../../fleet/devices.ts';
import { isUuid } from '../../fleet/errors.ts';

export const KEYAUTH_DOWNLOAD_PREFIX = '/api/keyauth/firmware';

/** A download URL for one device, valid `ttlSeconds`. */
export function keyauthDownloadUrl(input: {
  baseUrl: string;
  secret: string;
  firmwareId: string;
  deviceId: string;
  ttlSeconds: number;
  now?: Date;
}): { url: string; expiresAt: Date } {
  const expiresAt = new Date(Math.floor((input.now ?? new Date()).getTime() / 1000 + input.ttlSeconds) * 1000);
  const grant = { route: 'keyauth', firmwareId: input.firmwareId, deviceId: input.deviceId } as const;
  return { url: signDownloadUrl({ baseUrl: input.baseUrl, secret: input.secret, grant, expiresAt }), expiresAt };
}

/** Mounts the download route on the API listener (before `listen`). */
export function registerKeyauthDownloads(
  api: FastifyInstance,
  deps: { fleet: FleetContext; blobs: BlobStore; secret: string },
): void {
  api.route({
    method: ['GET', 'HEAD'],
    url: `${KEYAUTH_DOWNLOAD_PREFIX}/:id`,
    exposeHeadRoute: false,
    schema: { hide: true },
    handler: async (request, reply) => {
      const { id } = request.params as { id: string };
      if (!isUuid(id)) return refuse(reply, 404, 'no such firmware');
      const { device: deviceId, expires, sig } = request.query as Record<string, unknown>;
      if (typeof deviceId !== 'string' || !isUuid(deviceId))
        return refuse(reply, 403, 'the download URL is incomplete; ask check_update for a new one');
      const verdict = verifyDownload(deps.secret, { route: 'keyauth', firmwareId: id, deviceId }, { expires, sig });
      if (!verdict.ok)
        return refuse(
          reply,
          403,
          verdict.reason === 'expired'
            ? 'the download URL has expired; ask check_update for a new one'
            : verdict.reason === 'malformed'
              ? 'the download URL is incomplete; ask check_update for a new one'
              : 'the download URL signature is invalid',
        );
      // The device's approval and product now, not when the URL was issued.
      const device = await deviceById(deps.fleet.db, deviceId);
      const row =
        device &&
        (await deps.fleet.db
          .selectFrom('firmware')
          .select(['sha256', 'has_blob', 'uploaded_at', 'component', 'version', 'format'])
          .where('id', '=', id)
          .where('product_id', '=', device.product_id)
          .executeTakeFirst());
      if (!row || device?.approval !== 'approved')
        return refuse(reply, 403, 'this device may not download this firmware');
      const missing = (r: FastifyReply) => refuse(r, 404, 'the firmware image is not stored on the server');
      const blob = await firmwareBlob(deps.blobs, row);
      if (!blob) return missing(reply);
      // The URL is the credential: nothing may keep the answer under it.
      const options = { blobs: deps.blobs, cacheControl: NO_STORE, missing, ...packageHeaders(row) };
      return serveBlob(request, reply, blob, options);
    },
  });
}

function refuse(reply: FastifyReply, status: number, details: string): FastifyReply {
  return reply.status(status).send({ error: status === 403 ? 'Forbidden' : 'Not found', details });
}
