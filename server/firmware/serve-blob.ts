import type { IncomingHttpHeaders, ServerResponse } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Firmware } from '../db/schema.ts';
import type { Readable } from 'node:stream';
import { BlobStoreError, type BlobReader, type BlobStore, type ByteRange } from './blob-store.ts';

/** One firmware download as it ended: how much of it was sent, how long it took, whether it was sent whole. */
export interface DownloadOutcome {
  sha256: string;
  bytes: number;
  expected: number;
  durationMs: number;
  completed: boolean;
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Told about every download that ends on this listener (metrics); optional. */
    fleethubDownloadObserver?: (outcome: DownloadOutcome) => void;
  }
}

/** Makes `observer` see every download `serveBlob` sends on `app` and the plugins registered on it. */
export function observeDownloads(app: FastifyInstance, observer: (outcome: DownloadOutcome) => void): void {
  app.decorate('fleethubDownloadObserver', observer);
}

/**
 * The one place that answers a download with stored bytes, for every download route (Phoenix
 * devices, GRiSP packages, WiFiDogX gateways, keyauth clients, Main Server Pis; which route sends
 * which cache policy: docs/firmware-downloads.md). HTTP semantics per RFC 9110: a strong ETag,
 * Last-Modified, If-None-Match and If-Modified-Since (304), one `Range` on GET (206 with
 * Content-Range, 416 with the size in Content-Range), If-Range with an entity tag (strong
 * comparison) or a date (exact match), HEAD with the GET's headers, Content-Length and
 * Accept-Ranges always. The route checks the caller first; this function never refuses anyone.
 */

/** The bytes a download answers with: all of a stored blob, or a slice of it. */
export interface BlobEntity {
  /** The stored blob the bytes are read from. */
  sha256: string;
  /** Bytes of the entity. */
  size: number;
  /** Where the entity starts in the blob (a GRiSP package member is a slice of the archive); 0 by default. */
  offset?: number;
  /** Strong, quoted entity tag; `"<sha256>"` by default. */
  etag?: string;
  /** When the bytes were stored: sent as Last-Modified, compared with If-Range and If-Modified-Since dates. */
  lastModified?: Date;
}

export interface ServeBlobOptions {
  blobs: BlobStore;
  /** The route's policy: `PRIVATE_IMMUTABLE` or `NO_STORE` (see docs/firmware-downloads.md). */
  cacheControl: string;
  /** Default `application/octet-stream`. */
  contentType?: string;
  /** More headers of the 200/206 answer (Content-Disposition, checksums). */
  headers?: Record<string, string>;
  /**
   * The route's answer when the blob is gone by the time its bytes are opened (deleted after the
   * route looked it up): its 404 in its own error format, the same as for a blob it found missing.
   */
  missing(reply: FastifyReply): FastifyReply | Promise<FastifyReply>;
}

/**
 * For URLs that are not a credential by themselves (the client also shows a certificate or a
 * bearer header): the bytes behind a firmware id never change, so the client's own cache may keep
 * them, for a day; shared caches may not (`private`). A constant, so that every answer for the
 * same bytes is the same (a cache that outlives the URL only serves the device its own copy).
 */
export const PRIVATE_IMMUTABLE = 'private, max-age=86400, immutable';

/** For URLs that are the credential (WiFiDogX, keyauth): no cache or proxy keeps the answer under that URL. */
export const NO_STORE = 'no-store';

/**
 * A firmware record's stored image as an entity, or null when the image is not (or no longer)
 * in the store. Its bytes never change once attached, so `uploaded_at` is a strong date.
 */
export async function firmwareBlob(
  blobs: BlobStore,
  firmware: Pick<Firmware, 'sha256' | 'has_blob' | 'uploaded_at'>,
): Promise<BlobEntity | null> {
  if (!firmware.has_blob || !firmware.sha256) return null;
  const stat = await blobs.stat(firmware.sha256);
  if (!stat) return null;
  return { sha256: firmware.sha256, size: stat.size, lastModified: new Date(firmware.uploaded_at) };
}

/**
 * The package form of a download (Main Server Pis, keyauth clients): the sha256 in
 * `X-Checksum-SHA256` and `Digest` as their clients check it, and a file name.
 */
export function packageHeaders(
  firmware: Pick<Firmware, 'sha256' | 'component' | 'version' | 'format'>,
): Pick<ServeBlobOptions, 'contentType' | 'headers'> {
  const zip = firmware.format === 'main-server-zip';
  const sha256 = firmware.sha256 ?? '';
  const filename = `${safeName(firmware.component)}-${safeName(firmware.version)}${zip ? '.zip' : '.bin'}`;
  return {
    contentType: zip ? 'application/zip' : 'application/octet-stream',
    headers: {
      'x-checksum-sha256': sha256,
      digest: `sha-256=${Buffer.from(sha256, 'hex').toString('base64')}`,
      'content-disposition': `attachment; filename="${filename}"`,
    },
  };
}

