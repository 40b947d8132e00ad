import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { DeviceClient } from '../../device-client/index.ts';
import { uploadFirmwareStream } from '../../server/cli/firmware.ts';
import { imageChunks } from '../firmware/harness.ts';
import { createProcessDatabase, DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import { freePort, loginTo, startServerProcess, type ServerProcess } from '../helpers/server-process.ts';
import { until } from '../helpers/until.ts';

// `fleethub serve` killed with SIGKILL in the middle of a deployment (between two rate windows),
// then started again on the same data: it continues, no device is told twice, the counts are exact.

const ADMIN = { email: 'deploy-crash@example.com', password: 'deploy-crash-password-123' };
const COUNT = 16;

interface Deployment {
  id: string;
  state: string;
  counts: Record<string, number>;
}

let dataDir: string;
let databaseUrl: string | undefined;
let closeDatabase: (() => Promise<void>) | undefined;
const servers: ServerProcess[] = [];
const clients: DeviceClient[] = [];

before(async () => {
  dataDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-deploy-crash-'));
  const database = await createProcessDatabase('dcrash');
  databaseUrl = database?.url;
  closeDatabase = database?.drop;
});
after(async () => {
  await Promise.all(clients.map((c) => c.stop()));
  for (const server of servers) await server.kill();
  await closeDatabase?.();
  rmSync(dataDir, { recursive: true, force: true });
});

describe(`a deployment survives kill -9 of its server (${DATABASE_KIND})`, () => {
  test('continues after the restart: every device told once, counts exact', async () => {
    const pki = await getTestPki();
    const [apiPort, devicePort] = [await freePort(), await freePort()];
    const start = async () => {
      const server = await startServerProcess({
        dataDir,
        certsDir: pki.dir,
        databaseUrl,
        env: { FLEETHUB_ADMIN_EMAIL: ADMIN.email, FLEETHUB_ADMIN_PASSWORD: ADMIN.password },
        // The same ports both times, so the devices reconnect to the restarted server.
        extraArgs: [
          '--api-port',
          String(apiPort),
          '--device-port',
          String(devicePort),
          '--device-public-url',
          `https://localhost:${devicePort}`,
        ],
      });
      servers.push(server);
      const { token, call } = await loginTo(server, ADMIN);
      return { server, token, call };
    };

    const first = await start();
    const upload = async (version: string, seed: number) =>
      (await uploadFirmwareStream({
        client: { url: first.server.apiUrl, token: first.token },
        query: { org: 'default', product: 'default', version },
        source: Readable.from(imageChunks(32 * 1024, seed)),
        size: 32 * 1024,
      })) as { id: string; version: string };
    const base = await upload('1.0.0', 1);
    await upload('2.0.0', 2);

    // rate_per_minute 8: the first 8 are told at once, the other 8 a minute later; the server dies in between.
    for (let i = 0; i < COUNT; i++) {
      const serial = `crash-dep-${String(i).padStart(2, '0')}`;
      const cred = await deviceCert(serial);
      const client = new DeviceClient({
        url: first.server.socketUrl,
        tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
        stateDir: path.join(dataDir, 'devices', serial),
        firmware: { uuid: base.id, version: base.version },
        // A download cut by the crash retries until the server is back (a start can take a while on a busy machine).
        downloadAttempts: 1500,
        downloadRetryDelayMs: () => 200,
        reconnectAfterMs: () => 200,
      });
      clients.push(client);
      await client.start();
    }
    await until(
      async () => {
        const page = await first.call<{ items: { connection_status: string }[] }>(
          'GET',
          '/api/v1/orgs/default/devices?q=crash-dep-&limit=100',
        );
        return page.items.filter((d) => d.connection_status === 'online').length === COUNT;
      },
      'every device online',
      60_000,
    );
    const g = await first.call<{ id: string }>('POST', '/api/v1/orgs/default/groups', {
      product: 'default',
      name: 'crash',
    });
    await first.call('POST', `/api/v1/orgs/default/groups/${g.id}/devices`, { match: 'crash-dep-*' });
    const created = await first.call<Deployment>('POST', '/api/v1/orgs/default/deployments', {
      product: 'default',
      version: '2.0.0',
      groups: ['crash'],
      rate_per_minute: 8,
    });

    // Mid-rollout: the first 8 succeeded, the others wait for the rate.
    await until(
      async () => {
        const d = await first.call<Deployment>('GET', `/api/v1/orgs/default/deployments/${created.id}`);
        return d.counts.succeeded === 8 && d.counts.pending === 8;
      },
      'the first 8 to succeed',
      60_000,
    );
    await first.server.kill();

    const second = await start();
    let last: Deployment | undefined;
    const done = await until(
      async () => {
        last = await second.call<Deployment>('GET', `/api/v1/orgs/default/deployments/${created.id}`);
        return last.state === 'completed' && last;
      },
      'the deployment to complete after the restart',
      180_000,
    ).catch(async (err: Error) => {
      const rows = await second.call('GET', `/api/v1/orgs/default/deployments/${created.id}/devices?state=failed`);
      throw new Error(`${err.message}; last seen ${JSON.stringify(last?.counts)}, failed: ${JSON.stringify(rows)}`);
    });
    assert.deepEqual(done.counts, {
      total: COUNT,
      pending: 0,
      told: COUNT,
      in_flight: 0,
      succeeded: COUNT,
      failed: 0,
      cancelled: 0,
      retrying: 0,
      penalty_box: 0,
    });
    const rows = await second.call<{ items: { identifier: string; tries: number; state: string }[] }>(
      'GET',
      `/api/v1/orgs/default/deployments/${created.id}/devices?limit=100`,
    );
    assert.equal(rows.items.length, COUNT);
    assert.ok(
      rows.items.every((r) => r.tries === 1 && r.state === 'succeeded'),
      JSON.stringify(rows.items),
    );
    // The rate held across the restart (told_at is in the database): the second 8 a minute after the first.
    const told = rows.items
      .map((r) => new Date((r as unknown as { told_at: string }).told_at).getTime())
      .sort((a, b) => a - b);
    assert.ok(told[8]! - told[0]! >= 60_000, `the ninth was told ${told[8]! - told[0]!} ms after the first`);
    // One attempt per device: nobody was told twice.
    const attempts = await second.call<{ items: { device_id: string; to_version: string; state: string }[] }>(
      'GET',
      '/api/v1/orgs/default/groups/crash/updates?limit=1000',
    );
    const to2 = attempts.items.filter((a) => a.to_version === '2.0.0');
    assert.equal(to2.length, COUNT);
    assert.equal(new Set(to2.map((a) => a.device_id)).size, COUNT);
    assert.ok(to2.every((a) => a.state === 'succeeded'));
  });
});
