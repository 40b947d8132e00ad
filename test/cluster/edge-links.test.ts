/**
 * Edge links across nodes: a GRiSP board and a WiFiDogX gateway are connected to node B, an
 * operator acts through node A. The group target, the membership and the revocation reach the
 * links on B only through PubSub (the PgAdapter), on the devices' own and their group's topics,
 * as they reach Phoenix devices. Skipped on PGlite (single-node by design).
 */
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { buildGrispPackage, GrispBoard } from '../../device-client/simulators/grisp.ts';
import { WifidogxGateway } from '../../device-client/simulators/wifidogx.ts';
import { createUser } from '../../server/api/index.ts';
import { WIFIDOGX_CLOSE } from '../../server/edges/wifidogx/index.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { until } from '../helpers/until.ts';
import { startCluster, type Cluster, type ClusterNode } from './harness.ts';
import { apiCaller, type ApiCall } from '../helpers/api-call.ts';

const SKIP = process.env.DATABASE_URL
  ? false
  : 'needs DATABASE_URL=postgres://… (PGlite has no LISTEN/NOTIFY between processes, so a PGlite server is single-node)';

describe('edge links on node B, operator on node A', { skip: SKIP }, () => {
  let cluster: Cluster;
  let nodeA: ClusterNode;
  let nodeB: ClusterNode;
  let token: string;
  const stops: Array<() => Promise<void>> = [];

  const callA: ApiCall = (method, url, body) => apiCaller(`${nodeA.apiUrl}/api/v1`, token)(method, url, body);

  async function uploadA(path: string, version: string, body: Buffer): Promise<{ id: string }> {
    const res = await fetch(`${nodeA.apiUrl}/api/v1/${path}?org=default&product=default&version=${version}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' },
      body: new Uint8Array(body),
    });
    assert.equal(res.status, 201, await res.clone().text());
    return (await res.json()) as { id: string };
  }

  const deviceRow = (identifier: string) =>
    nodeA.database.db.selectFrom('devices').selectAll().where('identifier', '=', identifier).executeTakeFirst();

  before(async () => {
    // Labs: auto-approval trusts the bare device_id claim, which only the open policy allows.
    cluster = await startCluster(2, { wifidogxAutoApprove: true, wifidogxAuth: 'open' });
    [nodeA, nodeB] = cluster.nodes as [ClusterNode, ClusterNode];
    const email = `admin-${randomUUID().slice(0, 8)}@example.com`;
    const password = 'cluster-password-123456';
    await createUser(nodeA.database.db, { email, password, role: 'admin' });
    const login = await fetch(`${nodeA.apiUrl}/api/v1/auth/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email, password }),
    });
    token = ((await login.json()) as { token: string }).token;
  });

  after(async () => {
    for (const stop of stops) await stop();
    await cluster?.close();
  });

  test('a group target set on node A updates a GRiSP board and a WiFiDogX gateway connected to node B', async () => {
    const tag = randomBytes(3).toString('hex');
    const serial = `GRiSP2 device cl-${tag}`;
    const cred = await deviceCert(serial);
    const tls = await deviceTlsOptions(cred);
    const board = new GrispBoard({
      url: `${nodeB.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`,
      tls: { cert: tls.cert!, key: tls.key!, ca: tls.ca },
      serial,
      version: '1.0.0',
      reconnectMs: 100,
      progressThrottleMs: 0,
    });
    stops.push(() => board.stop());
    await board.start();
    const gateway = new WifidogxGateway({
      url: `${nodeB.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`,
      deviceId: `gw-cl-${tag}`,
      version: '1.0.0',
      reconnectMs: 100,
    });
    stops.push(() => gateway.stop());
    await gateway.start();
    await until(async () => (await deviceRow(serial))?.firmware_version === '1.0.0', 'the board online on B');
    await until(async () => (await deviceRow(gateway.o.deviceId))?.firmware_version === '1.0.0', 'gateway on B');
    assert.equal((await deviceRow(serial))?.connected_node, nodeB.config.nodeName);

    // One artifact both take: a GRiSP package whose first member carries the gateway's version marker.
    const target = await uploadA(
      'grisp/firmware',
      '2.0.0',
      await buildGrispPackage({
        version: '2.0.0',
        blocks: [randomBytes(3000)],
        leading: [{ name: 'VERSION', data: Buffer.from('WIFIDOGX-SIM-FIRMWARE version=2.0.0\n') }],
      }),
    );
    const group = await callA<{ id: string }>('POST', '/orgs/default/groups', {
      product: 'default',
      name: `edges-${tag}`,
    });
    await callA('POST', `/orgs/default/groups/${group.id}/devices`, { devices: [serial, gateway.o.deviceId] });
    await callA('PUT', `/orgs/default/groups/${group.id}/target`, { firmware_id: target.id });
    for (const identifier of [serial, gateway.o.deviceId]) {
      const device = await until(async () => {
        const d = await deviceRow(identifier);
        return d?.firmware_version === '2.0.0' ? d : undefined;
      }, `${identifier} runs 2.0.0`);
      // The board runs 2.0.0 before it validates it; the attempt succeeds once it has.
      const attempts = await until(async () => {
        const rows = await nodeA.database.db
          .selectFrom('update_attempts')
          .select('state')
          .where('device_id', '=', device.id)
          .execute();
        return rows.every((a) => a.state !== 'finished') ? rows : undefined;
      }, `${identifier}'s attempt settled`);
      assert.deepEqual(
        attempts.map((a) => a.state),
        ['succeeded'],
        identifier,
      );
    }
  });

  test('revoking on node A closes the gateway’s link on node B through its close effect', async () => {
    const gateway = new WifidogxGateway({
      url: `${nodeB.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`,
      deviceId: `gw-rv-${randomBytes(3).toString('hex')}`,
      version: '1.0.0',
      reconnectMs: 60_000,
    });
    stops.push(() => gateway.stop());
    await gateway.start();
    const device = await until(async () => {
      const d = await deviceRow(gateway.o.deviceId);
      return d?.connection_status === 'online' ? d : undefined;
    }, 'the gateway online on B');
    const linksBefore = nodeB.edgeRuntime.size;
    const closed = new Promise<{ code: number }>((resolve) => gateway.once('closed', resolve));
    await callA('POST', `/orgs/default/devices/${device.id}/revoke`);
    assert.equal((await closed).code, WIFIDOGX_CLOSE.revoked);
    await until(() => nodeB.edgeRuntime.size === linksBefore - 1 || undefined, 'the link gone from B');
  });
});
