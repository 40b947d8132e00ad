/**
 * How keyauth clients get firmware: `check_update` answers a signed, expiring URL on the API
 * listener, `GET /api/keyauth/firmware/<id>?device=<uuid>&expires=<unix>&sig=<hmac>`. The HMAC
 * binds firmware, device and expiry (the TCP channel proved the device's key); the client
 * verifies the sha256 the encrypted offer carried. Range supported; the digest is in
 * `X-Checksum-SHA256` too.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyReply } from 'fastify';
import type { BlobStore } from '../../firmware/blob-store.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { deviceById } from '../../fleet/devices.ts';
import { isUuid } from '../../fleet/errors.ts';
import { servePackage } from '../main-server/download.ts';

export const KEYAUTH_DOWNLOAD_PREFIX = '/api/keyauth/firmware';

function signature(secret: string, firmwareId: string, deviceId: string, expires: number): string {
  return createHmac('sha256', secret)
    .update(`fleethub-keyauth-firmware\n${firmwareId}\n${deviceId}\n${expires}`)
    .digest('base64url');
}

/** A download URL for one device, valid `ttlSeconds`. */
export function signDownloadUrl(input: {
  baseUrl: string;
  secret: string;
  firmwareId: string;
  deviceId: string;
  ttlSeconds: number;
  now?: Date;
}): { url: string; expiresAt: Date } {
  const expires = Math.floor((input.now ?? new Date()).getTime() / 1000) + input.ttlSeconds;
  const sig = signature(input.secret, input.firmwareId, input.deviceId, expires);
  return {
    url: `${input.baseUrl.replace(/\/+$/, '')}${KEYAUTH_DOWNLOAD_PREFIX}/${input.firmwareId}?device=${input.deviceId}&expires=${expires}&sig=${sig}`,
    expiresAt: new Date(expires * 1000),
  };
}

export function verifyDownload(
  secret: string,
  firmwareId: string,
  query: Record<string, unknown>,
  now = new Date(),
): { ok: true; deviceId: string } | { ok: false; reason: string } {
  const { device, expires, sig } = query;
  if (
    typeof device !== 'string' ||
    !isUuid(device) ||
    typeof expires !== 'string' ||
    !/^\d{1,12}$/.test(expires) ||
    typeof sig !== 'string'
  )
    return { ok: false, reason: 'the download URL is incomplete; ask check_update for a new one' };
  const expected = Buffer.from(signature(secret, firmwareId, device, Number(expires)));
  const given = Buffer.from(sig);
  if (given.length !== expected.length || !timingSafeEqual(given, expected))
    return { ok: false, reason: 'the download URL signature is invalid' };
  if (Number(expires) * 1000 <= now.getTime())
    return { ok: false, reason: 'the download URL has expired; ask check_update for a new one' };
  return { ok: true, deviceId: device };
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
      const verdict = verifyDownload(deps.secret, id, request.query as Record<string, unknown>);
      if (!verdict.ok) return refuse(reply, 403, verdict.reason);
      // The device's approval and product now, not when the URL was issued.
      const device = await deviceById(deps.fleet.db, verdict.deviceId);
      const row =
        device &&
        (await deps.fleet.db
          .selectFrom('firmware')
          .select(['id', 'sha256', 'size', 'has_blob', 'component', 'version', 'format'])
          .where('id', '=', id)
          .where('product_id', '=', device.product_id)
          .executeTakeFirst());
      if (!row || device?.approval !== 'approved')
        return refuse(reply, 403, 'this device may not download this firmware');
      if (!(await servePackage(request, reply, deps.blobs, row)))
        return refuse(reply, 404, 'the firmware image is not stored on the server');
      return reply;
    },
  });
}

function refuse(reply: FastifyReply, status: number, details: string): FastifyReply {
  return reply.status(status).send({ error: status === 403 ? 'Forbidden' : 'Not found', details });
}
