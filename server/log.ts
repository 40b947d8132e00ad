import { LogController, type FastifyRequest } from 'fastify';
import pino, { type Logger } from 'pino';

export type { Logger };

/**
 * Paths redacted from every log line: keys, tokens, passwords and signed URLs never reach logs.
 * Modules add context with `logger.child({ device_id })`, never secrets.
 */
export const REDACT_PATHS = [
  'password',
  '*.password',
  'token',
  '*.token',
  'key',
  '*.key',
  'privateKey',
  '*.privateKey',
  'secret',
  '*.secret',
  'authorization',
  'req.headers.authorization',
  'req.headers["sec-websocket-protocol"]',
  'req.headers.cookie',
  'headers.authorization',
  'headers["sec-websocket-protocol"]',
  'url_signature',
];

/**
 * The `<expires>/<64 hex hmac>` of a path-signed download URL (`/fw/...`, GRiSP packages): the
 * HMAC is a bearer credential, so request lines keep the path with the signature replaced.
 */
const PATH_SIGNATURE = /(\/\d{1,12}\/)[0-9a-f]{64}(?=\/|$)/gi;

/** A request URL as logged: no query string, no path signature. */
export function loggedUrl(url: string | undefined): string | undefined {
  if (url === undefined) return undefined;
  return url.split('?')[0]!.replace(PATH_SIGNATURE, '$1[redacted]');
}

/** Fastify's log controller, with the "route not found" line's URL as `loggedUrl` makes it (a mistyped path still carries its secrets). */
export class RedactingLogController extends LogController {
  override routeNotFound(request: FastifyRequest): void {
    if (this.isLogDisabled(request)) return;
    request.log.info(`Route ${request.raw.method}:${loggedUrl(request.raw.url)} not found`);
  }
}

export interface LogOptions {
  level?: string;
  name?: string;
  /** Where the JSON lines go (default stdout); tests read them. */
  destination?: pino.DestinationStream;
}

export function createLogger(options: LogOptions = {}): Logger {
  const logOptions: pino.LoggerOptions = {
    name: options.name ?? 'fleethub',
    level: options.level ?? process.env.FLEETHUB_LOG_LEVEL ?? 'info',
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    // Signed download URLs carry an HMAC (in the query or the path): it is never logged.
    serializers: {
      req(req: { id?: string; method?: string; url?: string; socket?: { remoteAddress?: string } }) {
        return { id: req.id, method: req.method, url: loggedUrl(req.url), remote: req.socket?.remoteAddress };
      },
    },
  };
  return options.destination ? pino(logOptions, options.destination) : pino(logOptions);
}

/**
 * A warning that repeats (a pending key retrying, a throttled login): logged at most once per
 * `intervalMs` for each key, with `occurrences` counting every time it happened since the
 * previous line of that key (this one included).
 */
export function rateLimitedWarning(
  log: Logger,
  msg: string,
  intervalMs = 60_000,
): (key: string, fields?: Record<string, unknown>) => void {
  const seen = new Map<string, { last: number; count: number }>();
  return (key, fields = {}) => {
    const now = Date.now();
    const entry = seen.get(key);
    if (entry && now - entry.last < intervalMs) {
      entry.count++;
      return;
    }
    log.warn({ ...fields, occurrences: (entry?.count ?? 0) + 1, interval_s: intervalMs / 1000 }, msg);
    seen.set(key, { last: now, count: 0 });
    // Bounded: past 10,000 keys, those whose interval is over are forgotten (their suppressed count with them).
    if (seen.size > 10_000) for (const [k, e] of seen) if (now - e.last >= intervalMs) seen.delete(k);
  };
}
