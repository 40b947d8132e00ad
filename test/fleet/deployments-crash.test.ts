import { after, before, describe, test } from 'node:test';
import type { DeviceClient } from '../../device-client/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import {
  assertToldOnceAtRate,
  type DeploymentSummary,
  type RestartableServer,
  restartableServer,
  startDeviceClients,
  untilDeploymentCompleted,
  untilOnline,
  uploadImage,
} from '../helpers/server-process.ts';
import { until } from '../helpers/until.ts';

// `fleethub serve` killed with SIGKILL in the middle of a deployment (between two rate windows),
// then started again on the same data: it continues, no device is told twice, the counts are exact.

const ADMIN = { email: 'deploy-crash@example.com', password: 'deploy-crash-password-123' };
const COUNT = 16;

let crashable: RestartableServer;
let clients: DeviceClient[] = [];

before(async () => {
  crashable = await restartableServer('dcrash', ADMIN);
});
after(async () => {
  await Promise.all(clients.map((c) => c.stop()));
  await crashable.close();
});

describe(`a deployment survives kill -9 of its server (${DATABASE_KIND})`, () => {
  test('continues after the restart: every device told once, counts exact', async () => {
    const first = await crashable.start();
    const base = await uploadImage(first, '1.0.0', 32 * 1024, 1);
    await uploadImage(first, '2.0.0', 32 * 1024, 2);

    // rate_per_minute 8: the first 8 are told at once, the other 8 a minute later; the server dies in between.
    clients = await startDeviceClients({
      prefix: 'crash-dep',
      count: COUNT,
      url: first.server.socketUrl,
      dataDir: crashable.dataDir,
      firmware: base,
      // A download cut by the crash retries until the server is back (a start can take a while on a busy machine).
      options: { downloadAttempts: 1500, downloadRetryDelayMs: () => 200 },
    });
    await untilOnline(first, 'crash-dep-', COUNT);
    await first.call('POST', '/api/v1/orgs/default/groups', { product: 'default', name: 'crash' });
    await first.call('POST', '/api/v1/orgs/default/groups/crash/devices', { match: 'crash-dep-*' });
    const created = await first.call<DeploymentSummary>('POST', '/api/v1/orgs/default/deployments', {
      product: 'default',
      version: '2.0.0',
      groups: ['crash'],
      rate_per_minute: 8,
    });

    // Mid-rollout: the first 8 succeeded, the others wait for the rate.
    await until(
      async () => {
        const d = await first.call<DeploymentSummary>('GET', `/api/v1/orgs/default/deployments/${created.id}`);
        return d.counts.succeeded === 8 && d.counts.pending === 8;
      },
      'the first 8 to succeed',
      60_000,
    );
    await first.server.kill();

    const second = await crashable.start();
    const done = await untilDeploymentCompleted(second, created.id, 'the deployment to complete after the restart');
    // The rate held across the restart (told_at is in the database): the second 8 a minute after the first.
    await assertToldOnceAtRate(second, done, { count: COUNT, batch: 8, group: 'crash', version: '2.0.0' });
  });
});
