/**
 * The authorization matrix, generated from the API listener's route table: every route × every
 * kind of caller (nobody, viewer, operator, admin, an API token, another org's admin, an
 * instance admin) answers the status class its guard promises. The role each route declares
 * (its `requireRole` onRequest hook) is checked against the explicit list below, so a route that
 * silently loses its guard, or a new route nobody classified, fails here.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { createUser } from '../../server/api/index.ts';
import type { Role } from '../../server/db/schema.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

/**
 * What each route demands. A role: the `/api/v1` (and Main Server operator) guard; `instance`:
 * admins without an org; `device`: a Main Server device token; `public`: anyone; `credential`:
 * its own credential (signed URL, socket token), covered by its own tests.
 */
const LOGOUT = 'DELETE /api/v1/auth/session';
type Guard = Role | 'instance' | 'device' | 'public' | 'credential';

const ROUTES: Record<string, Guard> = {
  'GET /api/docs': 'public',
  'HEAD /api/docs/': 'public',
  'GET /api/docs/static/index.html': 'public',
  'GET /api/docs/static/swagger-initializer.js': 'public',
  'GET /api/docs/json': 'public',
  'GET /api/docs/yaml': 'public',
  'GET /api/docs/static/*': 'public',
  'GET /healthz': 'public',
  'GET /livez': 'public',
  'GET /readyz': 'public',
  'GET /metrics': 'credential',
  'GET /': 'public',
  'GET /ui/vendor/phoenix.mjs': 'public',
  'GET /ui/:file': 'public',
  'POST /api/v1/auth/login': 'public',
  'POST /api/main-server/register-device': 'public',
  'GET /socket/websocket': 'credential',
  'GET /socket/longpoll': 'credential',
  'POST /socket/longpoll': 'credential',
  'GET /ws/wifidogx': 'credential',
  'GET /fw/:id/:device/:expires/:sig': 'credential',
  'GET /api/keyauth/firmware/:id': 'credential',

  'GET /api/v1/auth/me': 'viewer',
  // Called last for each caller: it ends the caller's session.
  [LOGOUT]: 'viewer',
  'GET /api/v1/users': 'admin',
  'POST /api/v1/users': 'admin',
  'PATCH /api/v1/users/:id': 'admin',
  'DELETE /api/v1/users/:id': 'admin',
  'GET /api/v1/tokens': 'viewer',
  'POST /api/v1/tokens': 'viewer',
  'DELETE /api/v1/tokens/:id': 'viewer',
  'GET /api/v1/orgs': 'viewer',
  'POST /api/v1/orgs': 'instance',
  'GET /api/v1/orgs/:org': 'viewer',
  'GET /api/v1/orgs/:org/products': 'viewer',
  'POST /api/v1/orgs/:org/products': 'admin',
  'GET /api/v1/orgs/:org/products/:product': 'viewer',
  'PATCH /api/v1/orgs/:org/products/:product': 'admin',
  'GET /api/v1/orgs/:org/signer-cas': 'viewer',
  'POST /api/v1/orgs/:org/signer-cas': 'admin',
  'DELETE /api/v1/orgs/:org/signer-cas/:id': 'admin',
  'GET /api/v1/orgs/:org/audit': 'viewer',
  'GET /api/v1/audit': 'instance',
  'GET /api/v1/orgs/:org/devices': 'viewer',
  'POST /api/v1/orgs/:org/devices': 'operator',
  'GET /api/v1/orgs/:org/devices/:device': 'viewer',
  'PATCH /api/v1/orgs/:org/devices/:device': 'operator',
  'DELETE /api/v1/orgs/:org/devices/:device': 'operator',
  'GET /api/v1/orgs/:org/devices/:device/certificates': 'viewer',
  'POST /api/v1/orgs/:org/devices/:device/certificates': 'operator',
  'POST /api/v1/orgs/:org/devices/:device/certificates/:id/revoke': 'operator',
  'POST /api/v1/orgs/:org/devices/:device/approve': 'operator',
  'POST /api/v1/orgs/:org/devices/:device/revoke': 'operator',
  'GET /api/v1/orgs/:org/devices/:device/updates': 'viewer',
  'GET /api/v1/orgs/:org/groups': 'viewer',
  'POST /api/v1/orgs/:org/groups': 'operator',
  'GET /api/v1/orgs/:org/groups/:group': 'viewer',
  'PATCH /api/v1/orgs/:org/groups/:group': 'operator',
  'DELETE /api/v1/orgs/:org/groups/:group': 'operator',
  'GET /api/v1/orgs/:org/groups/:group/devices': 'viewer',
  'POST /api/v1/orgs/:org/groups/:group/devices': 'operator',
  'POST /api/v1/orgs/:org/groups/:group/devices/remove': 'operator',
  'GET /api/v1/orgs/:org/groups/:group/updates': 'viewer',
  'GET /api/v1/orgs/:org/firmware': 'viewer',
  'GET /api/v1/orgs/:org/firmware/:id': 'viewer',
  'DELETE /api/v1/orgs/:org/firmware/:id': 'operator',
  'GET /api/v1/orgs/:org/targets': 'viewer',
  'GET /api/v1/orgs/:org/webhooks': 'operator',
  'POST /api/v1/orgs/:org/webhooks': 'admin',
  'GET /api/v1/orgs/:org/webhooks/:id': 'operator',
  'PATCH /api/v1/orgs/:org/webhooks/:id': 'admin',
  'DELETE /api/v1/orgs/:org/webhooks/:id': 'admin',
  'GET /api/v1/orgs/:org/webhooks/:id/deliveries': 'operator',
  'POST /api/v1/orgs/:org/deployments': 'operator',
  'GET /api/v1/orgs/:org/deployments': 'viewer',
  'GET /api/v1/orgs/:org/deployments/:id': 'viewer',
  'POST /api/v1/orgs/:org/deployments/:id/pause': 'operator',
  'POST /api/v1/orgs/:org/deployments/:id/resume': 'operator',
  'POST /api/v1/orgs/:org/deployments/:id/abort': 'operator',
  'POST /api/v1/orgs/:org/deployments/:id/approve': 'operator',
  'GET /api/v1/orgs/:org/deployments/:id/devices': 'viewer',
  'PUT /api/v1/orgs/:org/groups/:group/target': 'operator',
  'DELETE /api/v1/orgs/:org/groups/:group/target': 'operator',
  'PUT /api/v1/orgs/:org/devices/:device/target': 'operator',
  'DELETE /api/v1/orgs/:org/devices/:device/target': 'operator',
  'GET /api/v1/orgs/:org/status': 'viewer',
  'GET /api/v1/orgs/:org/status/devices': 'viewer',
  'GET /api/v1/orgs/:org/groups/:group/status': 'viewer',
  'POST /api/v1/firmware': 'operator',
  'GET /api/v1/products/:id/signing-keys': 'viewer',
  'POST /api/v1/products/:id/signing-keys': 'admin',
  'DELETE /api/v1/products/:id/signing-keys/:key': 'admin',
  'GET /api/v1/main-server/devices': 'viewer',
  'POST /api/v1/main-server/devices': 'operator',
  'POST /api/v1/main-server/devices/:device/approve': 'operator',
  'POST /api/v1/main-server/devices/:device/revoke': 'operator',
  'POST /api/v1/main-server/devices/:device/token': 'operator',
  'GET /api/v1/main-server/extensions': 'viewer',
  'POST /api/v1/main-server/packages': 'operator',
  'GET /api/v1/keyauth/clients': 'viewer',
  'POST /api/v1/keyauth/clients/:fingerprint/approve': 'operator',
  'POST /api/v1/keyauth/clients/:fingerprint/revoke': 'operator',
  'GET /api/v1/orgs/:org/devices/:device/logs': 'viewer',
  'GET /api/v1/orgs/:org/devices/:device/grisp': 'viewer',
  'POST /api/v1/orgs/:org/grisp/link-tokens': 'operator',
  'DELETE /api/v1/orgs/:org/devices/:device/link': 'operator',
  'POST /api/v1/grisp/firmware': 'operator',
  'POST /api/v1/orgs/:org/wifidogx/devices/:device/approve': 'operator',
  'POST /api/v1/orgs/:org/wifidogx/devices/:device/revoke': 'operator',
  'POST /api/v1/orgs/:org/wifidogx/devices/:device/release': 'operator',
  'POST /api/v1/orgs/:org/wifidogx/devices/:device/credential': 'operator',
  'GET /api/v1/orgs/:org/wifidogx/devices/:device': 'viewer',
  'GET /api/v1/orgs/:org/wifidogx/devices/:device/commands': 'viewer',
  'PUT /api/v1/orgs/:org/wifidogx/devices/:device/gateways/:gw/auth-mode': 'operator',
  'POST /api/v1/orgs/:org/wifidogx/devices/:device/commands': 'operator',
  'GET /api/main-server/updates': 'viewer',
  'POST /api/main-server/schedule-update': 'operator',
  'POST /api/main-server/deploy-update': 'operator',
  'GET /api/main-server/devices': 'viewer',
  'GET /api/main-server/download-update': 'viewer',
  'POST /api/main-server/update-status': 'device',
  'POST /api/main-server/heartbeat': 'device',
};

