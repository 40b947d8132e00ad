/**
 * Two full fleethub nodes on one PostgreSQL schema: an operator acts through node A's REST API,
 * the device is connected to node B with the official phoenix client over mutual TLS. Every
 * push crosses nodes through the PgAdapter. Skipped on PGlite (single-node by design).
 */
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import https from 'node:https';
import { after, before, describe, test } from 'node:test';
import type { Channel, Socket } from 'phoenix';
import { createUser } from '../../server/api/index.ts';
import {
  disconnectSocket,
  joinChannel,
  nextEvent,
  openSocket,
  pushAndWait,
  RawClient,
  waitFor,
} from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { recordPublished } from '../helpers/pubsub.ts';
import { until } from '../helpers/until.ts';
import { startCluster, type Cluster, type ClusterNode } from './harness.ts';
import { apiCaller, type ApiCall } from '../helpers/api-call.ts';

const SKIP = process.env.DATABASE_URL
  ? false
  : 'needs DATABASE_URL=postgres://… (PGlite has no LISTEN/NOTIFY between processes, so a PGlite server is single-node)';

const IMAGE_V1 = Buffer.alloc(1000, 1);
const IMAGE_V2 = Buffer.from(Array.from({ length: 3000 }, (_, i) => (i * 31) % 256));

interface FirmwareJson {
  id: string;
  version: string;
  sha256: string | null;
  size: number | null;
}

