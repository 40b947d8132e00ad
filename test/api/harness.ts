/**
 * A real API server for tests: a migrated database (PGlite, or PostgreSQL with DATABASE_URL),
 * the fleet domain on an in-process PubSub, `registerApi` + the operator socket on a Fastify
 * instance listening on an ephemeral port, and helpers to call it with fetch.
 */
import { randomBytes } from 'node:crypto';
import Fastify, { type FastifyInstance } from 'fastify';
import { createPubSub, type PubSubWithStats } from '../../server/channels/index.ts';
import type { Endpoint } from '../../server/channels/endpoint.ts';
import type { DatabaseHandle } from '../../server/db/index.ts';
import { createFirmware, pubsubBus, SYSTEM, type FleetContext } from '../../server/fleet/index.ts';
import { createLogger } from '../../server/log.ts';
import { registerApi, type ApiDeps } from '../../server/api/index.ts';
import { createUser } from '../../server/api/operators.ts';
import { registerOperatorSocket } from '../../server/api/socket.ts';
import type { Role } from '../../server/db/schema.ts';
import { createTestDatabase } from '../helpers/db.ts';

/** The API's error answer, as tests read it. */
export interface ErrorAnswer {
  error: {
    code: string;
    message: string;
    details: { field?: string; device_id?: string; reason?: string; issues: Array<{ path: string }> };
  };
}

/** A list answer. */
export interface Items<T> {
  items: T[];
  total: number;
}

export interface TestApi {
  url: string;
  app: FastifyInstance;
  handle: DatabaseHandle;
  fleet: FleetContext;
  pubsub: PubSubWithStats;
  socket: Endpoint;
  signerCaChanges: number;
  /** Logs in (creating the user first) and returns a JWT. */
  userToken(email: string, role: Role, orgId: string | null): Promise<string>;
  /** Calls the API; `T` is the shape of the JSON answer the caller expects (read, then asserted on). */
  call<T = unknown>(method: string, path: string, token?: string, body?: unknown): Promise<{ status: number; body: T }>;
  /** A firmware record with an image, as an upload would create it. */
  firmware(orgId: string, productId: string, version: string): Promise<{ id: string }>;
  close(): Promise<void>;
}

const PASSWORD = 'correct horse battery staple';

export async function startTestApi(options: Pick<ApiDeps, 'loginThrottle'> = {}): Promise<TestApi> {
  const handle = await createTestDatabase();
  const log = createLogger({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });
  const pubsub = createPubSub({ log });
  const fleet: FleetContext = {
    db: handle.db,
    bus: pubsubBus(pubsub),
    log,
    nodeName: 'test-node',
    firmwareUrl: (f) => `https://127.0.0.1:4001/firmware/${f.id}`,
  };
  const app = Fastify({ logger: false });
  const api: Partial<TestApi> = { signerCaChanges: 0 };
  const secret = randomBytes(32).toString('base64url');
  await registerApi(app, {
    fleet,
    db: handle.db,
    log,
    pubsub,
    secret,
    onSignerCasChanged: () => void api.signerCaChanges!++,
    disconnectOperatorSocket: (id, reason) => socket.disconnect(id, reason),
    ...options,
  });
  const socket = await registerOperatorSocket(app, { db: handle.db, secret, pubsub, log });
  await app.listen({ port: 0, host: '127.0.0.1' });
  const address = app.server.address();
  if (!address || typeof address === 'string') throw new Error('no TCP address');
  const url = `http://127.0.0.1:${address.port}`;

  async function call<T>(
    method: string,
    path: string,
    token?: string,
    body?: unknown,
  ): Promise<{ status: number; body: T }> {
    const headers: Record<string, string> = {};
    if (token) headers.authorization = `Bearer ${token}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(url + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : undefined };
  }

  return Object.assign(api, {
    url,
    app,
    handle,
    fleet,
    pubsub,
    socket,
    call,
    async userToken(email: string, role: Role, orgId: string | null) {
      await createUser(handle.db, { email, password: PASSWORD, role, orgId });
      const res = await call<{ token: string }>('POST', '/api/v1/auth/login', undefined, { email, password: PASSWORD });
      if (res.status !== 200) throw new Error(`login failed: ${JSON.stringify(res.body)}`);
      return res.body.token;
    },
    async firmware(orgId: string, productId: string, version: string) {
      const sha256 = randomBytes(32).toString('hex');
      return createFirmware(fleet, SYSTEM, { orgId, productId, version, sha256, size: 1024, hasBlob: true });
    },
    async close() {
      await app.close();
      await pubsub.close();
      await handle.close();
    },
  }) as TestApi;
}

export { PASSWORD };