function safeName(s: string): string {
  return s.replace(/[^A-Za-z0-9_.-]/g, '_');
}

/** Answers `request` with `entity`; resolves once the body is under way (the route returns the reply). */
export async function serveBlob(
  request: FastifyRequest,
  reply: FastifyReply,
  entity: BlobEntity,
  options: ServeBlobOptions,
): Promise<FastifyReply> {
  const etag = entity.etag ?? `"${entity.sha256}"`;
  // HTTP dates have whole seconds: compare what the client can have seen.
  const modified = entity.lastModified ? Math.floor(entity.lastModified.getTime() / 1000) * 1000 : undefined;
  const validators = () => {
    reply.header('etag', etag).header('cache-control', options.cacheControl);
    if (modified !== undefined) reply.header('last-modified', new Date(modified).toUTCString());
  };
  if (notModified(request.headers, etag, modified)) {
    validators();
    return reply.status(304).send();
  }
  const size = entity.size;
  // Range is defined for GET only (RFC 9110 §14.2); HEAD answers what a plain GET would.
  let range = request.method === 'GET' ? parseRange(request.headers.range, size) : undefined;
  if (range !== undefined && !rangeConditionHolds(request.headers['if-range'], etag, modified)) range = undefined;
  const length = range === 'unsatisfiable' ? 0 : range ? range.end - range.start + 1 : size;
  const offset = entity.offset ?? 0;
  const start = offset + (range && range !== 'unsatisfiable' ? range.start : 0);
  // Opened before any header is set: a blob deleted since the route looked it up is the route's 404.
  const source =
    request.method === 'HEAD' || length === 0
      ? undefined
      : await openSource(options.blobs, entity.sha256, { start, end: start + length - 1 });
  if (source === null) return options.missing(reply);

  validators();
  reply.header('accept-ranges', 'bytes').header('content-type', options.contentType ?? 'application/octet-stream');
  for (const [name, value] of Object.entries(options.headers ?? {})) reply.header(name, value);
  if (range === 'unsatisfiable')
    return reply.status(416).header('content-range', `bytes */${size}`).header('content-length', 0).send();
  if (range)
    reply
      .status(206)
      .header('content-range', `bytes ${range.start}-${range.end}/${size}`)
      .header('content-length', length);
  else reply.status(200).header('content-length', size);
  if (!source) return reply.send();
  return sendBytes(reply, source, entity.sha256, { start, end: start + length - 1 });
}

/** An opened blob: positional reads, or a stream of the range (stores without `reader`). */
type Source = { reader: BlobReader } | { stream: Readable };

/** Opens `range` of blob `sha256`; null when it is not in the store (any other failure rejects). */
async function openSource(blobs: BlobStore, sha256: string, range: ByteRange): Promise<Source | null> {
  try {
    return blobs.reader ? { reader: await blobs.reader(sha256) } : { stream: await blobs.open(sha256, range) };
  } catch (err) {
    if (err instanceof BlobStoreError && err.code === 'BLOB_NOT_FOUND') return null;
    throw err;
  }
}

/**
 * One `bytes=` range of a `size`-byte entity: `a-b`, `a-` or `-n`. Undefined (send it all) when
 * the header is absent, names another unit, is not valid, or asks for several ranges (not served
 * as multipart; RFC 9110 lets a server ignore Range). `unsatisfiable` (416) when the one range
 * starts past the end, or is a zero-length suffix, or the entity is empty.
 */
export function parseRange(header: string | undefined, size: number): ByteRange | 'unsatisfiable' | undefined {
  if (header === undefined) return undefined;
  const unit = /^\s*bytes\s*=(.*)$/i.exec(header);
  if (!unit) return undefined;
  const specs = unit[1]!
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  if (specs.length !== 1) return undefined;
  const spec = /^(\d*)-(\d*)$/.exec(specs[0]!);
  if (!spec || (spec[1] === '' && spec[2] === '')) return undefined;
  if (spec[1] === '') {
    const suffix = Number(spec[2]);
    if (suffix === 0 || size === 0) return 'unsatisfiable';
    return { start: Math.max(0, size - suffix), end: size - 1 };
  }
  const start = Number(spec[1]);
  const last = spec[2] === '' ? Number.POSITIVE_INFINITY : Number(spec[2]);
  if (last < start) return undefined;
  if (start >= size) return 'unsatisfiable';
  return { start, end: Math.min(last, size - 1) };
}

