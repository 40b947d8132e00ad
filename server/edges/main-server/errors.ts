/**
 * The Main Server protocol's error shape: every error is `{"error": "<description>", "details": "<what to do>"}`
 * with 400/401/403/404/409/500. Domain errors (FleetError) and Fastify's own (bad JSON, schema)
 * are mapped here, once, for every `/api/main-server` route.
 */
import type { FastifyReply, FastifyRequest } from 'fastify';

export class MainServerError extends Error {
  constructor(
    readonly status: 400 | 401 | 403 | 404 | 409 | 429 | 500,
    /** Short description (the seed's `error`). */
    readonly error: string,
    /** What happened and what to do (the seed's `details`). */
    readonly details: string,
  ) {
    super(`${error}: ${details}`);
    this.name = 'MainServerError';
  }
}

export interface MainServerErrorBody {
  error: string;
  details: string;
}

const FLEET: Record<string, { status: MainServerError['status']; error: string }> = {
  invalid: { status: 400, error: 'Bad request' },
  not_found: { status: 404, error: 'Not found' },
  conflict: { status: 409, error: 'Conflict' },
  forbidden: { status: 403, error: 'Forbidden' },
};

/** Anything thrown in a route → status and `{error, details}`. */
export function toMainServerError(err: unknown): MainServerError {
  if (err instanceof MainServerError) return err;
  const e = err as { name?: string; code?: string; message?: string; statusCode?: number; validation?: unknown };
  if (e && (e.name === 'FleetError' || e.name === 'IdentityError') && typeof e.code === 'string' && FLEET[e.code]) {
    const m = FLEET[e.code]!;
    return new MainServerError(m.status, m.error, e.message ?? m.error);
  }
  if (e && e.name === 'ApiError' && typeof e.statusCode !== 'number') {
    const status = (err as { status?: number }).status;
    if (status === 401) return new MainServerError(401, 'Unauthorized', e.message ?? 'authentication failed');
    if (status === 403) return new MainServerError(403, 'Forbidden', e.message ?? 'insufficient permissions');
    if (status === 404) return new MainServerError(404, 'Not found', e.message ?? 'not found');
  }
  // The listener's rate limit (listeners/rate-limit.ts): Retry-After is already on the reply.
  if (e && e.statusCode === 429) return new MainServerError(429, 'Too many requests', e.message ?? 'slow down');
  if (
    e &&
    (Array.isArray(e.validation) || (typeof e.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500))
  ) {
    const status = e.statusCode === 413 || e.statusCode === 415 || !e.statusCode ? 400 : e.statusCode;
    return new MainServerError(
      ([400, 401, 403, 404, 409].includes(status) ? status : 400) as MainServerError['status'],
      'Bad request',
      e.message ?? 'the request is invalid',
    );
  }
  return new MainServerError(
    500,
    'Internal server error',
    'the request failed on the server; the server log has the details',
  );
}

export function mainServerErrorHandler(err: unknown, request: FastifyRequest, reply: FastifyReply): void {
  const mapped = toMainServerError(err);
  if (mapped.status >= 500) request.log.error({ err }, 'main-server request failed');
  const body: MainServerErrorBody = { error: mapped.error, details: mapped.details };
  void reply.status(mapped.status).send(body);
}

export function mainServerNotFound(request: FastifyRequest, reply: FastifyReply): void {
  const body: MainServerErrorBody = {
    error: 'Not found',
    details: `no endpoint ${request.method} ${request.url.split('?')[0]}; see docs/edges/main-server.md`,
  };
  void reply.status(404).send(body);
}

export const unauthorized = (details: string) => new MainServerError(401, 'Unauthorized', details);
export const forbidden = (details: string) => new MainServerError(403, 'Forbidden', details);
export const notFound = (details: string) => new MainServerError(404, 'Not found', details);
export const badRequest = (details: string) => new MainServerError(400, 'Bad request', details);
export const conflict = (details: string) => new MainServerError(409, 'Conflict', details);
