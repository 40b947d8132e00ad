/**
 * Rate limits on the device-facing HTTP routes of the edges (Main Server REST, WiFiDogX upgrades
 * and downloads, GRiSP upgrades): @fastify/rate-limit counts requests per client address and
 * route in a one-minute window; past the limit a request gets 429 with Retry-After before any
 * route code runs. Other routes of the listener (the operator API, Phoenix devices) are not
 * counted here.
 */
import rateLimit from '@fastify/rate-limit';
import type { FastifyInstance } from 'fastify';
import { rateLimitedWarning, type Logger } from '../log.ts';

export interface DeviceRouteLimitOptions {
  /** URL prefixes whose routes are limited. */
  prefixes: readonly string[];
  /** Requests per client address and route per minute (0: no limit). */
  perMinute: number;
  log: Logger;
}

/** Registers the limit on `app`; call before the limited routes are added. */
export async function limitDeviceRoutes(app: FastifyInstance, options: DeviceRouteLimitOptions): Promise<void> {
  if (options.perMinute <= 0) return;
  const warn = rateLimitedWarning(options.log, 'device requests refused by the rate limit', 60_000);
  await app.register(rateLimit, {
    global: true,
    max: options.perMinute,
    timeWindow: 60_000,
    hook: 'onRequest',
    allowList: (request) => !options.prefixes.some((prefix) => request.url.startsWith(prefix)),
    // Per route: a site's gateways behind one NAT address polling one route do not starve its other routes.
    keyGenerator: (request) => `${request.ip} ${request.routeOptions.url ?? ''}`,
    onExceeded: (request) => warn(request.ip, { remote: request.ip, url: request.url.split('?')[0] }),
    errorResponseBuilder: (_request, context) =>
      Object.assign(new Error(`too many requests from this address: try again in ${context.after}`), {
        statusCode: 429,
        code: 'too_many_requests',
      }),
  });
}
