import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Db } from '../db/index.ts';
import type { Firmware } from '../db/schema.ts';
import { isUuid } from '../fleet/errors.ts';
import type { BlobStore } from './blob-store.ts';
import { firmwareBlob, PRIVATE_IMMUTABLE, serveBlob } from './serve-blob.ts';
import { bucketedExpiry, signDownloadUrl, verifyDownload } from './signing.ts';

/**
 * Firmware downloads on the mutual-TLS device listener: `GET|HEAD /firmware/:id?expires&sig`.
 * The signed URL proves an operator's target sent it; the client certificate proves which device
 * asks, and its product must own the firmware. Served by `serveBlob` (Range, conditionals); the
 * URL is not a credential by itself, so the device's own cache may keep the bytes.
 */

export interface FirmwareDownloadDeps {
  db: Db;
  blobs: BlobStore;
  /** HMAC key of the signed URLs (the same one `createFirmwareUrlSigner` uses). */
  secret: string | Buffer;
}

export interface FirmwareUrlOptions {
  /** Public base URL of the device listener (config `devicePublicUrl`). */
  baseUrl: string;
  secret: string | Buffer;
  ttlSeconds: number;
  now?: () => Date;
}

/**
 * The `firmwareUrl(firmware)` the wiring injects into the fleet context. Expiry is rounded up to
 * a tenth of the TTL so a group's devices get byte-identical URLs for a while (one encode per
 * broadcast, cacheable).
 */
export function createFirmwareUrlSigner(options: FirmwareUrlOptions): (firmware: Pick<Firmware, 'id'>) => string {
  return (firmware) =>
    signDownloadUrl({
      baseUrl: options.baseUrl,
      secret: options.secret,
      grant: { route: 'firmware', firmwareId: firmware.id },
      expiresAt: bucketedExpiry(options.ttlSeconds, (options.now?.() ?? new Date()).getTime()),
    });
}

interface DeviceRequestIdentity {
  productId: string;
  deviceId: string;
}

/** Mounts the download route on the device listener's app (which sets `request.deviceIdentity`). */
export function registerFirmwareDownload(deviceApp: FastifyInstance, deps: FirmwareDownloadDeps): void {
  deviceApp.route({
    method: ['GET', 'HEAD'],
    url: '/firmware/:id',
    exposeHeadRoute: false,
    handler: async (request, reply) => {
      const { id } = request.params as { id: string };
      const { expires, sig } = request.query as Record<string, unknown>;
      const verdict = verifyDownload(deps.secret, { route: 'firmware', firmwareId: id }, { expires, sig });
      if (!verdict.ok) {
        const why =
          verdict.reason === 'expired'
            ? 'the download URL has expired; rejoin the device channel to get a fresh one'
            : verdict.reason === 'malformed'
              ? 'the download URL is incomplete: it needs the expires and sig the server sent'
              : 'the download URL signature is invalid';
        return refuse(reply, 403, 'forbidden', why);
      }
      const identity = (request as FastifyRequest & { deviceIdentity?: DeviceRequestIdentity }).deviceIdentity;
      if (!identity) return refuse(reply, 401, 'unauthorized', 'connect with the device certificate');
      const firmware = isUuid(id)
        ? await deps.db
            .selectFrom('firmware')
            .select(['id', 'product_id', 'sha256', 'has_blob', 'uploaded_at'])
            .where('id', '=', id)
            .executeTakeFirst()
        : undefined;
      // Same answer for "absent" and "another product's": a device cannot probe other products.
      if (!firmware || firmware.product_id !== identity.productId) {
        request.log.warn(
          { device_id: identity.deviceId, firmware_id: id },
          "firmware download refused: not this device's product",
        );
        return refuse(reply, 403, 'forbidden', "this firmware does not belong to the device's product");
      }
      const missing = (r: FastifyReply) =>
        refuse(r, 404, 'not_found', 'the firmware image is not stored on the server; ask an operator to upload it');
      const blob = await firmwareBlob(deps.blobs, firmware);
      if (!blob) return missing(reply);
      return serveBlob(request, reply, blob, { blobs: deps.blobs, cacheControl: PRIVATE_IMMUTABLE, missing });
    },
  });
}

function refuse(reply: FastifyReply, status: number, code: string, message: string): FastifyReply {
  return reply.status(status).send({ error: { code, message } });
}
