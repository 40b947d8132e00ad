import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import type { DeviceClient } from '../../device-client/index.ts';
import { createProcessDatabase } from '../helpers/db.ts';
import { getTestPki } from '../helpers/pki.ts';
import {
  assertToldOnceAtRate,
  type DeploymentSummary,
  freePort,
  loginTo,
  type ServerProcess,
  startDeviceClients,
  startServerProcess,
  untilDeploymentCompleted,
  untilOnline,
  uploadImage,
} from '../helpers/server-process.ts';
import { until } from '../helpers/until.ts';

// Two `fleethub serve` processes on one PostgreSQL database, as docker-compose.yml runs them
// behind a load balancer (here a TCP pass-through the test points at one node or the other).
// Both run an orchestrator; the lease lets one act on a deployment. kill -9 of the node that
// holds it: the other takes the deployment over once the lease runs out, and finishes it with
// nobody told twice.

const SKIP = process.env.DATABASE_URL ? false : 'needs DATABASE_URL=postgres://… (a PGlite server is single-node)';
const ADMIN = { email: 'failover@example.com', password: 'failover-password-123' };
const COUNT = 12;

/** A TCP pass-through on 127.0.0.1 whose target port can change; new connections go to the new one. */
class Balancer {
  target = 0;
  readonly #server = net.createServer((client) => {
    const upstream = net.connect(this.target, '127.0.0.1');
    client.pipe(upstream).pipe(client);
    const drop = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
  });
  listen(port: number): Promise<void> {
    return new Promise((resolve) => this.#server.listen(port, '127.0.0.1', resolve));
  }
  close(): Promise<void> {
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}

let database: Awaited<ReturnType<typeof createProcessDatabase>>;
let dataDir: string;
const balancer = new Balancer();
const servers: ServerProcess[] = [];
const clients: DeviceClient[] = [];

before(async () => {
  if (SKIP) return;
  database = await createProcessDatabase('failover');
  dataDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-failover-'));
});
after(async () => {
  if (SKIP) return;
  await Promise.all(clients.map((c) => c.stop()));
  for (const server of servers) await server.kill();
  await balancer.close();
  await database?.drop();
  rmSync(dataDir, { recursive: true, force: true });
});

async function leaseHolder(url: string, deploymentId: string): Promise<string | null> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const { rows } = await client.query<{ lease_holder: string | null }>(
      'SELECT lease_holder FROM deployments WHERE id = $1',
      [deploymentId],
    );
    return rows[0]?.lease_holder ?? null;
  } finally {
    await client.end();
  }
}

describe('a deployment on two nodes sharing one PostgreSQL', { skip: SKIP }, () => {
  test('one orchestrator acts; kill -9 its node and the other finishes, nobody told twice', async () => {
    const pki = await getTestPki();
    const publicPort = await freePort();
    await balancer.listen(publicPort);
    const start = async (nodeName: string) => {
      const server = await startServerProcess({
        dataDir,
        certsDir: pki.dir,
        databaseUrl: database!.url,
        nodeName,
        env: { FLEETHUB_ADMIN_EMAIL: ADMIN.email, FLEETHUB_ADMIN_PASSWORD: ADMIN.password },
        // Devices and their downloads reach the nodes through the balancer.
        extraArgs: ['--device-public-url', `https://localhost:${publicPort}`],
      });
      servers.push(server);
      return {
        name: nodeName,
        server,
        port: Number(new URL(server.socketUrl).port),
        ...(await loginTo(server, ADMIN)),
      };
    };
    // One after the other: the first migrates, bootstraps and writes the shared secret.
    const a = await start(`node-a-${process.pid}`);
    const b = await start(`node-b-${process.pid}`);
    balancer.target = a.port;

    const base = await uploadImage(a, '1.0.0', 32 * 1024, 1);
    await uploadImage(a, '2.0.0', 32 * 1024, 2);
    clients.push(
      ...(await startDeviceClients({
        prefix: 'failover',
        count: COUNT,
        url: `wss://localhost:${publicPort}/socket`,
        dataDir,
        firmware: base,
      })),
    );
    await untilOnline(a, 'failover-', COUNT);
    await b.call('POST', '/api/v1/orgs/default/groups', { product: 'default', name: 'failover' });
    await b.call('POST', '/api/v1/orgs/default/groups/failover/devices', { match: 'failover-*' });
    // Created through node B; whichever node claims it first acts. 6 now, 6 a minute later.
    const created = await b.call<DeploymentSummary>('POST', '/api/v1/orgs/default/deployments', {
      product: 'default',
      version: '2.0.0',
      groups: ['failover'],
      rate_per_minute: 6,
    });
    await until(
      async () => {
        const d = await a.call<DeploymentSummary>('GET', `/api/v1/orgs/default/deployments/${created.id}`);
        return d.counts.succeeded === 6 && d.counts.pending === 6;
      },
      'the first 6 to succeed',
      60_000,
    );
    const holderName = await leaseHolder(database!.url, created.id);
    const [holder, survivor] = holderName === a.name ? [a, b] : [b, a];
    assert.equal(holder.name, holderName, 'one of the two nodes holds the lease');

    // The balancer sends new connections to the survivor; the holder dies without a word.
    balancer.target = survivor.port;
    await holder.server.kill();
    await untilOnline(survivor, 'failover-', COUNT, 'every device online on the surviving node');
    // It waits for the dead node's lease to run out (15 s), then takes the deployment over.
    await until(
      async () => (await leaseHolder(database!.url, created.id)) === survivor.name,
      'the surviving node to take the lease over',
      60_000,
    );

    const done = await untilDeploymentCompleted(survivor, created.id, 'the surviving node to complete the deployment');
    // The rate held across the takeover: the second six were told a minute after the first.
    await assertToldOnceAtRate(survivor, done, { count: COUNT, batch: 6, group: 'failover', version: '2.0.0' });
    assert.equal(await leaseHolder(database!.url, created.id), null, 'a completed deployment holds no lease');
  });
});
