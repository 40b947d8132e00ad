import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadConfig, type Config } from '../../server/config.ts';
import { createLogger, type Logger } from '../../server/log.ts';
import { startServer, type RunningServer } from '../../server/main.ts';
import { createUser } from '../../server/api/index.ts';
import { createTestDatabase } from './db.ts';
import { getTestPki } from './pki.ts';

/** One structured log line as tests read it. */
export interface LogLine {
  msg: string;
  reqId?: string;
  url?: string;
  req?: { url: string };
  [field: string]: unknown;
}

export interface TestServer extends RunningServer {
  /** An admin's API token (all orgs) for REST calls. */
  adminToken: string;
  /** The `default` org and product created at bootstrap, with the test PKI's signer CA registered. */
  orgId: string;
  productId: string;
  /** Calls the operator API as the admin; throws on a non-2xx answer with the server's error. */
  call<T = unknown>(method: string, url: string, body?: unknown): Promise<T>;
}

/**
 * The whole server in-process on ephemeral ports: a fresh database (PGlite in memory, or a fresh
 * PostgreSQL schema), the shared test PKI, a temporary data directory. `close()` removes it all.
 */
export async function startTestServer(
  overrides: Partial<Config> = {},
  options: { log?: Logger } = {},
): Promise<TestServer> {
  const pki = await getTestPki();
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-server-'));
  const database = await createTestDatabase();
  const config = loadConfig(
    [],
    {},
    {
      dataDir,
      certsDir: pki.dir,
      host: '127.0.0.1',
      apiPort: 0,
      devicePort: 0,
      keyauthPort: 0,
      devicePublicUrl: 'https://localhost:0',
      nodeName: `test-${process.pid}-${Math.random().toString(36).slice(2, 8)}`,
      logLevel: process.env.FLEETHUB_TEST_LOG_LEVEL ?? 'silent',
      allowedOrigins: ['*'],
      ...overrides,
    },
  );
  const server = await startServer(config, { database, log: options.log ?? createLogger({ level: config.logLevel }) });
  const org = await server.database.db
    .selectFrom('orgs')
    .selectAll()
    .where('name', '=', 'default')
    .executeTakeFirstOrThrow();
  const product = await server.database.db
    .selectFrom('products')
    .selectAll()
    .where('org_id', '=', org.id)
    .where('name', '=', 'default')
    .executeTakeFirstOrThrow();
  const email = `admin-${Math.random().toString(36).slice(2)}@example.com`;
  const password = 'test-password-123456';
  await createUser(server.database.db, { email, password, role: 'admin' });
  const login = await fetch(`${server.apiUrl}/api/v1/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password }),
  });
  if (!login.ok) throw new Error(`test admin login failed: ${login.status} ${await login.text()}`);
  const { token } = (await login.json()) as { token: string };

  async function call<T>(method: string, url: string, body?: unknown): Promise<T> {
    const res = await fetch(`${server.apiUrl}${url}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${url} → ${res.status} ${text}`);
    return (text ? JSON.parse(text) : undefined) as T;
  }

  return {
    ...server,
    adminToken: token,
    orgId: org.id,
    productId: product.id,
    call,
    async close() {
      await server.close();
      await database.close();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
