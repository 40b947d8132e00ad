import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createUser } from '../../server/api/operators.ts';
import { main } from '../../server/cli/index.ts';
import { runCaptured } from '../helpers/cli-io.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

// Logins, profiles and logout against a running server, each test with its own config directory.
describe(`fleethub login, logout and profiles (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let home: string;

  async function cli(argv: string[], extraEnv: NodeJS.ProcessEnv = {}) {
    return runCaptured(main, argv, { env: { HOME: home, XDG_CONFIG_HOME: home, ...extraEnv } });
  }
  const login = (...extra: string[]) =>
    cli(['login', '--url', server.apiUrl, '--email', 'ops@example.com', '--password', 'operator-password', ...extra]);
  const credentials = () =>
    JSON.parse(readFileSync(path.join(home, 'fleethub', 'credentials.json'), 'utf8')) as {
      profiles: Record<string, { url: string; token: string; expiresAt?: string }>;
    };

  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-sessions-'));
    await createUser(server.database.db, { email: 'ops@example.com', password: 'operator-password', role: 'operator' });
  });
  after(async () => {
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });
  let n = 0;
  const freshHome = () => {
    home = path.join(tmp, `home-${n++}`);
  };

  test("a wrong password on a fresh machine shows the server's message, not 'not logged in'", async () => {
    freshHome();
    const res = await cli(['login', '--url', server.apiUrl, '--email', 'ops@example.com', '--password', 'wrong']);
    assert.equal(res.code, 1);
    assert.match(res.err, /^error: wrong email or password/);
    assert.doesNotMatch(res.err, /not logged in/);
  });

  test('without a login a command says so and names the login command for its profile', async () => {
    freshHome();
    const res = await cli(['orgs', '--url', server.apiUrl, '--profile', 'staging']);
    assert.equal(res.code, 1);
    assert.match(res.err, /missing bearer token/);
    assert.match(res.err, new RegExp(`not logged in: run \`fleethub login --url ${server.apiUrl} --profile staging\``));
  });

  test('login --profile saves a second server; --profile and FLEETHUB_PROFILE pick it', async () => {
    freshHome();
    assert.equal((await login()).code, 0);
    const staging = await login('--profile', 'staging');
    assert.equal(staging.code, 0, staging.err);
    assert.match(staging.out, /\(profile staging\)/);
    const saved = credentials();
    assert.deepEqual(Object.keys(saved.profiles).sort(), ['default', 'staging']);
    assert.notEqual(saved.profiles.default!.token, saved.profiles.staging!.token);

    for (const [argv, env] of [
      [['orgs', '--profile', 'staging'], {}],
      [['orgs'], { FLEETHUB_PROFILE: 'staging' }],
      [['orgs'], {}],
    ] as const) {
      const res = await cli([...argv], env);
      assert.equal(res.code, 0, res.err);
      assert.match(res.out, /^NAME\s+ID/);
    }
    const unknown = await cli(['orgs', '--profile', 'prod', '--url', server.apiUrl]);
    assert.equal(unknown.code, 1);
    assert.match(
      unknown.err,
      new RegExp(`not logged in: run \`fleethub login --url ${server.apiUrl} --profile prod\``),
    );
  });

  test('the single-login file of earlier versions is still read, as profile default', async () => {
    freshHome();
    const session = (await (
      await fetch(`${server.apiUrl}/api/v1/auth/login`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ email: 'ops@example.com', password: 'operator-password' }),
      })
    ).json()) as { token: string };
    mkdirSync(path.join(home, 'fleethub'), { recursive: true });
    writeFileSync(
      path.join(home, 'fleethub', 'credentials.json'),
      JSON.stringify({ url: server.apiUrl, token: session.token, email: 'ops@example.com' }),
    );
    const res = await cli(['orgs']);
    assert.equal(res.code, 0, res.err);
    // A new login rewrites it in the profile format and keeps it working.
    assert.equal((await login('--profile', 'other')).code, 0);
    assert.equal(credentials().profiles.default!.token, session.token);
    assert.equal((await cli(['orgs'])).code, 0);
  });

  test('logout revokes the session on the server and forgets the token; the old token is refused', async () => {
    freshHome();
    assert.equal((await login()).code, 0);
    const { token } = credentials().profiles.default!;
    const out = await cli(['logout']);
    assert.equal(out.code, 0, out.err);
    assert.equal(out.out, `logged out of ${server.apiUrl}; forgot the token of profile default\n`);
    assert.equal(credentials().profiles.default, undefined);
    const res = await fetch(`${server.apiUrl}/api/v1/orgs`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(res.status, 401);
    const again = await cli(['orgs', '--token', token, '--url', server.apiUrl]);
    assert.equal(again.code, 1);
    assert.match(again.err, /signed out/);
    const twice = await cli(['logout']);
    assert.equal(twice.code, 1);
    assert.match(twice.err, /profile default has no saved login/);
  });

  test('an expired session says it expired and how to log in again', async () => {
    freshHome();
    assert.equal((await login('--profile', 'lab')).code, 0);
    await server.database.db
      .updateTable('operator_sessions')
      .set({ expires_at: new Date(Date.now() - 60_000) })
      .execute();
    const res = await cli(['orgs', '--profile', 'lab']);
    assert.equal(res.code, 1);
    assert.match(
      res.err,
      new RegExp(
        `your login session on ${server.apiUrl} expired at .*: run \`fleethub login --url ${server.apiUrl} --profile lab\``,
      ),
    );
  });
});