describe('two nodes sharing one PostgreSQL', { skip: SKIP }, () => {
  let cluster: Cluster;
  let nodeA: ClusterNode;
  let nodeB: ClusterNode;
  let token: string;
  let v1: FirmwareJson;
  let v2: FirmwareJson;
  const sockets: Socket[] = [];

  /** Calls node A's operator API as an admin; throws with the server's error on a non-2xx answer. */
  const callA: ApiCall = (method, url, body) => apiCaller(`${nodeA.apiUrl}/api/v1`, token)(method, url, body);

  /** A device with a certificate from the registered signer CA, on node B, joined to its device channel. */
  async function deviceOnNodeB(firmwareUuid: string): Promise<{ serial: string; socket: Socket; channel: Channel }> {
    const serial = `cluster-${randomUUID().slice(0, 8)}`;
    const socket = await openSocket(nodeB.socketUrl, { tls: await deviceTlsOptions(await deviceCert(serial)) });
    sockets.push(socket);
    const channel = socket.channel(`device:${firmwareUuid}`, {});
    await joinChannel(channel);
    return { serial, socket, channel };
  }

  /** GETs `url` over mutual TLS as a device; resolves with the status and body. */
  async function downloadAsDevice(url: string, serial: string): Promise<{ status: number; body: Buffer }> {
    const tls = await deviceTlsOptions(await deviceCert(serial));
    return new Promise((resolve, reject) => {
      https
        .get(url, { ...tls, agent: false }, (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
          res.on('error', reject);
        })
        .on('error', reject);
    });
  }

  /** Streams an image to node A's firmware upload. */
  async function uploadViaNodeA(version: string, image: Buffer): Promise<FirmwareJson> {
    const res = await fetch(`${nodeA.apiUrl}/api/v1/firmware?org=default&product=default&version=${version}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' },
      body: new Uint8Array(image),
    });
    assert.equal(res.status, 201, await res.clone().text());
    return (await res.json()) as FirmwareJson;
  }

  /** A unique group of the default product, created through node A. */
  async function groupViaNodeA(): Promise<{ id: string; name: string; topic: string }> {
    return callA('POST', '/orgs/default/groups', { product: 'default', name: `g-${randomUUID().slice(0, 8)}` });
  }

  before(async () => {
    cluster = await startCluster(2);
    [nodeA, nodeB] = cluster.nodes as [ClusterNode, ClusterNode];
    const email = `admin-${randomUUID().slice(0, 8)}@example.com`;
    const password = 'cluster-password-123456';
    await createUser(nodeA.database.db, { email, password, role: 'admin' });
    const login = await fetch(`${nodeA.apiUrl}/api/v1/auth/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email, password }),
    });
    assert.equal(login.status, 200, await login.clone().text());
    token = ((await login.json()) as { token: string }).token;
    v1 = await uploadViaNodeA('1.0.0', IMAGE_V1);
    v2 = await uploadViaNodeA('2.0.0', IMAGE_V2);
  });

  after(async () => {
    await Promise.allSettled(sockets.map((s) => disconnectSocket(s)));
    await cluster?.close();
  });

  test('each node has its own listeners and PubSub, and both listen on one NOTIFY channel', () => {
    assert.notEqual(nodeA.deviceUrl, nodeB.deviceUrl);
    assert.notEqual(nodeA.adapter.origin, nodeB.adapter.origin);
    assert.equal(nodeA.adapter.channel, nodeB.adapter.channel);
    assert.notEqual(nodeA.pubsub, nodeB.pubsub);
  });

  test('a device on node B gets a join push when node A adds it to a group', async () => {
    const device = await deviceOnNodeB(v1.id);
    const group = await groupViaNodeA();
    const [joinPush] = await Promise.all([
      nextEvent(device.channel, 'join'),
      callA('POST', `/orgs/default/groups/${group.name}/devices`, { devices: [device.serial] }),
    ]);
    assert.deepEqual(joinPush, { channel: group.topic });
    // The group channel it was told about is joinable on node B.
    await joinChannel(device.socket.channel(group.topic, {}));
  });

  test('a device on node B gets firmware_update once when an operator retargets its group through node A', async () => {
    const device = await deviceOnNodeB(v1.id);
    const group = await groupViaNodeA();
    await Promise.all([
      nextEvent(device.channel, 'join'),
      callA('POST', `/orgs/default/groups/${group.name}/devices`, { devices: [device.serial] }),
    ]);
    const groupChannel = device.socket.channel(group.topic, {});
    const updates: Record<string, unknown>[] = [];
    groupChannel.on('firmware_update', (payload: Record<string, unknown>) => {
      updates.push(payload);
    });
    const deviceChannelUpdates: Record<string, unknown>[] = [];
    device.channel.on('firmware_update', (payload: Record<string, unknown>) => {
      deviceChannelUpdates.push(payload);
    });
    await joinChannel(groupChannel);

    const [payload] = await Promise.all([
      nextEvent(groupChannel, 'firmware_update'),
      callA('PUT', `/orgs/default/groups/${group.name}/target`, { version: '2.0.0' }),
    ]);
    assert.equal(payload.version, '2.0.0');
    assert.equal(payload.firmware_uuid, v2.id);
    assert.equal(payload.sha256, v2.sha256);
    assert.equal(payload.size, IMAGE_V2.length);
    assert.match(
      String(payload.url),
      new RegExp(`^${nodeA.deviceUrl}/firmware/${v2.id}\\?`),
      'node A signed the download URL',
    );

    // A round trip on the socket: a duplicate still in flight would arrive before this reply.
    await pushAndWait(device.channel, 'no_such_event', {});
    assert.equal(updates.length + deviceChannelUpdates.length, 1, 'exactly one firmware_update');
    const attempt = await nodeB.database.db
      .selectFrom('update_attempts')
      .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
      .select('update_attempts.state')
      .where('devices.identifier', '=', device.serial)
      .executeTakeFirstOrThrow();
    assert.equal(attempt.state, 'sent');

    // Behind a load balancer the download may land on either node: node B serves node A's signed URL.
    const viaNodeB = String(payload.url).replace(nodeA.deviceUrl, nodeB.deviceUrl);
    const download = await downloadAsDevice(viaNodeB, device.serial);
    assert.equal(download.status, 200);
    assert.equal(createHash('sha256').update(download.body).digest('hex'), v2.sha256);
  });

  test("a certificate revoked through node A closes the device's not yet joined socket on node B", async () => {
    const serial = `cluster-revoked-${randomUUID().slice(0, 8)}`;
    const socket = await openSocket(nodeB.socketUrl, {
      tls: await deviceTlsOptions(await deviceCert(serial)),
      reconnectAfterMs: () => 60_000,
    });
    sockets.push(socket);
    let closed = false;
    socket.onClose(() => {
      closed = true;
    });
    const device = await nodeA.database.db
      .selectFrom('devices')
      .select('id')
      .where('identifier', '=', serial)
      .executeTakeFirstOrThrow();
    const certificate = await nodeA.database.db
      .selectFrom('device_certificates')
      .select('id')
      .where('device_id', '=', device.id)
      .executeTakeFirstOrThrow();
    await callA('POST', `/orgs/default/devices/${device.id}/certificates/${certificate.id}/revoke`);
    await waitFor(() => closed, 5000, 'node B to close the revoked device');
    socket.disconnect();
  });

  /** A raw WebSocket of `cred`'s device on `node`, joined to its device channel. */
  async function joinedRaw(node: ClusterNode, cred: Awaited<ReturnType<typeof deviceCert>>): Promise<RawClient> {
    const client = await RawClient.connect(`${node.socketUrl}/websocket?vsn=2.0.0`, await deviceTlsOptions(cred));
    client.send(['1', '1', `device:${randomUUID()}`, 'phx_join', { version: '1.0.0' }]);
    const reply = await client.waitArray((f) => f[3] === 'phx_reply' && f[1] === '1');
    assert.equal((reply[4] as { status: string }).status, 'ok', JSON.stringify(reply));
    return client;
  }

  test('a connect to node A replaces the device’s connection on node B with one message on its topic', async () => {
    const serial = `cluster-takeover-${randomUUID().slice(0, 8)}`;
    const cred = await deviceCert(serial);
    const onB = await joinedRaw(nodeB, cred);
    const device = await nodeA.database.db
      .selectFrom('devices')
      .select(['id', 'connected_node'])
      .where('identifier', '=', serial)
      .executeTakeFirstOrThrow();
    assert.equal(device.connected_node, nodeB.config.nodeName);
    const published = recordPublished(nodeA.pubsub);
    const onA = await joinedRaw(nodeA, cred);
    assert.equal(await onB.closed, 1008, 'node B closed the replaced connection');
    published.stop();
    assert.deepEqual(
      published.messages.filter((m) => !m.topic.startsWith('operator:')),
      [{ topic: `device_id:${device.id}`, event: 'connection_replaced' }],
      'the takeover is one message, on the device topic',
    );
    assert.equal(onA.closeCode, undefined, 'the new connection lives on');
    // Node B's socket ending leaves the device online on node A.
    await until(async () => {
      const row = await nodeA.database.db
        .selectFrom('devices')
        .select(['connected_node', 'connection_status'])
        .where('id', '=', device.id)
        .executeTakeFirstOrThrow();
      return row.connection_status === 'online' && row.connected_node === nodeA.config.nodeName ? row : undefined;
    }, 'the device recorded online on node A');
    onA.ws.close();
  });

  test('a certificate revoked through node A closes the device’s joined socket on node B with 1008', async () => {
    const serial = `cluster-revoked-joined-${randomUUID().slice(0, 8)}`;
    const onB = await joinedRaw(nodeB, await deviceCert(serial));
    const row = await nodeA.database.db
      .selectFrom('devices')
      .innerJoin('device_certificates', 'device_certificates.device_id', 'devices.id')
      .select(['devices.id as deviceId', 'device_certificates.id as certificateId'])
      .where('devices.identifier', '=', serial)
      .executeTakeFirstOrThrow();
    await callA('POST', `/orgs/default/devices/${row.deviceId}/certificates/${row.certificateId}/revoke`);
    assert.equal(await onB.closed, 1008);
  });

  test('an API token revoked through node A closes its operator socket on node B', async () => {
    const created = await callA<{ token: string; api_token: { id: string } }>('POST', '/tokens', {
      name: `wall-${randomUUID().slice(0, 8)}`,
    });
    const client = await RawClient.connect(
      `${nodeB.apiUrl.replace('http', 'ws')}/socket/websocket?vsn=2.0.0&token=${encodeURIComponent(created.token)}`,
      {},
    );
    const closed = new Promise<string>((resolve) =>
      client.ws.once('close', (_code: number, reason: Buffer) => resolve(reason.toString())),
    );
    await callA('DELETE', `/tokens/${created.api_token.id}`);
    const timeout = new Promise<never>((_, reject) =>
      setTimeout(() => reject(new Error('the operator socket on node B stayed open')), 5000).unref(),
    );
    assert.equal(await Promise.race([closed, timeout]), 'API token revoked');
  });
});
