/**
 * Server-side operator sessions and login throttling: a login JWT works only while its session
 * lives; logout, a new password, disabling and a new role revoke sessions at once; 401 bodies
 * say why; failed logins are throttled with 429 and Retry-After; every login is audited.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DATABASE_KIND } from '../helpers/db.ts';
import { RawClient } from '../helpers/phoenix.ts';
import { type ErrorAnswer, PASSWORD, startTestApi, type TestApi } from './harness.ts';

describe(`operator sessions (${DATABASE_KIND})`, () => {
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

  async function newOperator(): Promise<{ id: string; email: string; token: string }> {
    const email = `ops-${++users}@acme.example`;
    const token = await api.userToken(email, 'operator', org.id);
    const me = await api.call<{ user: { id: string } }>('GET', '/api/v1/auth/me', token);
    assert.equal(me.status, 200);
    return { id: me.body.user.id, email, token };
  }

  async function login(email: string, password = PASSWORD): Promise<string> {
    const res = await api.call<{ token: string }>('POST', '/api/v1/auth/login', undefined, { email, password });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return res.body.token;
  }

  /** The 401 a token gets now, with its reason and message. */
  async function refusal(token: string): Promise<{ reason: string; message: string }> {
    const res = await api.call<ErrorAnswer>('GET', '/api/v1/auth/me', token);
    assert.equal(res.status, 401, JSON.stringify(res.body));
    assert.equal(res.body.error.code, 'unauthorized');
    return { reason: res.body.error.details.reason ?? '', message: res.body.error.message };
  }

  test('logout revokes the session: its JWT gets 401 "session revoked (signed out)"; other sessions keep working', async () => {
    const user = await newOperator();
    const other = await login(user.email);
    const out = await api.call('DELETE', '/api/v1/auth/session', user.token);
    assert.equal(out.status, 200, JSON.stringify(out.body));
    const refused = await refusal(user.token);
    assert.equal(refused.reason, 'session_revoked');
    assert.match(refused.message, /your session was revoked \(signed out\): log in again/);
    assert.equal((await api.call('GET', '/api/v1/auth/me', other)).status, 200);
    // Logging out twice: the token is no longer a credential.
    assert.equal((await api.call('DELETE', '/api/v1/auth/session', user.token)).status, 401);
  });

  test('logout closes the live operator sockets of that session only', async () => {
    const user = await newOperator();
    const other = await login(user.email);
    const connect = async (token: string) => {
      const client = await RawClient.connect(
        `${api.url.replace('http', 'ws')}/socket/websocket?vsn=2.0.0&token=${encodeURIComponent(token)}`,
        {},
      );
      const closed = new Promise<number>((resolve) => client.ws.once('close', (code: number) => resolve(code)));
      client.send(['1', '1', `operator:${org.id}`, 'phx_join', {}]);
      await client.waitFrame((f) => !f.binary && Array.isArray(f.json) && f.json[3] === 'phx_reply');
      return { client, closed };
    };
    const mine = await connect(user.token);
    const theirs = await connect(other);
    assert.equal((await api.call('DELETE', '/api/v1/auth/session', user.token)).status, 200);
    await mine.closed;
    const marker = theirs.client.frames.length;
    theirs.client.send([null, 'hb', 'phoenix', 'heartbeat', {}]);
    await theirs.client.waitFrame((f) => !f.binary && Array.isArray(f.json) && f.json[1] === 'hb', 2000, marker);
    theirs.client.ws.close();
    // A revoked session cannot open a socket either.
    await assert.rejects(connect(user.token));
  });

  test('an API token is not a session: logout with one answers 400 and the token keeps working', async () => {
    const created = await api.call<{ token: string }>('POST', '/api/v1/tokens', admin, { name: 'automation' });
    const res = await api.call<ErrorAnswer>('DELETE', '/api/v1/auth/session', created.body.token);
    assert.equal(res.status, 400);
    assert.match(res.body.error.message, /DELETE \/api\/v1\/tokens/);
    assert.equal((await api.call('GET', '/api/v1/auth/me', created.body.token)).status, 200);
  });

  for (const [change, body, cause] of [
    ['a new password', { password: 'another-password-456' }, 'password changed'],
    ['disabling the user', { disabled: true }, 'user disabled'],
    ['a new role', { role: 'viewer' }, 'role changed'],
  ] as const) {
    test(`${change} revokes every session of the user at once (401 "session revoked (${cause})")`, async () => {
      const user = await newOperator();
      const second = await login(user.email);
      const res = await api.call('PATCH', `/api/v1/users/${user.id}`, admin, body);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      for (const token of [user.token, second]) {
        const refused = await refusal(token);
        assert.equal(refused.reason, 'session_revoked');
        assert.match(refused.message, new RegExp(`\\(${cause}\\)`));
      }
      // The admin's own session is untouched.
      assert.equal((await api.call('GET', '/api/v1/auth/me', admin)).status, 200);
    });
  }

  test('a renamed user keeps their sessions', async () => {
    const user = await newOperator();
    assert.equal((await api.call('PATCH', `/api/v1/users/${user.id}`, admin, { name: 'Ops' })).status, 200);
    assert.equal((await api.call('GET', '/api/v1/auth/me', user.token)).status, 200);
  });

  test('deleting the user ends their sessions', async () => {
    const user = await newOperator();
    assert.equal((await api.call('DELETE', `/api/v1/users/${user.id}`, admin)).status, 204);
    assert.equal((await refusal(user.token)).reason, 'session_revoked');
  });

  test('a session past its end answers "session expired"; a token not from this server "invalid token"', async () => {
    const user = await newOperator();
    await api.handle.db
      .updateTable('operator_sessions')
      .set({ expires_at: new Date(Date.now() - 1000) })
      .where('user_id', '=', user.id)
      .execute();
    const expired = await refusal(user.token);
    assert.equal(expired.reason, 'session_expired');
    assert.match(expired.message, /your session expired/);
    const forged = await refusal('eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl');
    assert.equal(forged.reason, 'invalid_token');
  });

  test('every login is audited, refused ones with the reason, never with the password', async () => {
    const user = await newOperator();
    await api.call('POST', '/api/v1/auth/login', undefined, { email: user.email, password: 'not-it-at-all' });
    await api.call('POST', '/api/v1/auth/login', undefined, { email: 'ghost@acme.example', password: 'whatever-1' });
    const rows = await api.handle.db
      .selectFrom('audit_log')
      .select(['action', 'actor_type', 'actor_id', 'resource_id', 'details'])
      .where('action', 'in', ['auth.login', 'auth.login_refused'])
      .orderBy('id')
      .execute();
    const details = (r: (typeof rows)[number]) =>
      (typeof r.details === 'string' ? JSON.parse(r.details) : r.details) as Record<string, unknown>;
    const success = rows.find((r) => r.action === 'auth.login' && details(r).email === user.email);
    assert.ok(success, 'the successful login is audited');
    assert.equal(success.actor_type, 'operator');
    assert.equal(success.actor_id, user.id);
    assert.equal(details(success).remote_address, '127.0.0.1');
    const refused = rows.filter((r) => r.action === 'auth.login_refused').map(details);
    assert.deepEqual(
      refused.map((d) => [d.email, d.reason]),
      [
        [user.email, 'wrong password'],
        ['ghost@acme.example', 'unknown email'],
      ],
    );
    const text = JSON.stringify(rows);
    assert.ok(!text.includes('not-it-at-all') && !text.includes(PASSWORD), 'no password in the audit log');
  });
});

