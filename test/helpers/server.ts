import { mkdtempSync, rmSync } from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { loadConfig, type Config } from '../../server/config.ts';
import { createLogger, type Logger } from '../../server/log.ts';
import { startServer, type RunningServer } from '../../server/main.ts';
import { createUser } from '../../server/api/index.ts';
import { createTestDatabase } from './db.ts';
import { getTestPki } from './pki.ts';
import { apiCaller } from './api-call.ts';

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
  /** `fetch` that trusts the test PKI's root CA, for an API listener on TLS (`apiTls: true`). */
  fetch(
    url: string,
    init?: { method?: string; headers?: Record<string, string>; body?: string | Uint8Array },
  ): Promise<Response>;
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
  const fetch = (url: string, init: Parameters<TestServer['fetch']>[1] = {}) =>
    url.startsWith('https:')
      ? fetchTrusting(pki.rootCa.certPem, url, init)
      : globalThis.fetch(url, init as RequestInit);
  const login = await fetch(`${server.apiUrl}/api/v1/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password }),
  });
  if (!login.ok) throw new Error(`test admin login failed: ${login.status} ${await login.text()}`);
  const { token } = (await login.json()) as { token: string };

  const call = apiCaller(server.apiUrl, token, fetch);

  return {
    ...server,
    adminToken: token,
    orgId: org.id,
    productId: product.id,
    call,
    fetch,
    async close() {
      await server.close();
      await database.close();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** An HTTPS request trusting `ca`, answered as a `Response` (global fetch cannot be given a CA on Node 20). */
function fetchTrusting(ca: string, url: string, init: Parameters<TestServer['fetch']>[1] = {}): Promise<Response> {
  return new Promise((resolve, reject) => {
    const req = https.request(url, { method: init.method ?? 'GET', headers: init.headers, ca, agent: false });
    req.once('error', reject);
    req.once('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.once('error', reject);
      res.once('end', () => {
        const headers = new Headers();
        for (const [name, value] of Object.entries(res.headers))
          for (const v of Array.isArray(value) ? value : value === undefined ? [] : [value]) headers.append(name, v);
        const status = res.statusCode ?? 0;
        const body = status === 204 || status === 304 ? null : Buffer.concat(chunks);
        resolve(new Response(body, { status, headers }));
      });
    });
    req.end(init.body);
  });
}
