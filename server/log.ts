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
    // Signed download URLs carry an HMAC: log the path only.
    serializers: {
      req(req: { id?: string; method?: string; url?: string; socket?: { remoteAddress?: string } }) {
        return { id: req.id, method: req.method, url: req.url?.split('?')[0], remote: req.socket?.remoteAddress };
      },
    },
  };
  return options.destination ? pino(logOptions, options.destination) : pino(logOptions);
}
