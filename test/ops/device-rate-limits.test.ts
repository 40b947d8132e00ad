/**
 * Rate limits on the edges' device-facing HTTP routes: past the per-address limit a Main Server
 * call, a WiFiDogX upgrade or a GRiSP upgrade gets 429 with Retry-After before the route runs;
 * the operator API and the Phoenix socket are not counted.
 */
import assert from 'node:assert/strict';
import https from 'node:https';
import { after, before, describe, test } from 'node:test';
import { DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

const LIMIT = 3;

describe(`device-facing HTTP rate limits (${DATABASE_KIND})`, () => {
  let server: TestServer;

  before(async () => {
    server = await startTestServer({ deviceRateLimit: LIMIT });
  });
  after(() => server?.close());

  test(`Main Server REST: the ${LIMIT + 1}th request in a minute from one address gets 429 with Retry-After`, async () => {
    const statuses: number[] = [];
    let last: Response | undefined;
    for (let i = 0; i <= LIMIT; i++) {
      last = await fetch(`${server.apiUrl}/api/main-server/register-device`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ not: 'a registration' }),
      });
      statuses.push(last.status);
    }
    assert.deepEqual(statuses.slice(0, LIMIT), Array(LIMIT).fill(400));
    assert.equal(statuses[LIMIT], 429);
    assert.ok(Number(last!.headers.get('retry-after')) > 0);
    assert.match(await last!.text(), /too many requests from this address/);
  });

  test('WiFiDogX upgrades are limited on their own route; the operator API is not limited', async () => {
    const statuses: number[] = [];
    for (let i = 0; i <= LIMIT; i++) statuses.push((await fetch(`${server.apiUrl}/ws/wifidogx`)).status);
    assert.notEqual(statuses[0], 429);
    assert.equal(statuses[LIMIT], 429);
    for (let i = 0; i < LIMIT * 2; i++)
      assert.equal((await fetch(`${server.apiUrl}/api/v1/orgs`, { headers: auth() })).status, 200);
  });

  test('GRiSP upgrades of an authenticated board are limited; refusals do not reach the route', async () => {
    const cred = await deviceCert('grisp-rate-0001');
    const tls = { ...(await deviceTlsOptions()), cert: cred.certPem, key: cred.keyPem };
    const get = () =>
      new Promise<number>((resolve, reject) => {
        https
          .get(`${server.deviceUrl}/grisp-connect/ws`, tls, (res) => {
            res.resume();
            resolve(res.statusCode ?? 0);
          })
          .on('error', reject);
      });
    const statuses: number[] = [];
    for (let i = 0; i <= LIMIT; i++) statuses.push(await get());
    assert.notEqual(statuses[0], 429);
    assert.equal(statuses[LIMIT], 429);
  });

  function auth() {
    return { authorization: `Bearer ${server.adminToken}` };
  }
});