const RANK: Record<Role, number> = { viewer: 1, operator: 2, admin: 3 };

/** Routes whose path names a resource of the org under test: another org's caller sees 404. */
const ORG_SCOPED = /\/:org\b|\/products\/:id\b|\/main-server\/|\/keyauth\//;

interface Caller {
  name: string;
  token: string | undefined;
  /** The role it acts with; undefined for nobody. */
  role?: Role;
  /** Admin of another org, or an instance admin (no org). */
  scope?: 'other-org' | 'instance';
}

let server: TestServer;
const callers: Caller[] = [];
const ids: Record<string, string> = {};

async function login(email: string, role: Role, orgId: string | null): Promise<string> {
  const password = 'matrix-password-123';
  await createUser(server.database.db, { email, password, role, orgId });
  const res = await fetch(`${server.apiUrl}/api/v1/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password }),
  });
  assert.equal(res.status, 200);
  return ((await res.json()) as { token: string }).token;
}

/** A concrete URL for a route pattern: the org under test's real resources where there are some. */
function concrete(url: string): string {
  return url
    .replace(':org', 'default')
    .replace(':product', 'default')
    .replace(':device', ids.device!)
    .replace(':group', ids.group!)
    .replace('/firmware/:id', `/firmware/${ids.firmware}`)
    .replace('/products/:id', `/products/${ids.product}`)
    .replace(':fingerprint', 'a'.repeat(64))
    .replace(':gw', 'gw-1')
    .replace(/:(id|key)\b/g, () => randomUUID());
}

/** Calls a route as `caller` with a body that fails validation wherever the route has a body schema. */
async function call(method: string, url: string, caller: Caller): Promise<{ status: number; text: string }> {
  const withBody = hasBody(method);
  const res = await fetch(`${server.apiUrl}${url}`, {
    method,
    headers: {
      ...(caller.token ? { authorization: `Bearer ${caller.token}` } : {}),
      ...(withBody ? { 'content-type': 'application/json' } : {}),
    },
    body: withBody ? '["not an object"]' : undefined,
  });
  return { status: res.status, text: await res.text() };
}

/**
 * The statuses `caller` may get from a route with `guard`, or 'allowed' (not 401/403, not 5xx).
 * Roles are checked before the body is parsed; the org and instance checks are the handler's,
 * after validation, so with the invalid body a route that takes one may answer 400 (or 415)
 * there instead: that says nothing about the other org.
 */
function expected(
  guard: Exclude<Guard, 'public' | 'credential'>,
  method: string,
  url: string,
  caller: Caller,
): number[] | 'allowed' {
  if (!caller.token) return [401];
  if (guard === 'device') return [403]; // every caller here is an operator
  const invalidBody = hasBody(method) ? [400, 415] : [];
  if (guard === 'instance') return caller.scope === 'instance' ? 'allowed' : [403, ...invalidBody];
  if (RANK[caller.role!] < RANK[guard]) return [403];
  if (caller.scope === 'other-org' && ORG_SCOPED.test(url)) return [404, ...invalidBody];
  return 'allowed';
}

function hasBody(method: string): boolean {
  return method !== 'GET' && method !== 'HEAD' && method !== 'DELETE';
}

describe(`authorization matrix over the API route table (${DATABASE_KIND})`, () => {
  before(async () => {
    server = await startTestServer();
    const other = await server.call<{ id: string }>('POST', '/api/v1/orgs', { name: 'matrix-other-org' });
    const operatorToken = await login('matrix-operator@example.com', 'operator', server.orgId);
    const apiToken = await fetch(`${server.apiUrl}/api/v1/tokens`, {
      method: 'POST',
      headers: { authorization: `Bearer ${operatorToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'matrix', role: 'operator' }),
    });
    assert.equal(apiToken.status, 201);
    // The other org's admin goes first, so what the others change or delete is still there for it.
    callers.push(
      {
        name: 'other-org admin',
        token: await login('matrix-other@example.com', 'admin', other.id),
        role: 'admin',
        scope: 'other-org',
      },
      { name: 'nobody', token: undefined },
      { name: 'viewer', token: await login('matrix-viewer@example.com', 'viewer', server.orgId), role: 'viewer' },
      { name: 'API token (operator)', token: ((await apiToken.json()) as { token: string }).token, role: 'operator' },
      { name: 'operator', token: operatorToken, role: 'operator' },
      { name: 'org admin', token: await login('matrix-admin@example.com', 'admin', server.orgId), role: 'admin' },
      { name: 'instance admin', token: server.adminToken, role: 'admin', scope: 'instance' },
    );
    ids.product = server.productId;
    ids.device = (
      await server.call<{ identifier: string }>('POST', '/api/v1/orgs/default/devices', {
        product: 'default',
        identifier: 'matrix-device',
      })
    ).identifier;
    ids.group = (
      await server.call<{ name: string }>('POST', '/api/v1/orgs/default/groups', {
        product: 'default',
        name: 'matrix-group',
      })
    ).name;
    const firmware = await fetch(`${server.apiUrl}/api/v1/firmware`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        product: server.productId,
        org: server.orgId,
        version: '1.0.0',
        sha256: 'b'.repeat(64),
        size: 10,
      }),
    });
    assert.equal(firmware.status, 201);
    ids.firmware = ((await firmware.json()) as { id: string }).id;
  });
  after(async () => server.close());

  /** Each route once (Fastify's automatic HEAD routes share their GET's hooks). */
  function routes(): Array<{ key: string; method: string; url: string; role: Role | undefined }> {
    const table = server.api.fleethubRoutes;
    const gets = new Set(table.filter((r) => r.method === 'GET').map((r) => r.url));
    const seen = new Set<string>();
    return table
      .filter((r) => !(r.method === 'HEAD' && gets.has(r.url)))
      .map((r) => ({ ...r, key: `${r.method} ${r.url}` }))
      .filter((r) => !seen.has(r.key) && Boolean(seen.add(r.key)))
      .sort((a, b) => Number(a.key === LOGOUT) - Number(b.key === LOGOUT));
  }

  test('every route of the API listener is in the explicit list, and every listed route exists', () => {
    const keys = routes().map((r) => r.key);
    assert.deepEqual(
      keys.filter((k) => !(k in ROUTES)),
      [],
      'routes nobody classified: add them to ROUTES',
    );
    assert.deepEqual(
      Object.keys(ROUTES).filter((k) => !keys.includes(k)),
      [],
      'listed routes that no longer exist',
    );
  });

  test("each route's declared guard is the role the list expects", () => {
    const wrong = routes()
      .map((r) => {
        const guard = ROUTES[r.key];
        const want =
          guard === 'instance'
            ? 'admin'
            : guard === 'viewer' || guard === 'operator' || guard === 'admin'
              ? guard
              : undefined;
        return r.role === want ? undefined : `${r.key}: declares ${r.role ?? 'no role'}, the list says ${guard}`;
      })
      .filter(Boolean);
    assert.deepEqual(wrong, []);
  });

  test('every guarded route answers each caller with the status its guard promises (anonymous bad bodies: 401)', async () => {
    const failures: string[] = [];
    let calls = 0;
    for (const caller of callers) {
      for (const r of routes()) {
        const guard = ROUTES[r.key];
        if (guard === undefined || guard === 'public' || guard === 'credential') continue;
        const url = concrete(r.url);
        const want = expected(guard, r.method, r.url, caller);
        const got = await call(r.method, url, caller);
        calls++;
        const ok =
          want === 'allowed' ? got.status !== 401 && got.status !== 403 && got.status < 500 : want.includes(got.status);
        if (!ok)
          failures.push(
            `${caller.name} ${r.method} ${url}: want ${String(want)}, got ${got.status} ${got.text.slice(0, 160)}`,
          );
      }
    }
    assert.ok(calls > 500, `${calls} calls`);
    assert.deepEqual(failures, []);
  });

  test('public routes answer nobody without 401 or 403', async () => {
    const failures: string[] = [];
    for (const r of routes()) {
      if (ROUTES[r.key] !== 'public' || r.url.includes('*')) continue;
      const url = concrete(r.url).replace(/\/ui\/[^/]*$/, '/ui/app.js');
      const got = await call(r.method, url, { name: 'nobody', token: undefined });
      if (got.status === 401 || got.status === 403 || got.status >= 500)
        failures.push(`${r.method} ${url}: ${got.status}`);
    }
    assert.deepEqual(failures, []);
  });
});
