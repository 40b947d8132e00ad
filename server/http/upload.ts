/** Streamed uploads (firmware images, packages): the body is never buffered. */
import type { IncomingMessage } from 'node:http';
import type { FastifyRequest } from 'fastify';
import { ApiError } from './errors.ts';

/** A content-type parser that hands the raw request stream to the route (uploads are streamed, never buffered). */
export function passThroughStream(
  _request: FastifyRequest,
  payload: IncomingMessage,
  done: (err: Error | null, body?: unknown) => void,
): void {
  done(null, payload);
}

/** The streamed request body of an upload route, or 415 naming the type to send (no body, or a parsed one). */
export function uploadStream(request: FastifyRequest, what: string, contentType: string): IncomingMessage {
  const body = request.body as { pipe?: unknown } | undefined;
  if (typeof body?.pipe !== 'function')
    throw new ApiError(
      415,
      'unsupported_media_type',
      `send the ${what} as the request body with Content-Type: ${contentType}`,
    );
  return body as IncomingMessage;
}
