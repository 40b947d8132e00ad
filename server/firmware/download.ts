import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Db } from '../db/index.ts';
import type { Firmware } from '../db/schema.ts';
import { isUuid } from '../fleet/errors.ts';
import type { BlobStore, ByteRange } from './blob-store.ts';
import { sendBlob } from './send-blob.ts';
import { signFirmwareUrl, verifyFirmwareUrl } from './signing.ts';

/**
 * Firmware downloads on the mutual-TLS device listener: `GET|HEAD /firmware/:id?expires&sig`.
 * The signed URL proves an operator's target sent it; the client certificate proves which device
 * asks, and its product must own the firmware. Streams from the blob store with Range support.
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
  const ttlMs = options.ttlSeconds * 1000;
  const bucketMs = Math.max(1000, Math.floor(ttlMs / 10 / 1000) * 1000);
  return (firmware) => {
    const now = (options.now?.() ?? new Date()).getTime();
    const expiresAt = new Date(Math.ceil((now + ttlMs) / bucketMs) * bucketMs);
    return signFirmwareUrl({ baseUrl: options.baseUrl, secret: options.secret, firmwareId: firmware.id, expiresAt });
  };
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
      const query = request.query as Record<string, unknown>;
      const verdict = verifyFirmwareUrl({
        secret: deps.secret,
        firmwareId: id,
        expires: query.expires,
        sig: query.sig,
      });
      if (!verdict.ok) {
        const why =
          verdict.reason === 'expired'
            ? 'the download URL has expired; rejoin the device channel to get a fresh one'
            : 'the download URL signature is invalid';
        return refuse(reply, 403, 'forbidden', why);
      }
      const identity = (request as FastifyRequest & { deviceIdentity?: DeviceRequestIdentity }).deviceIdentity;
      if (!identity) return refuse(reply, 401, 'unauthorized', 'connect with the device certificate');
      const firmware = isUuid(id)
        ? await deps.db
            .selectFrom('firmware')
            .select(['id', 'product_id', 'sha256', 'size', 'has_blob'])
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
      const stat = firmware.has_blob && firmware.sha256 ? await deps.blobs.stat(firmware.sha256) : null;
      if (!stat || !firmware.sha256)
        return refuse(
          reply,
          404,
          'not_found',
          'the firmware image is not stored on the server; ask an operator to upload it',
        );
      return serveBlob(request, reply, deps.blobs, firmware.sha256, stat.size);
    },
  });
}

async function serveBlob(
  request: FastifyRequest,
  reply: FastifyReply,
  blobs: BlobStore,
  sha256: string,
  size: number,
): Promise<FastifyReply> {
  const etag = `"${sha256}"`;
  reply
    .header('accept-ranges', 'bytes')
    .header('etag', etag)
    .header('content-type', 'application/octet-stream')
    .header('cache-control', 'private, max-age=0');
  let range: ByteRange | 'unsatisfiable' | undefined = parseRange(request.headers.range, size);
  // If-Range with another validator: the client's partial copy is stale, send everything.
  const ifRange = request.headers['if-range'];
  if (range && ifRange && ifRange !== etag) range = undefined;
  if (range === 'unsatisfiable') {
    return reply.status(416).header('content-range', `bytes */${size}`).header('content-length', 0).send();
  }
  if (range) {
    reply
      .status(206)
      .header('content-range', `bytes ${range.start}-${range.end}/${size}`)
      .header('content-length', range.end - range.start + 1);
  } else {
    reply.status(200).header('content-length', size);
  }
  if (request.method === 'HEAD') return reply.send();
  // Backpressure holds the disk reads (see sendBlob).
  return sendBlob(reply, blobs, sha256, range);
}

/**
 * One `bytes=` range of a `size`-byte entity: `a-b`, `a-` or `-n`. Multiple ranges and unparsable
 * headers are ignored (a full 200 is allowed); a start past the end is unsatisfiable.
 */
export function parseRange(header: string | undefined, size: number): ByteRange | 'unsatisfiable' | undefined {
  if (!header) return undefined;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === '' && m[2] === '')) return undefined;
  if (m[1] === '') {
    const suffix = Number(m[2]);
    if (suffix === 0) return 'unsatisfiable';
    return size === 0 ? 'unsatisfiable' : { start: Math.max(0, size - suffix), end: size - 1 };
  }
  const start = Number(m[1]);
  const end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size || start > end) return 'unsatisfiable';
  return { start, end };
}

function refuse(reply: FastifyReply, status: number, code: string, message: string): FastifyReply {
  return reply.status(status).send({ error: { code, message } });
}
