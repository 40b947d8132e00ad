import assert from 'node:assert/strict';
import { once } from 'node:events';
import { after, before, describe, test } from 'node:test';
import { DATABASE_KIND } from '../helpers/db.ts';
import { RawClient } from '../helpers/phoenix.ts';
import { startTestApi, type TestApi } from './harness.ts';

/** A live operator socket joined to its org's channel, and how it closed (code and reason). */
interface LiveOperator {
  client: RawClient;
  closed: Promise<{ code: number; reason: string }>;
}

/** The answer to creating an API token. */
interface CreatedToken {
  token: string;
  api_token: { id: string };
}

describe(`live operator sockets follow their credentials (${DATABASE_KIND})`, () => {
  let api: TestApi;
  let admin: string;
  let org: { id: string };
  let users = 0;

  before(async () => {
    api = await startTestApi();
    admin = await api.userToken('root@example.com', 'admin', null);
    org = (await api.call<{ id: string }>('POST', '/api/v1/orgs', admin, { name: 'acme' })).body;
  });
  after(() => api.close());

  async function newOperator(): Promise<{ id: string; token: string }> {
    const email = `ops-${++users}@acme.example`;
    const token = await api.userToken(email, 'operator', org.id);
    const me = await api.call<{ user: { id: string } }>('GET', '/api/v1/auth/me', token);
    return { id: me.body.user.id, token };
  }

  async function connect(token: string): Promise<LiveOperator> {
    const client = await RawClient.connect(
      `${api.url.replace('http', 'ws')}/socket/websocket?vsn=2.0.0&token=${encodeURIComponent(token)}`,
      {},
    );
    const closed = new Promise<{ code: number; reason: string }>((resolve) =>
      client.ws.once('close', (code: number, reason: Buffer) => resolve({ code, reason: reason.toString() })),
    );
    client.send(['1', '1', `operator:${org.id}`, 'phx_join', {}]);
    const reply = await client.waitFrame((f) => !f.binary && Array.isArray(f.json) && f.json[3] === 'phx_reply');
    assert.equal((reply as { json: [unknown, unknown, unknown, unknown, { status: string }] }).json[4].status, 'ok');
    return { client, closed };
  }

  async function closedWithin(live: LiveOperator, ms = 5000): Promise<{ code: number; reason: string }> {
    const timeout = new Promise<never>((_, reject) =>
      setTimeout(() => reject(new Error(`the operator socket stayed open for ${ms} ms`)), ms).unref(),
    );
    return Promise.race([live.closed, timeout]);
  }

  async function stillOpen(live: LiveOperator): Promise<void> {
    const marker = live.client.frames.length;
    live.client.send([null, 'hb', 'phoenix', 'heartbeat', {}]);
    await live.client.waitFrame((f) => !f.binary && Array.isArray(f.json) && f.json[1] === 'hb', 2000, marker);
  }

  test('disabling a user closes its live sockets with the reason "user disabled"', async () => {
    const user = await newOperator();
    const live = await connect(user.token);
    assert.equal((await api.call('PATCH', `/api/v1/users/${user.id}`, admin, { disabled: true })).status, 200);
    assert.deepEqual(await closedWithin(live), { code: 1008, reason: 'user disabled' });
  });

  test('revoking an API token closes exactly the sockets opened with it', async () => {
    const user = await newOperator();
    const created = await api.call<CreatedToken>('POST', '/api/v1/tokens', user.token, { name: 'dashboard-wall' });
    assert.equal(created.status, 201);
    const viaToken = await connect(created.body.token);
    const viaLogin = await connect(user.token);
    assert.equal((await api.call('DELETE', `/api/v1/tokens/${created.body.api_token.id}`, user.token)).status, 200);
    assert.deepEqual(await closedWithin(viaToken), { code: 1008, reason: 'API token revoked' });
    await stillOpen(viaLogin);
    viaLogin.client.ws.close();
  });

  test('an operator socket is closed when its API token expires', async () => {
    const user = await newOperator();
    const created = await api.call<CreatedToken>('POST', '/api/v1/tokens', user.token, {
      name: 'short-lived',
      expires_in_days: 1,
    });
    assert.equal(created.status, 201);
    const expiresAt = new Date(Date.now() + 1500);
    await api.handle.db
      .updateTable('api_tokens')
      .set({ expires_at: expiresAt })
      .where('id', '=', created.body.api_token.id)
      .execute();
    const viaToken = await connect(created.body.token);
    const viaLogin = await connect(user.token);
    // Within the endpoint's sweep interval (under 4 s) after the expiry.
    assert.deepEqual(await closedWithin(viaToken, 1500 + 6000), { code: 1008, reason: 'credential expired' });
    assert.ok(Date.now() >= expiresAt.getTime(), 'not before the token expired');
    await stillOpen(viaLogin);
    viaLogin.client.ws.close();
  });

  test("changing a user's role closes the sockets of its logins and of its API tokens", async () => {
    const user = await newOperator();
    const created = await api.call<CreatedToken>('POST', '/api/v1/tokens', user.token, { name: 'automation' });
    const viaLogin = await connect(user.token);
    const viaToken = await connect(created.body.token);
    assert.equal((await api.call('PATCH', `/api/v1/users/${user.id}`, admin, { role: 'viewer' })).status, 200);
    assert.deepEqual(await closedWithin(viaLogin), { code: 1008, reason: 'role changed' });
    assert.deepEqual(await closedWithin(viaToken), { code: 1008, reason: 'role changed' });
    // The login's session is revoked (it was granted under the old role); the API token works under the new one.
    await assert.rejects(connect(user.token), /HTTP 403/);
    const again = await connect(created.body.token);
    again.client.ws.close();
  });

  test('deleting a user closes its live sockets with the reason "user deleted"', async () => {
    const user = await newOperator();
    const live = await connect(user.token);
    assert.equal((await api.call('DELETE', `/api/v1/users/${user.id}`, admin)).status, 204);
    assert.deepEqual(await closedWithin(live), { code: 1008, reason: 'user deleted' });
  });

  test('renaming a user leaves its live sockets open', async () => {
    const user = await newOperator();
    const live = await connect(user.token);
    assert.equal((await api.call('PATCH', `/api/v1/users/${user.id}`, admin, { name: 'Renamed' })).status, 200);
    await stillOpen(live);
    live.client.ws.close();
    await once(live.client.ws, 'close');
  });
});
