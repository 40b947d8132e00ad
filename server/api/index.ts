/**
 * The operator REST API: `/api/v1/...` (JWT or API token bearer, roles, org scoping), the
 * OpenAPI document and UI at `/api/docs`, and `/livez`, `/readyz` (and `/healthz`, the same as `/readyz`). Routes are thin: validate by schema,
 * check the principal, call server/fleet or server/identity, answer.
 */
import type { FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { PubSub } from '../channels/types.ts';
import type { Db } from '../db/index.ts';
import type { FleetContext } from '../fleet/index.ts';
import type { Logger } from '../log.ts';
import { registerAuth, type OperatorAuth } from './auth.ts';
import type { LoginThrottleOptions } from './login-throttle.ts';
import { apiErrorHandler, apiNotFoundHandler } from '../http/errors.ts';
import { registerInputGate } from '../input-gate.ts';
import { schemas } from '../http/schemas.ts';
import { registerSessionRoutes } from './routes/session.ts';
import { registerOrgRoutes } from './routes/orgs.ts';
import { registerDeviceRoutes } from './routes/devices.ts';
import { registerGroupRoutes } from './routes/groups.ts';
import { registerCatalogRoutes } from './routes/catalog.ts';
import { registerWebhookRoutes } from './routes/webhooks.ts';
import { registerDeploymentRoutes } from './routes/deployments.ts';
import type { WebhookService } from '../webhooks/index.ts';

export interface ApiDeps {
  fleet: FleetContext;
  db: Db;
  log: Logger;
  pubsub: PubSub;
  /** HS256 key for operator JWTs. */
  secret: string;
  /** Called after a signer CA is added or removed so the device listener refreshes its trust. */
  onSignerCasChanged?: () => void | Promise<void>;
  /** The firmware blob store: deleting a firmware record removes its image when nothing else shares it. */
  blobs?: { delete(sha256: string): Promise<boolean> };
  /**
   * Closes live operator sockets on every node (the operator endpoint's `disconnect`), called
   * after a user is disabled, deleted or changes role, or an API token is revoked. Wired after
   * the socket exists, hence a function; without it live sockets outlive those changes.
   */
  disconnectOperatorSocket?: (socketId: string, reason: string) => Promise<void>;
  /** Webhook subscriptions and deliveries (`/orgs/:org/webhooks`); without it those routes are absent. */
  webhooks?: WebhookService;
  /** This listener's base URL, for the OpenAPI document's `servers` (default http://127.0.0.1:4000). */
  publicUrl?: () => string;
  /** Failed-login limits per account and per client address (defaults: 10 and 50 per 15 min). */
  loginThrottle?: LoginThrottleOptions;
  /** Readiness probe for /readyz and /healthz (defaults to a `SELECT 1`). */
  healthy?: () => Promise<boolean>;
}

/** What a route module receives. */
export interface RouteDeps extends ApiDeps {
  auth: OperatorAuth;
}

/** A function that registers more routes inside the `/api/v1` scope (e.g. firmware upload). */
export type ApiPlugin = (api: FastifyInstance, deps: RouteDeps) => Promise<void>;

export const API_PREFIX = '/api/v1';

/** The OpenAPI document's tags, in the order the docs UI shows them. */
const API_TAGS = [
  { name: 'health', description: 'Liveness and readiness' },
  { name: 'auth', description: 'Logging in and who the caller is' },
  { name: 'users', description: 'Operator accounts (admin only)' },
  { name: 'tokens', description: 'API tokens for scripts and CI' },
  { name: 'orgs', description: 'Organizations' },
  { name: 'products', description: 'Products: the kinds of device an organization builds' },
  { name: 'signer CAs', description: 'CAs whose device certificates an organization accepts' },
  { name: 'devices', description: 'Devices, their certificates and approval' },
  { name: 'groups', description: 'Groups of devices and their members' },
  { name: 'firmware', description: 'Firmware images, their records and signing keys' },
  { name: 'targets', description: 'Which firmware groups and devices should run' },
  { name: 'updates', description: 'Update attempts: the persisted update state machine' },
  { name: 'deployments', description: 'Phased rollouts: stages, thresholds, pacing, pause and abort' },
  { name: 'status', description: 'Counts by running version, connection and update state' },
  { name: 'audit', description: 'The audit log' },
  { name: 'webhooks', description: "Signed HTTP deliveries of fleet events to operators' receivers" },
  { name: 'main-server', description: 'The Main Server edge (Raspberry Pi REST protocol)' },
  { name: 'keyauth', description: 'The public-key TCP edge' },
  { name: 'grisp', description: 'The GRiSP edge (JSON-RPC over WebSocket)' },
  { name: 'wifidogx', description: 'The WiFiDogX gateway edge' },
];

/**
 * Mounts the API on `app` (the root instance: the auth decoration and OpenAPI hooks must see
 * every route). `extra` plugins run inside the `/api/v1` scope with the same error handling.
 */
export async function registerApi(app: FastifyInstance, deps: ApiDeps, extra: ApiPlugin[] = []): Promise<void> {
  // Before any route: strings with NUL or lone surrogates are refused on every route of this listener.
  registerInputGate(app);
  const auth = registerAuth(app, { db: deps.db, secret: deps.secret });
  const routeDeps: RouteDeps = { ...deps, auth };

  for (const schema of schemas) if (!app.getSchema(schema.$id)) app.addSchema(schema);

  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'fleethub operator API',
        description:
          'Fleet management for over-the-air updates. Authenticate with `POST /api/v1/auth/login` (JWT, 12 h) or an API token (`POST /api/v1/tokens`), then send `Authorization: Bearer <token>`. Errors are `{"error": {"code", "message", "details"}}` (schema `ApiErrorBody`). Lists take `limit` (1–1000, default 100) and `offset` and answer `{items, total}`. A typed client generated from this document is exported as `fleethub/client`.',
        version: '1.0.0',
        license: { name: 'Apache-2.0', url: 'https://www.apache.org/licenses/LICENSE-2.0' },
        contact: { name: 'fleethub maintainers' },
      },
      tags: API_TAGS,
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
    // Shared schemas keep their `$id` as their component name (not def-0, def-1, ...).
    refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => String(json.$id ?? `Schema${i}`) },
    // Only the API belongs in the document (the dashboard and device endpoints share the listener).
    transform: ({ schema, url }) => {
      const documented = url.startsWith('/api/v1') || ['/healthz', '/livez', '/readyz'].includes(url);
      return { schema: documented ? schema : { ...(schema ?? {}), hide: true }, url } as never;
    },
    // The server that serves the document is the one to call (known once listening).
    transformObject: (document) => ({
      ...('openapiObject' in document ? document.openapiObject : document.swaggerObject),
      servers: [{ url: deps.publicUrl?.() ?? 'http://127.0.0.1:4000', description: 'this server' }],
    }),
  });
  await app.register(swaggerUi, { routePrefix: '/api/docs' });

  // Liveness: the process answers. Readiness: it should get traffic (database reachable, not draining).
  const ready = async () => (deps.healthy ?? (() => pingDatabase(deps.db)))().catch(() => false);
  const statusSchema = { type: 'object', properties: { status: { type: 'string' } } } as const;
  app.get(
    '/livez',
    {
      logLevel: 'warn',
      schema: {
        operationId: 'getLiveness',
        tags: ['health'],
        summary: 'Liveness: the process is up and its event loop answers',
        description: 'No authentication: 200 `{status: ok}` while the process serves requests.',
        security: [],
        response: { 200: statusSchema },
      },
    },
    async () => ({ status: 'ok' }),
  );
  for (const url of ['/readyz', '/healthz']) {
    app.get(
      url,
      {
        logLevel: 'warn',
        schema: {
          operationId: url === '/readyz' ? 'getReadiness' : 'getHealth',
          tags: ['health'],
          description:
            'No authentication: 200 `{status: ok}` when the database answers and the node is not draining, else 503.',
          summary:
            url === '/readyz'
              ? 'Readiness: 503 while the database is unreachable or the node is draining'
              : 'Readiness (the older name of /readyz)',
          security: [],
          response: { 200: statusSchema, 503: statusSchema },
        },
      },
      async (_request, reply) => {
        const ok = await ready();
        return reply.status(ok ? 200 : 503).send({ status: ok ? 'ok' : 'unavailable' });
      },
    );
  }

  await app.register(
    async (api) => {
      api.setErrorHandler(apiErrorHandler);
      api.setNotFoundHandler(apiNotFoundHandler);
      await registerSessionRoutes(api, routeDeps);
      await registerOrgRoutes(api, routeDeps);
      await registerDeviceRoutes(api, routeDeps);
      await registerGroupRoutes(api, routeDeps);
      await registerCatalogRoutes(api, routeDeps);
      await registerDeploymentRoutes(api, routeDeps);
      if (deps.webhooks) await registerWebhookRoutes(api, routeDeps, deps.webhooks);
      for (const plugin of extra) await plugin(api, routeDeps);
    },
    { prefix: API_PREFIX },
  );
}

async function pingDatabase(db: Db): Promise<boolean> {
  await db.selectNoFrom((eb) => eb.lit(1).as('one')).execute();
  return true;
}

export { requireRole, assertOrgAccess, canAccessOrg, type OperatorPrincipal } from './auth.ts';
export { ApiError } from '../http/errors.ts';
export { createUser } from './operators.ts';
