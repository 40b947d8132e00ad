import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DATABASE_KIND } from '../helpers/db.ts';
import { type ErrorAnswer, type Items, PASSWORD, startTestApi, type TestApi } from './harness.ts';

/** The parts of the OpenAPI document these tests read. */
interface OpenApiDocument {
  openapi: string;
  paths: Record<string, Record<string, { parameters: Array<{ name: string }>; security: unknown[] }>>;
  components: { securitySchemes: Record<string, unknown> };
}

describe(`operator API authentication and authorisation (${DATABASE_KIND})`, () => {
  let api: TestApi;
  let admin: string;
  let orgA: { id: string; name: string };
  let orgB: { id: string; name: string };

  before(async () => {
    api = await startTestApi();
    admin = await api.userToken('root@example.com', 'admin', null);
    orgA = (await api.call<{ id: string; name: string }>('POST', '/api/v1/orgs', admin, { name: 'acme' })).body;
    orgB = (await api.call<{ id: string; name: string }>('POST', '/api/v1/orgs', admin, { name: 'globex' })).body;
    await api.call('POST', `/api/v1/orgs/${orgA.id}/products`, admin, { name: 'sensor' });
    await api.call('POST', `/api/v1/orgs/${orgB.id}/products`, admin, { name: 'router' });
  });
  after(() => api.close());

  test('login with the right password returns a JWT that authenticates later requests', async () => {
    const login = await api.call<{ token: string; expires_at: string }>('POST', '/api/v1/auth/login', undefined, {
      email: 'root@example.com',
      password: PASSWORD,
    });
    assert.equal(login.status, 200);
    assert.match(login.body.token, /^[\w-]+\.[\w-]+\.[\w-]+$/);
    assert.ok(Date.parse(login.body.expires_at) > Date.now() + 11 * 3600_000);
    const me = await api.call<{ user: { email: string }; role: string; org_id: string | null }>(
      'GET',
      '/api/v1/auth/me',
      login.body.token,
    );
    assert.equal(me.status, 200);
    assert.equal(me.body.user.email, 'root@example.com');
    assert.equal(me.body.role, 'admin');
    assert.equal(me.body.org_id, null);
  });

  test('login with a wrong password or an unknown email is refused with 401 and the error shape', async () => {
    for (const body of [
      { email: 'root@example.com', password: 'wrong password' },
      { email: 'nobody@example.com', password: PASSWORD },
    ]) {
      const res = await api.call<ErrorAnswer>('POST', '/api/v1/auth/login', undefined, body);
      assert.equal(res.status, 401);
      assert.equal(res.body.error.code, 'unauthorized');
      assert.equal(typeof res.body.error.message, 'string');
    }
  });

  test('requests without a bearer or with a forged one get 401', async () => {
    assert.equal((await api.call('GET', '/api/v1/orgs')).status, 401);
    const forged = (
      await api.call<ErrorAnswer>('GET', '/api/v1/orgs', 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl')
    ).body;
    assert.equal(forged.error.code, 'unauthorized');
    assert.equal((await api.call('GET', '/api/v1/orgs', 'fht_not-a-real-token')).status, 401);
  });

  test('an API token is shown once, authenticates, is listed without its secret, and stops working when revoked', async () => {
    const operator = await api.userToken('ops@acme.example', 'operator', orgA.id);
    const created = await api.call<{ token: string; api_token: { id: string; role: string; org_id: string } }>(
      'POST',
      '/api/v1/tokens',
      operator,
      { name: 'ci' },
    );
    assert.equal(created.status, 201);
    const token: string = created.body.token;
    assert.match(token, /^fht_/);
    assert.equal(created.body.api_token.role, 'operator');
    assert.equal(created.body.api_token.org_id, orgA.id);

    const orgs = await api.call<Items<{ name: string }>>('GET', '/api/v1/orgs', token);
    assert.equal(orgs.status, 200);
    assert.deepEqual(
      orgs.body.items.map((o) => o.name),
      ['acme'],
    );

    const listed = await api.call<Items<{ token_hash?: string }>>('GET', '/api/v1/tokens', token);
    assert.equal(listed.body.items.length, 1);
    assert.equal(JSON.stringify(listed.body).includes(token), false);
    assert.equal(listed.body.items[0]!.token_hash, undefined);

    const row = await api.handle.db
      .selectFrom('api_tokens')
      .select('token_hash')
      .where('id', '=', created.body.api_token.id)
      .executeTakeFirstOrThrow();
    assert.match(row.token_hash, /^[0-9a-f]{64}$/);
    assert.notEqual(row.token_hash, token);

    assert.equal((await api.call('DELETE', `/api/v1/tokens/${created.body.api_token.id}`, operator)).status, 200);
    assert.equal((await api.call('GET', '/api/v1/orgs', token)).status, 401);
  });

  test('a token cannot be created with a higher role than its owner', async () => {
    const viewer = await api.userToken('viewer2@acme.example', 'viewer', orgA.id);
    const res = await api.call<ErrorAnswer>('POST', '/api/v1/tokens', viewer, { name: 'escalate', role: 'admin' });
    assert.equal(res.status, 403);
    assert.equal(res.body.error.code, 'forbidden');
  });

  test('a viewer can read but cannot create groups nor retarget (403)', async () => {
    const viewer = await api.userToken('viewer@acme.example', 'viewer', orgA.id);
    assert.equal((await api.call('GET', `/api/v1/orgs/${orgA.id}/devices`, viewer)).status, 200);
    const group = await api.call<ErrorAnswer>('POST', `/api/v1/orgs/${orgA.id}/groups`, viewer, {
      product: 'sensor',
      name: 'beta',
    });
    assert.equal(group.status, 403);
    assert.equal(group.body.error.code, 'forbidden');

    const created = await api.call('POST', `/api/v1/orgs/${orgA.id}/groups`, admin, {
      product: 'sensor',
      name: 'canary',
    });
    assert.equal(created.status, 201);
    const retarget = await api.call<ErrorAnswer>('PUT', `/api/v1/orgs/${orgA.id}/groups/canary/target`, viewer, {
      version: '1.0.0',
    });
    assert.equal(retarget.status, 403);
    assert.match(retarget.body.error.message, /operator role/);
  });

  test('an operator cannot manage users or signer CAs (admin only)', async () => {
    const operator = await api.userToken('ops2@acme.example', 'operator', orgA.id);
    assert.equal((await api.call('GET', '/api/v1/users', operator)).status, 403);
    assert.equal(
      (await api.call('POST', `/api/v1/orgs/${orgA.id}/signer-cas`, operator, { product: 'sensor', pem: 'x' })).status,
      403,
    );
  });

  test('a token for org A gets 404, not 403, for org B and its resources', async () => {
    const adminA = await api.userToken('admin@acme.example', 'admin', orgA.id);
    const tokenA = (await api.call<{ token: string }>('POST', '/api/v1/tokens', adminA, { name: 'a-only' })).body.token;
    const device = await api.call<{ id: string }>('POST', `/api/v1/orgs/${orgB.id}/devices`, admin, {
      product: 'router',
      identifier: 'rt-1',
    });
    assert.equal(device.status, 201);

    for (const path of [
      `/api/v1/orgs/${orgB.id}`,
      `/api/v1/orgs/globex`,
      `/api/v1/orgs/${orgB.id}/devices`,
      `/api/v1/orgs/${orgB.id}/devices/${device.body.id}`,
      `/api/v1/orgs/${orgB.id}/groups`,
      `/api/v1/orgs/${orgB.id}/audit`,
    ]) {
      const res = await api.call<ErrorAnswer>('GET', path, tokenA);
      assert.equal(res.status, 404, path);
      assert.equal(res.body.error.code, 'not_found');
    }
    // The same device id under A's own org path does not exist either.
    assert.equal((await api.call('GET', `/api/v1/orgs/${orgA.id}/devices/${device.body.id}`, tokenA)).status, 404);
    // An org admin cannot list users of another org.
    assert.equal((await api.call('GET', `/api/v1/users?org=${orgB.id}`, adminA)).status, 404);
    // Nor create organizations (instance admins only).
    assert.equal((await api.call('POST', '/api/v1/orgs', adminA, { name: 'initech' })).status, 403);
  });

  test('disabling a user invalidates their JWT at once', async () => {
    const jwt = await api.userToken('leaver@acme.example', 'operator', orgA.id);
    const me = await api.call<{ user: { id: string } }>('GET', '/api/v1/auth/me', jwt);
    const patched = await api.call<{ disabled: boolean }>('PATCH', `/api/v1/users/${me.body.user.id}`, admin, {
      disabled: true,
    });
    assert.equal(patched.status, 200);
    assert.equal(patched.body.disabled, true);
    assert.equal((await api.call('GET', '/api/v1/auth/me', jwt)).status, 401);
  });

  test('admins create users; duplicates answer 409 and the password hash never leaves the server', async () => {
    const created = await api.call<{ email: string; password_hash?: string }>('POST', '/api/v1/users', admin, {
      email: 'New@Acme.example',
      password: 'long enough pw',
      role: 'viewer',
      org_id: orgA.id,
    });
    assert.equal(created.status, 201);
    assert.equal(created.body.email, 'new@acme.example');
    assert.equal(created.body.password_hash, undefined);
    const again = await api.call<ErrorAnswer>('POST', '/api/v1/users', admin, {
      email: 'new@acme.example',
      password: 'long enough pw',
      role: 'viewer',
    });
    assert.equal(again.status, 409);
    assert.equal(again.body.error.code, 'conflict');
    const row = await api.handle.db
      .selectFrom('users')
      .select('password_hash')
      .where('email', '=', 'new@acme.example')
      .executeTakeFirstOrThrow();
    assert.match(row.password_hash, /^scrypt\$/);
  });

  test('invalid bodies answer 400 with {error: {code, message, details}}', async () => {
    const res = await api.call<ErrorAnswer>('POST', `/api/v1/orgs/${orgA.id}/groups`, admin, {
      name: { not: 'a string' },
    });
    assert.equal(res.status, 400);
    assert.equal(res.body.error.code, 'invalid');
    assert.equal(typeof res.body.error.message, 'string');
    assert.ok(Array.isArray(res.body.error.details.issues));
    assert.ok(res.body.error.details.issues.some((i) => i.path.startsWith('body')));

    const badQuery = await api.call<ErrorAnswer>('GET', `/api/v1/orgs/${orgA.id}/devices?limit=0`, admin);
    assert.equal(badQuery.status, 400);
    assert.match(badQuery.body.error.details.issues[0]!.path, /^querystring/);

    const domain = await api.call<ErrorAnswer>('POST', `/api/v1/orgs/${orgA.id}/groups`, admin, {
      product: 'sensor',
      name: 'has space',
    });
    assert.equal(domain.status, 400);
    assert.equal(domain.body.error.code, 'invalid');
    assert.equal(domain.body.error.details.field, 'name');
  });

  test('unknown API routes answer 404 in the error shape', async () => {
    const res = await api.call<ErrorAnswer>('GET', '/api/v1/nope', admin);
    assert.equal(res.status, 404);
    assert.equal(res.body.error.code, 'not_found');
  });

  test('the OpenAPI document is served and lists the routes with their security', async () => {
    const res = await api.call<OpenApiDocument>('GET', '/api/docs/json');
    assert.equal(res.status, 200);
    const doc = res.body;
    assert.match(doc.openapi, /^3\./);
    for (const path of [
      '/api/v1/auth/login',
      '/api/v1/orgs/{org}/devices',
      '/api/v1/orgs/{org}/groups/{group}/devices',
      '/api/v1/orgs/{org}/groups/{group}/target',
      '/api/v1/tokens',
      '/healthz',
    ]) {
      assert.ok(doc.paths[path], `missing ${path}`);
    }
    assert.ok(doc.paths['/api/v1/orgs/{org}/devices']!.get!.parameters.some((p) => p.name === 'status'));
    assert.deepEqual(doc.paths['/api/v1/auth/login']!.post!.security, []);
    assert.ok(doc.components.securitySchemes.bearer);
    assert.equal(
      Object.keys(doc.paths).some((p) => p.startsWith('/socket')),
      false,
    );
    const ui = await fetch(`${api.url}/api/docs`, { redirect: 'manual' });
    assert.ok(ui.status === 200 || ui.status === 302, `docs UI answered ${ui.status}`);
  });

  test('/healthz answers ok while the database is reachable', async () => {
    const res = await api.call<{ status: string }>('GET', '/healthz');
    assert.equal(res.status, 200);
    assert.equal(res.body.status, 'ok');
  });
});
