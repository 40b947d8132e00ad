import { createHash, type Hash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import https from 'node:https';
import type { IncomingMessage } from 'node:http';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';

/** What the device presents and trusts on the download connection (same as its socket). */
export interface DeviceTls {
  cert: string;
  key: string;
  ca: string;
  /** TLS server name when the URL's host is not in the server certificate. */
  servername?: string;
}

/** Faults the simulator injects into one download (real failures behave the same way). */
export interface DownloadFaults {
  /** Cut the connection once after this many bytes of the first response body. */
  dropAfterBytes?: number;
  /** Flip one byte on its way to disk, so verification must catch it. */
  corrupt?: boolean;
  /** Throttle reading to this many kilobits per second (TCP backpressure does the rest). */
  kbps?: number;
}

export interface DownloadOptions {
  url: string;
  tls: DeviceTls;
  /** Shared agent (the simulator shares one for its TLS session cache). */
  agent?: https.Agent;
  /** Staging file; its content is replaced. */
  file: string;
  /** Size announced in `firmware_update`. */
  size: number;
  /** Connections to try before giving up (resuming with Range each time). */
  maxAttempts?: number;
  retryDelayMs?: (attempt: number) => number;
  onProgress?: (bytes: number, total: number) => void;
  signal?: AbortSignal;
  faults?: DownloadFaults;
}

export interface DownloadResult {
  sha256: string;
  size: number;
  /** Body bytes received over every attempt (> size when a resume re-fetched something). */
  bytesFetched: number;
  attempts: number;
}

export type DownloadErrorCode = 'URL_REFUSED' | 'NOT_FOUND' | 'TOO_LARGE' | 'GAVE_UP' | 'ABORTED';

export class DownloadError extends Error {
  constructor(
    readonly code: DownloadErrorCode,
    message: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = 'DownloadError';
  }
}

/**
 * Streams a firmware image into `file` over mutual TLS, hashing what reaches the disk. A dropped
 * connection resumes with `Range: bytes=<have>-` (and `If-Range` on the ETag), so a flaky link
 * re-fetches little. 403 (expired or refused URL) and 404 fail at once: retrying cannot help.
 */
export async function downloadFirmware(options: DownloadOptions): Promise<DownloadResult> {
  const maxAttempts = options.maxAttempts ?? 6;
  const retryDelay = options.retryDelayMs ?? ((n: number) => Math.min(200 * 2 ** (n - 1), 5000));
  const handle = await open(options.file, 'w');
  const state: SinkState = { have: 0, hash: createHash('sha256'), fetched: 0, etag: undefined };
  let dropAt = options.faults?.dropAfterBytes;
  let lastError: Error | undefined;
  try {
    for (let attempt = 1; attempt <= maxAttempts; attempt++) {
      if (options.signal?.aborted) throw new DownloadError('ABORTED', 'the download was cancelled');
      try {
        const response = await request(options, state);
        const outcome = await consume(response, options, state, handle, dropAt);
        dropAt = undefined; // inject the drop once
        if (outcome === 'complete') {
          return { sha256: state.hash.digest('hex'), size: state.have, bytesFetched: state.fetched, attempts: attempt };
        }
        lastError = new Error('the connection closed before the whole image arrived');
      } catch (err) {
        if (err instanceof DownloadError) throw err;
        dropAt = undefined;
        lastError = err as Error;
      }
      if (attempt < maxAttempts)
        await sleep(retryDelay(attempt), undefined, { signal: options.signal }).catch(() => undefined);
    }
  } finally {
    await handle.close();
  }
  throw new DownloadError(
    'GAVE_UP',
    `download failed after ${maxAttempts} attempts (${state.have} of ${options.size} bytes): ${lastError?.message ?? 'unknown error'}; check the device's network link to the server`,
  );
}

interface SinkState {
  have: number;
  hash: Hash;
  fetched: number;
  etag: string | undefined;
}

function request(options: DownloadOptions, state: SinkState): Promise<IncomingMessage> {
  const headers: Record<string, string> = {};
  if (state.have > 0) {
    headers.range = `bytes=${state.have}-`;
    if (state.etag) headers['if-range'] = state.etag;
  }
  return new Promise((resolve, reject) => {
    const req = https.request(options.url, {
      method: 'GET',
      headers,
      cert: options.tls.cert,
      key: options.tls.key,
      ca: options.tls.ca,
      servername: options.tls.servername,
      agent: options.agent,
      signal: options.signal,
    });
    req.once('response', resolve);
    req.once('error', reject);
    req.end();
  });
}

/** Writes one response into the staging file; 'complete' when the whole image is there. */
async function consume(
  response: IncomingMessage,
  options: DownloadOptions,
  state: SinkState,
  handle: FileHandle,
  dropAt: number | undefined,
): Promise<'complete' | 'partial'> {
  const status = response.statusCode ?? 0;
  if (status === 403) {
    response.resume();
    throw new DownloadError(
      'URL_REFUSED',
      'the server refused the download URL (403: expired, tampered with, or firmware of another product)',
      403,
    );
  }
  if (status === 404) {
    response.resume();
    throw new DownloadError(
      'NOT_FOUND',
      'the firmware image is not on the server (404); ask an operator to upload it again',
      404,
    );
  }
  if (status === 416) {
    response.resume();
    // Nothing left to send: we already have everything, or our partial file is wrong.
    if (state.have === options.size) return 'complete';
    await restart(state, handle);
    return 'partial';
  }
  if (status === 200) {
    if (state.have > 0) await restart(state, handle); // the server ignored Range (or the image changed)
  } else if (status === 206) {
    const start = /^bytes (\d+)-/.exec(String(response.headers['content-range'] ?? ''))?.[1];
    if (Number(start) !== state.have) {
      response.resume();
      await restart(state, handle);
      return 'partial';
    }
  } else {
    response.resume();
    throw new Error(`the server answered HTTP ${status}`);
  }
  state.etag = typeof response.headers.etag === 'string' ? response.headers.etag : state.etag;

  const faults = options.faults;
  let corruptPending = faults?.corrupt === true;
  let receivedThisAttempt = 0;
  const startedAt = Date.now();
  const sink = new Writable({
    highWaterMark: 256 * 1024,
    write(chunk: Buffer, _enc, callback) {
      void (async () => {
        if (state.have + chunk.length > options.size) {
          throw new DownloadError(
            'TOO_LARGE',
            `the server sent more than the announced ${options.size} bytes; the image does not match its update message`,
          );
        }
        state.fetched += chunk.length;
        let data = chunk;
        // Injected cut: keep only the bytes before the cut point, then drop the connection.
        const cut = dropAt !== undefined && receivedThisAttempt + data.length >= dropAt;
        if (cut) data = data.subarray(0, Math.max(0, dropAt! - receivedThisAttempt));
        if (corruptPending) {
          data = Buffer.from(chunk);
          data[data.length >> 1]! ^= 0xff;
          corruptPending = false;
        }
        if (data.length > 0) await handle.write(data, 0, data.length, state.have);
        // Hash only what is on disk, so a resume continues the digest exactly.
        state.hash.update(data);
        state.have += data.length;
        receivedThisAttempt += data.length;
        options.onProgress?.(state.have, options.size);
        if (cut) response.destroy(new Error('connection dropped (injected fault)'));
        if (faults?.kbps) {
          const due = startedAt + (receivedThisAttempt * 8) / faults.kbps;
          const wait = due - Date.now();
          if (wait > 0) await sleep(wait);
        }
      })().then(() => callback(), callback);
    },
  });
  try {
    await pipeline(response, sink);
  } catch (err) {
    if (err instanceof DownloadError) throw err;
    return 'partial';
  }
  return state.have === options.size ? 'complete' : 'partial';
}

async function restart(state: SinkState, handle: FileHandle): Promise<void> {
  await handle.truncate(0);
  state.have = 0;
  state.hash = createHash('sha256');
  state.etag = undefined;
}
