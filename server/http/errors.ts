/**
 * One error shape for the whole operator API: `{ error: { code, message, details? } }`.
 * Route handlers throw `ApiError` (or the domain's `FleetError`); `apiErrorHandler` maps both,
 * Fastify's schema validation errors and anything unexpected to a status code and that shape.
 */
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';

export type ApiErrorCode =
  | 'invalid'
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'conflict'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'internal'
  | (string & {});

/** An error a route answers with: HTTP status, stable machine code, message telling the user what to do. */
export class ApiError extends Error {
  override readonly name = 'ApiError';
  constructor(
    readonly status: number,
    readonly code: ApiErrorCode,
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
  }
}

export interface ErrorBody {
  error: { code: string; message: string; details?: Record<string, unknown> };
}

/** The domain's error codes and the HTTP status each means. */
const FLEET_STATUS: Record<string, number> = {
  not_found: 404,
  conflict: 409,
  invalid: 400,
  forbidden: 403,
};

/** Converts anything thrown in a route into a status and the API error body. */
export function toErrorResponse(err: unknown): { status: number; body: ErrorBody } {
  if (err instanceof ApiError) {
    return { status: err.status, body: body(err.code, err.message, err.details) };
  }
  const e = err as Partial<FastifyError> & { name?: string; code?: string; details?: unknown };
  // Domain errors (server/fleet FleetError, server/identity IdentityError) are matched by name so
  // this module depends on neither.
  if (
    e &&
    (e.name === 'FleetError' || e.name === 'IdentityError') &&
    typeof e.code === 'string' &&
    e.code in FLEET_STATUS
  ) {
    const details = isRecord(e.details) ? e.details : undefined;
    return { status: FLEET_STATUS[e.code]!, body: body(e.code, e.message ?? e.code, details) };
  }
  if (e && Array.isArray(e.validation)) {
    const issues = e.validation.map((v) => ({
      path: `${e.validationContext ?? 'body'}${v.instancePath ?? ''}`,
      message: v.message ?? 'is invalid',
      ...(v.params ? { params: v.params } : {}),
    }));
    return { status: 400, body: body('invalid', e.message ?? 'request is invalid', { issues }) };
  }
  if (e && typeof e.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
    // The input gate's InvalidStringError names the field in `details`.
    return {
      status: e.statusCode,
      body: body(codeForStatus(e.statusCode), e.message ?? 'bad request', isRecord(e.details) ? e.details : undefined),
    };
  }
  return { status: 500, body: body('internal', 'internal server error; the server log has the details') };
}

/** Fastify error handler producing `{error: {code, message, details?}}`. */
export function apiErrorHandler(
  this: FastifyInstance,
  err: unknown,
  request: FastifyRequest,
  reply: FastifyReply,
): void {
  const { status, body: payload } = toErrorResponse(err);
  if (status >= 500) request.log.error({ err }, 'request failed');
  void reply.status(status).send(payload);
}

/** Answers unknown routes under the API prefix in the same shape. */
export function apiNotFoundHandler(request: FastifyRequest, reply: FastifyReply): void {
  void reply
    .status(404)
    .send(body('not_found', `no route ${request.method} ${request.url.split('?')[0]}; see /api/docs`));
}

/** JSON schema of the error body, for every route's non-2xx responses. */
export const errorSchema = {
  $id: 'ApiErrorBody',
  type: 'object',
  required: ['error'],
  properties: {
    error: {
      type: 'object',
      required: ['code', 'message'],
      properties: {
        code: { type: 'string' },
        message: { type: 'string' },
        details: { type: 'object', additionalProperties: true },
      },
    },
  },
} as const;

function body(code: string, message: string, details?: Record<string, unknown>): ErrorBody {
  return { error: details ? { code, message, details } : { code, message } };
}

function codeForStatus(status: number): string {
  switch (status) {
    case 400:
      return 'invalid';
    case 401:
      return 'unauthorized';
    case 403:
      return 'forbidden';
    case 404:
      return 'not_found';
    case 409:
      return 'conflict';
    case 413:
      return 'payload_too_large';
    case 415:
      return 'unsupported_media_type';
    default:
      return 'invalid';
  }
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Routes an edge (or any module) mounts inside the operator API's `/api/v1` scope (`registerApi`'s extra list). */
export type RoutePlugin = (api: FastifyInstance) => Promise<void>;