describe(`login throttling (${DATABASE_KIND})`, () => {
  let api: TestApi;

  before(async () => {
    api = await startTestApi({ loginThrottle: { accountFailures: 5, addressFailures: 14, windowSeconds: 600 } });
  });
  after(() => api.close());

  const attempt = (email: string, password: string) =>
    fetch(`${api.url}/api/v1/auth/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email, password }),
    });

  test('after 5 failed logins the account answers 429 with Retry-After, even to the right password', async () => {
    await api.userToken('victim@example.com', 'viewer', null);
    for (let i = 0; i < 5; i++) assert.equal((await attempt('victim@example.com', `guess-${i}`)).status, 401);
    for (const password of ['guess-5', PASSWORD]) {
      const res = await attempt('Victim@Example.com', password);
      assert.equal(res.status, 429);
      const retryAfter = Number(res.headers.get('retry-after'));
      assert.ok(retryAfter > 0 && retryAfter <= 600, `Retry-After ${retryAfter}`);
      const body = (await res.json()) as { error: { code: string; message: string } };
      assert.equal(body.error.code, 'too_many_requests');
      assert.match(body.error.message, /too many failed logins for this account: try again in \d+ s/);
    }
    const audited = await api.handle.db
      .selectFrom('audit_log')
      .select('details')
      .where('action', '=', 'auth.login_throttled')
      .execute();
    assert.equal(audited.length, 1, 'the block is audited once, not per refused attempt');
  });

  test('a successful login clears its account’s count', async () => {
    await api.userToken('careless@example.com', 'viewer', null);
    for (let i = 0; i < 4; i++) assert.equal((await attempt('careless@example.com', `typo-${i}`)).status, 401);
    assert.equal((await attempt('careless@example.com', PASSWORD)).status, 200);
    for (let i = 0; i < 4; i++) assert.equal((await attempt('careless@example.com', `typo-${i}`)).status, 401);
    assert.equal((await attempt('careless@example.com', PASSWORD)).status, 200);
  });

  test('failures across many accounts from one address throttle the address', async () => {
    // 5 + 4 + 4 failures so far from 127.0.0.1 (the limit is 14): the second next one is over it.
    let status = 0;
    let n = 0;
    while (status !== 429 && n < 20) status = (await attempt(`spray-${n++}@example.com`, 'password-1')).status;
    assert.equal(status, 429);
    const res = await attempt('careless@example.com', PASSWORD);
    assert.equal(res.status, 429);
    assert.match(((await res.json()) as { error: { message: string } }).error.message, /from this address/);
  });
});
