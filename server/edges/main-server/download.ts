/**
 * Package downloads for edges on the API listener (Main Server `download-update`, keyauth's
 * signed URLs): the firmware blob streamed with its sha256 in `X-Checksum-SHA256` and `Digest`,
 * ETag, and single `Range` requests (206/416). Never buffers the image.
 */
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Firmware } from '../../db/schema.ts';
import type { BlobStore, ByteRange } from '../../firmware/blob-store.ts';
import { parseRange } from '../../firmware/download.ts';
import { sendBlob } from '../../firmware/send-blob.ts';

export type PackageRow = Pick<Firmware, 'id' | 'sha256' | 'size' | 'has_blob' | 'component' | 'version' | 'format'>;

/** Starts streaming the package (the route then returns `reply`); false (nothing sent) when its image is not stored. */
export async function servePackage(
  request: FastifyRequest,
  reply: FastifyReply,
  blobs: BlobStore,
  firmware: PackageRow,
): Promise<boolean> {
  const stat = firmware.has_blob && firmware.sha256 ? await blobs.stat(firmware.sha256) : null;
  if (!stat || !firmware.sha256) return false;
  const sha256 = firmware.sha256;
  const size = stat.size;
  const etag = `"${sha256}"`;
  reply
    .header('accept-ranges', 'bytes')
    .header('etag', etag)
    .header('x-checksum-sha256', sha256)
    .header('digest', `sha-256=${Buffer.from(sha256, 'hex').toString('base64')}`)
    .header('content-type', firmware.format === 'main-server-zip' ? 'application/zip' : 'application/octet-stream')
    .header(
      'content-disposition',
      `attachment; filename="${safeName(firmware.component)}-${safeName(firmware.version)}${firmware.format === 'main-server-zip' ? '.zip' : '.bin'}"`,
    )
    .header('cache-control', 'private, max-age=0');
  let range: ByteRange | 'unsatisfiable' | undefined = parseRange(request.headers.range, size);
  const ifRange = request.headers['if-range'];
  if (range && ifRange && ifRange !== etag) range = undefined;
  if (range === 'unsatisfiable') {
    reply.status(416).header('content-range', `bytes */${size}`).header('content-length', 0).send();
    return true;
  }
  if (range)
    reply
      .status(206)
      .header('content-range', `bytes ${range.start}-${range.end}/${size}`)
      .header('content-length', range.end - range.start + 1);
  else reply.status(200).header('content-length', size);
  // sendBlob streams the bytes with backpressure; the route then returns `reply`.
  if (request.method === 'HEAD') reply.send();
  else await sendBlob(reply, blobs, sha256, range);
  return true;
}

function safeName(s: string): string {
  return s.replace(/[^A-Za-z0-9_.-]/g, '_');
}
