/**
 * Webhooks against real HTTP receivers started in the test: a retarget reaches a subscribed
 * receiver as signed JSON deliveries (HMAC-SHA256 over "<t>.<body>" under the secret shown once),
 * the delivery log shows them, and a receiver that answers 500 is retried on the configured
 * schedule, then disabled, and that is audited. A second worker on the same database never sends
 * a delivery twice (FOR UPDATE SKIP LOCKED claims). The CLI shows the same log.
 */
import assert from 'node:assert/strict';
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { createLogger } from '../../server/log.ts';
import { runWebhooksCommand } from '../../server/cli/webhooks.ts';
import { createWebhookService } from '../../server/webhooks/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';
import type { Items } from './harness.ts';

/** A webhook as the API shows it (the secret only in the create answer). */
interface Webhook {
  id: string;
  secret: string;
  enabled: boolean;
  disabled_reason: string;
}

/** One row of a webhook's delivery log. */
interface Delivery {
  id: string;
  state: string;
  attempts: number;
  last_status: number;
  payload: unknown;
}

interface Received {
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** An HTTP receiver answering `status()` to every POST, recording what it got. */
async function startReceiver(status: () => number) {
  const received: Received[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      received.push({ headers: req.headers, body: Buffer.concat(chunks).toString('utf8') });
      res.writeHead(status(), { 'content-type': 'text/plain' }).end('ok');
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/hooks/fleethub`;
  return { url, received, close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

/** What a receiver does with `Fleethub-Signature: t=..,v1=..` (docs/webhooks.md). */
function verify(secret: string, header: string, body: string): boolean {
  const parts = Object.fromEntries(header.split(',').map((p) => p.split('=') as [string, string]));
  const expected = createHmac('sha256', secret).update(`${parts.t}.${body}`).digest();
  const given = Buffer.from(parts.v1 ?? '', 'hex');
  return given.length === expected.length && timingSafeEqual(given, expected);
}

describe(`webhooks (${DATABASE_KIND})`, () => {
  let server: TestServer;
  const org = 'default';

  before(async () => {
    server = await startTestServer({ webhookRetryDelays: '50ms,100ms' });
  });
  after(() => server?.close());

  async function uploadFirmware(version: string) {
    const res = await fetch(`${server.apiUrl}/api/v1/firmware?org=${org}&product=default&version=${version}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
      body: randomBytes(4096),
    });
    assert.equal(res.status, 201, await res.clone().text());
    return (await res.json()) as { id: string };
  }

  test('a retarget reaches the receiver as signed deliveries, logged as delivered', async () => {
    const receiver = await startReceiver(() => 204);
    try {
      const created = await server.call<Webhook>('POST', `/api/v1/orgs/${org}/webhooks`, {
        url: receiver.url,
        events: ['target.changed', 'update.transition'],
        description: 'CI',
      });
      assert.match(created.secret, /^whsec_[A-Za-z0-9_-]{43}$/);
      const listed = await server.call<Items<Webhook>>('GET', `/api/v1/orgs/${org}/webhooks`);
      assert.equal(listed.total, 1);
      assert.equal(listed.items[0]!.id, created.id);
      assert.ok(!('secret' in listed.items[0]!) && !('secret_enc' in listed.items[0]!), 'the secret is shown once');

      await server.call('POST', `/api/v1/orgs/${org}/groups`, { product: 'default', name: 'hooked' });
      const firmware = await uploadFirmware('5.0.0');
      await server.call('PUT', `/api/v1/orgs/${org}/groups/hooked/target`, { version: '5.0.0' });

      await until(() => receiver.received.length >= 1, 'the first delivery');
      const [delivery] = receiver.received;
      assert.equal(delivery!.headers['content-type'], 'application/json');
      assert.equal(delivery!.headers['fleethub-event'], 'target.changed');
      assert.ok(verify(created.secret, String(delivery!.headers['fleethub-signature']), delivery!.body), 'signature');
      assert.ok(!verify(`${created.secret}x`, String(delivery!.headers['fleethub-signature']), delivery!.body));
      const t = Number(/t=(\d+)/.exec(String(delivery!.headers['fleethub-signature']))![1]);
      assert.ok(Math.abs(t - Date.now() / 1000) < 300, 'the signed timestamp is now');
      const body = JSON.parse(delivery!.body);
      assert.equal(body.type, 'target.changed');
      assert.equal(body.org_id, server.orgId);
      assert.equal(body.data.firmware_id, firmware.id);
      assert.match(body.id, /^[0-9a-f-]{36}$/);

      const log = await server.call<Items<Delivery>>('GET', `/api/v1/orgs/${org}/webhooks/${created.id}/deliveries`);
      assert.equal(log.total, 1, JSON.stringify(log));
      assert.equal(log.items[0]!.id, delivery!.headers['fleethub-delivery']);
      await until(async () => {
        const again = await server.call<Items<Delivery>>(
          'GET',
          `/api/v1/orgs/${org}/webhooks/${created.id}/deliveries`,
        );
        return again.items[0]!.state === 'delivered';
      }, 'the delivery logged as delivered');
      const done = (await server.call<Items<Delivery>>('GET', `/api/v1/orgs/${org}/webhooks/${created.id}/deliveries`))
        .items[0];
      assert.equal(done.attempts, 1);
      assert.equal(done.last_status, 204);
      assert.deepEqual(done.payload, body);

      // The CLI shows the same log.
      let out = '';
      const code = await runWebhooksCommand(
        ['deliveries', created.id, '--url', server.apiUrl, '--token', server.adminToken],
        {
          out: (text) => {
            out += text;
          },
          err: (text) => {
            out += text;
          },
          env: { HOME: '/nonexistent' },
        },
      );
      assert.equal(code, 0, out);
      assert.match(out, /target\.changed\s+delivered\s+1\s+204/);
      assert.match(out, /1 of 1/);

      await server.call('DELETE', `/api/v1/orgs/${org}/webhooks/${created.id}`);
    } finally {
      await receiver.close();
    }
  });

  test('a receiver answering 500 is retried on the schedule, then disabled, and that is audited', async () => {
    const receiver = await startReceiver(() => 500);
    try {
      const created = await server.call<Webhook>('POST', `/api/v1/orgs/${org}/webhooks`, {
        url: receiver.url,
        events: ['*'],
      });
      await uploadFirmware('5.1.0');
      await server.call('POST', `/api/v1/orgs/${org}/groups`, { product: 'default', name: 'failing' });
      await server.call('PUT', `/api/v1/orgs/${org}/groups/failing/target`, { version: '5.1.0' });

      await until(
        async () => !(await server.call<Webhook>('GET', `/api/v1/orgs/${org}/webhooks/${created.id}`)).enabled,
        'the failing webhook disabled',
      );
      const hook = await server.call<Webhook>('GET', `/api/v1/orgs/${org}/webhooks/${created.id}`);
      assert.match(hook.disabled_reason, /failed 3 times; last: receiver answered 500/);
      // One attempt and the two retries of '50ms,100ms', all for the same delivery.
      assert.equal(receiver.received.length, 3);
      assert.equal(new Set(receiver.received.map((r) => r.headers['fleethub-delivery'])).size, 1);
      const log = await server.call<Items<Delivery>>('GET', `/api/v1/orgs/${org}/webhooks/${created.id}/deliveries`);
      assert.equal(log.items[0]!.state, 'failed');
      assert.equal(log.items[0]!.attempts, 3);
      assert.equal(log.items[0]!.last_status, 500);

      const audit = await server.call<Items<{ resource_id: string; actor_type: string }>>(
        'GET',
        `/api/v1/orgs/${org}/audit?action=webhook.disabled`,
      );
      assert.equal(audit.total, 1);
      assert.equal(audit.items[0]!.resource_id, created.id);
      assert.equal(audit.items[0]!.actor_type, 'system');

      // Disabled: later events wait as pending, nothing is sent; enabling sends them.
      await server.call('PUT', `/api/v1/orgs/${org}/groups/failing/target`, { version: '5.0.0' });
      const waiting = await server.call<Items<Delivery>>(
        'GET',
        `/api/v1/orgs/${org}/webhooks/${created.id}/deliveries?state=pending`,
      );
      assert.equal(waiting.total, 0, 'a disabled webhook queues nothing');
      assert.equal(receiver.received.length, 3);
    } finally {
      await receiver.close();
    }
  });

  test('two workers on one database send each delivery once', async () => {
    const receiver = await startReceiver(() => 200);
    const second = createWebhookService({
      db: server.database.db,
      log: createLogger({ level: 'silent' }),
      secret: server.secret,
      pollMs: 5,
    });
    second.start();
    try {
      const created = await server.call<Webhook>('POST', `/api/v1/orgs/${org}/webhooks`, {
        url: receiver.url,
        events: ['target.changed'],
      });
      await server.call('POST', `/api/v1/orgs/${org}/groups`, { product: 'default', name: 'twice' });
      for (const version of ['5.0.0', '5.1.0', '5.0.0', '5.1.0', '5.0.0', '5.1.0'])
        await server.call('PUT', `/api/v1/orgs/${org}/groups/twice/target`, { version });
      await until(async () => {
        const log = await server.call<Items<Delivery>>(
          'GET',
          `/api/v1/orgs/${org}/webhooks/${created.id}/deliveries?state=delivered`,
        );
        return log.total === 6;
      }, 'six deliveries delivered');
      const ids = receiver.received.map((r) => r.headers['fleethub-delivery']);
      assert.equal(ids.length, 6);
      assert.equal(new Set(ids).size, 6);
    } finally {
      await second.stop();
      await receiver.close();
    }
  });
});