/** RFC 9110 §13.1.2/§13.1.3: If-None-Match (weak comparison, `*`), or else If-Modified-Since. */
function notModified(headers: IncomingHttpHeaders, etag: string, modified: number | undefined): boolean {
  const ifNoneMatch = headers['if-none-match'];
  if (ifNoneMatch !== undefined) {
    if (ifNoneMatch.trim() === '*') return true;
    const opaque = etag.replace(/^W\//, '');
    return (ifNoneMatch.match(/(?:W\/)?"[^"]*"/g) ?? []).some((tag) => tag.replace(/^W\//, '') === opaque);
  }
  const since = headers['if-modified-since'];
  if (since === undefined || modified === undefined) return false;
  const date = Date.parse(since);
  return !Number.isNaN(date) && modified <= date;
}

/**
 * RFC 9110 §13.1.5: with no If-Range the range stands; an entity tag must match strongly (a weak
 * one never does); a date must equal Last-Modified exactly. Otherwise the whole entity is sent.
 */
function rangeConditionHolds(
  ifRange: string | string[] | undefined,
  etag: string,
  modified: number | undefined,
): boolean {
  if (ifRange === undefined) return true;
  if (typeof ifRange !== 'string') return false;
  const value = ifRange.trim();
  if (value.startsWith('"') || value.startsWith('W/')) return !etag.startsWith('W/') && value === etag;
  const date = Date.parse(value);
  return modified !== undefined && !Number.isNaN(date) && date === modified;
}

// --- the bytes ----------------------------------------------------------------------------

/** Bytes per read; two buffers per download take turns, so a download allocates nothing per chunk. */
const CHUNK = 256 * 1024;

/**
 * Sends `range` of blob `sha256` as the body of `reply`, whose status and headers (Content-Length
 * included) are set. With a store that reads at positions, the bytes go straight to the socket
 * through two recycled buffers: a 64 MiB image streamed as fresh 256 KiB chunks made garbage
 * collection a quarter of the server's time under 50 concurrent downloads. A buffer is read into
 * again only once its previous write has completed, and the next read waits for the socket to
 * drain, so backpressure holds the disk reads. When the client goes away the loop stops and the
 * blob is closed. Other stores stream through Fastify (which destroys the stream on close).
 */
async function sendBytes(reply: FastifyReply, source: Source, sha256: string, range: ByteRange): Promise<FastifyReply> {
  const startedAt = performance.now();
  const expected = range.end - range.start + 1;
  const sent = { bytes: 0 };
  // One line per download: what an operator reads to see a device's update go through (or not).
  reply.raw.once('close', () => {
    const completed = reply.raw.writableFinished;
    const outcome: DownloadOutcome = {
      sha256,
      bytes: completed && 'stream' in source ? expected : sent.bytes,
      expected,
      durationMs: Math.round(performance.now() - startedAt),
      completed,
    };
    reply.log.info(
      {
        sha256,
        bytes: outcome.bytes,
        expected_bytes: expected,
        duration_ms: outcome.durationMs,
        completed,
        ...(reply.statusCode === 206 ? { range: reply.getHeader('content-range') } : {}),
      },
      'firmware download',
    );
    reply.server.fleethubDownloadObserver?.(outcome);
  });
  if ('stream' in source) return reply.send(source.stream);
  const { reader } = source;
  const res = reply.raw;
  const headers = reply.getHeaders();
  reply.hijack();
  res.writeHead(reply.statusCode, headers as Record<string, string | number | string[]>);
  void pump(res, reader, range.start, range.end + 1, sent).catch((err: unknown) => {
    reply.log.warn({ err, sha256 }, 'download aborted');
    res.destroy();
  });
  return reply;
}

async function pump(
  res: ServerResponse,
  reader: BlobReader,
  start: number,
  end: number,
  sent: { bytes: number },
): Promise<void> {
  const buffers = [Buffer.allocUnsafeSlow(CHUNK), Buffer.allocUnsafeSlow(CHUNK)];
  // Each buffer's last write: resolves with its error (undefined when written).
  const written: Promise<Error | null | undefined>[] = [Promise.resolve(undefined), Promise.resolve(undefined)];
  let isClosed = res.destroyed;
  // Never rejects: a response that closes (client gone) just ends the loop.
  const closed = new Promise<undefined>((resolve) => {
    if (isClosed) resolve(undefined);
    res.once('close', () => {
      isClosed = true;
      resolve(undefined);
    });
  });
  try {
    for (let position = start, turn = 0; position < end; turn ^= 1) {
      const failed = await Promise.race([written[turn], closed]);
      if (failed) throw failed;
      if (isClosed) return;
      const buffer = buffers[turn]!;
      const n = await reader.read(buffer, Math.min(CHUNK, end - position), position);
      if (n === 0) throw new Error(`blob ended at byte ${position} of ${end}`);
      position += n;
      written[turn] = new Promise((resolve) =>
        res.write(n === CHUNK ? buffer : buffer.subarray(0, n), (err) => {
          if (!err) sent.bytes += n;
          resolve(err);
        }),
      );
      if (res.writableNeedDrain) await Promise.race([new Promise((resolve) => res.once('drain', resolve)), closed]);
    }
    for (const last of written) {
      const failed = await Promise.race([last, closed]);
      if (failed) throw failed;
    }
    if (!isClosed) res.end();
  } finally {
    await reader.close();
  }
}
