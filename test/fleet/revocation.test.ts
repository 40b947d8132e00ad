import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import https from 'node:https';
import { after, afterEach, before, describe, test } from 'node:test';
import type { Socket } from 'phoenix';
import WebSocket from 'ws';
import { SYSTEM } from '../../server/audit.ts';
import { revokeDeviceCertificate } from '../../server/identity/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, openSocket, RawClient, waitFor } from '../helpers/phoenix.ts';
import { recordPublished } from '../helpers/pubsub.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';

/** Opens a raw WebSocket with a client certificate and resolves the HTTP status of a refused upgrade (or 101). */
function upgradeStatus(url: string, tls: { cert: string; key: string; ca: string }): Promise<number> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { cert: tls.cert, key: tls.key, ca: tls.ca });
    ws.on('open', () => {
      ws.close();
      resolve(101);
    });
    ws.on('unexpected-response', (_req, res) => {
      resolve(res.statusCode ?? 0);
      res.resume();
    });
    ws.on('error', (err) => reject(err));
  });
}

describe(`revoking a connected device's certificate (${DATABASE_KIND})`, () => {
  let server: TestServer;
  before(async () => {
    server = await startTestServer();
  });
  after(async () => {
    await server.close();
  });

  test('closes its live connection at once and refuses the next one with 403', async () => {
    const pki = await getTestPki();
    const cred = await deviceCert(`revoked-${randomUUID().slice(0, 8)}`);
    const tls = { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem };
    const socket = await openSocket(`${server.deviceUrl}/socket`, { tls, reconnectAfterMs: () => 60_000 });
    let closed = false;
    socket.onClose(() => {
      closed = true;
    });
    const channel = socket.channel(`device:${randomUUID()}`, { version: '1.0.0' });
    await joinChannel(channel);

    const device = await server.database.db
      .selectFrom('devices')
      .select(['id', 'identifier'])
      .where('identifier', 'like', 'revoked-%')
      .orderBy('created_at', 'desc')
      .executeTakeFirstOrThrow();
    const [certificate] = await server
      .call<{ id: string }[] | { items: { id: string }[] }>(
        'GET',
        `/api/v1/orgs/${server.orgId}/devices/${device.id}/certificates`,
      )
      .then((r) => ('items' in r ? r.items : r));
    await server.call(
      'POST',
      `/api/v1/orgs/${server.orgId}/devices/${device.id}/certificates/${certificate!.id}/revoke`,
    );

    await waitFor(() => closed, 5000, 'the revoked device to be disconnected');
    socket.disconnect();
    assert.equal(
      await upgradeStatus(`${server.deviceUrl.replace('https:', 'wss:')}/socket/websocket?vsn=2.0.0`, tls),
      403,
    );
    await disconnectSocket(socket).catch(() => undefined);
  });

  const opened: Socket[] = [];
  afterEach(() => {
    for (const socket of opened.splice(0)) socket.disconnect();
  });

  /** A device connected over the official client (no automatic reconnect), with its ids. */
  async function connectedDevice(prefix: string) {
    const pki = await getTestPki();
    const identifier = `${prefix}-${randomUUID().slice(0, 8)}`;
    const cred = await deviceCert(identifier);
    const tls = { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem };
    const socket = await openSocket(`${server.deviceUrl}/socket`, {
      tls,
      reconnectAfterMs: () => 60_000,
      rejoinAfterMs: () => 60_000,
    });
    const state = { closed: false };
    socket.onClose(() => {
      state.closed = true;
    });
    opened.push(socket);
    const device = await server.database.db
      .selectFrom('devices')
      .select(['id'])
      .where('identifier', '=', identifier)
      .executeTakeFirstOrThrow();
    const certificate = await server.database.db
      .selectFrom('device_certificates')
      .select(['id'])
      .where('device_id', '=', device.id)
      .executeTakeFirstOrThrow();
    return { socket, state, tls, deviceId: device.id, certificateId: certificate.id };
  }

  const revokeUrl = (deviceId: string, certificateId: string) =>
    `/api/v1/orgs/${server.orgId}/devices/${deviceId}/certificates/${certificateId}/revoke`;

  async function joinError(socket: Socket, topic: string, params: object = {}): Promise<Record<string, unknown>> {
    const channel = socket.channel(topic, params);
    const err = await joinChannel(channel).then(
      () => assert.fail(`the join of ${topic} must be refused`),
      (e: { response?: Record<string, unknown> }) => e,
    );
    channel.leave(); // no rejoin timer left behind
    return err.response ?? {};
  }

  test('a LongPoll session that has not joined is closed at once when its certificate is revoked, not at its session timeout', async () => {
    const pki = await getTestPki();
    const identifier = `longpoll-${randomUUID().slice(0, 8)}`;
    const cred = await deviceCert(identifier);
    const tls = { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem };
    // The LongPoll protocol by hand: the official client would keep polling and retrying around
    // the revocation; what is under test is the server's session.
    const first = await new Promise<string>((resolve, reject) =>
      https
        .get(`${server.deviceUrl}/socket/longpoll?vsn=2.0.0`, { ...tls, agent: false }, (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve(body));
        })
        .on('error', reject),
    );
    assert.equal((JSON.parse(first) as { status: number }).status, 410, first);
    // Not joined: a joined device channel stops on the revocation by itself; the session must end too.
    const device = await server.database.db
      .selectFrom('devices')
      .select(['id'])
      .where('identifier', '=', identifier)
      .executeTakeFirstOrThrow();
    const certificate = await server.database.db
      .selectFrom('device_certificates')
      .select(['id'])
      .where('device_id', '=', device.id)
      .executeTakeFirstOrThrow();
    const sessions = server.deviceEndpoint.stats.longpollSessions;
    assert.ok(sessions >= 1, 'the LongPoll session is open');

    await server.call('POST', revokeUrl(device.id, certificate.id));
    // Well inside the 15 s LongPoll session timeout.
    await until(
      () => server.deviceEndpoint.stats.longpollSessions === sessions - 1,
      'the LongPoll session to end',
      2000,
    );
  });

  test('a LongPoll request with a revoked certificate is refused in words the official client understands', async () => {
    const device = await connectedDevice('longpoll-refused');
    device.socket.disconnect();
    await server.call('POST', revokeUrl(device.deviceId, device.certificateId));
    const refused = await new Promise<{ status?: number; body: string }>((resolve, reject) =>
      https
        .get(`${server.deviceUrl}/socket/longpoll?vsn=2.0.0`, { ...device.tls, agent: false }, (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve({ status: res.statusCode, body }));
        })
        .on('error', reject),
    );
    assert.equal(refused.status, 403, refused.body);
    // phoenix's LongPoll reads the outcome from the body and throws on any status it does not know.
    assert.equal((JSON.parse(refused.body) as { status: number }).status, 403, refused.body);
    await assert.rejects(
      openSocket(`${server.deviceUrl}/socket`, { tls: device.tls, longpoll: true, reconnectAfterMs: () => 60_000 }),
      /socket error: 403/,
    );
  });

  test('a revocation is one message, on the device topic; joined and not yet joined sockets close with 1008', async () => {
    const pki = await getTestPki();
    const url = `${server.deviceUrl.replace('https:', 'wss:')}/socket/websocket?vsn=2.0.0`;
    /** A raw WebSocket of a new device (joined to its device channel when `join`), with its ids. */
    const device = async (join: boolean) => {
      const identifier = `one-message-${randomUUID().slice(0, 8)}`;
      const cred = await deviceCert(identifier);
      const client = await RawClient.connect(url, { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem });
      if (join) {
        client.send(['1', '1', `device:${randomUUID()}`, 'phx_join', { version: '1.0.0' }]);
        const reply = await client.waitArray((f) => f[3] === 'phx_reply' && f[1] === '1');
        assert.equal((reply[4] as { status: string }).status, 'ok', JSON.stringify(reply));
      }
      const row = await server.database.db
        .selectFrom('devices')
        .innerJoin('device_certificates', 'device_certificates.device_id', 'devices.id')
        .select(['devices.id as deviceId', 'device_certificates.id as certificateId'])
        .where('devices.identifier', '=', identifier)
        .executeTakeFirstOrThrow();
      return { client, ...row };
    };
    for (const join of [true, false]) {
      const d = await device(join);
      const published = recordPublished(server.pubsub);
      await server.call('POST', revokeUrl(d.deviceId, d.certificateId));
      published.stop();
      assert.equal(await d.client.closed, 1008, `${join ? 'joined' : 'not joined'}: closed with the protocol's code`);
      assert.deepEqual(
        published.messages.filter((m) => !m.topic.startsWith('operator:')),
        [{ topic: `device_id:${d.deviceId}`, event: 'certificate_revoked' }],
        'one message reaches the cluster, on the device topic',
      );
    }
  });

  test('a connected socket that has not joined yet is closed when its certificate is revoked', async () => {
    const device = await connectedDevice('unjoined-cert');
    await server.call('POST', revokeUrl(device.deviceId, device.certificateId));
    await waitFor(() => device.state.closed, 5000, 'the unjoined socket to be closed');
    device.socket.disconnect();
  });

  test('a connected socket that has not joined yet is closed when its device is revoked', async () => {
    const device = await connectedDevice('unjoined-device');
    await server.call('POST', `/api/v1/orgs/${server.orgId}/devices/${device.deviceId}/revoke`);
    await waitFor(() => device.state.closed, 5000, 'the unjoined socket to be closed');
    device.socket.disconnect();
  });

  test('a phx_join over a connection whose certificate was revoked is refused', async () => {
    const device = await connectedDevice('join-after-cert');
    // Straight in the database: no broadcast closes the socket, so the join itself must refuse.
    await revokeDeviceCertificate(server.database.db, SYSTEM, device.certificateId);
    const refused = await joinError(device.socket, `device:${randomUUID()}`, { version: '1.0.0' });
    assert.match(String(refused.reason), /certificate is revoked/);
    await disconnectSocket(device.socket);
  });

  test('a phx_join of a device revoked since it connected is refused, also on the unchanged-rejoin path', async () => {
    const device = await connectedDevice('join-after-device');
    const topic = `device:${randomUUID()}`;
    const channel = device.socket.channel(topic, { version: '1.0.0' });
    await joinChannel(channel);
    await new Promise<void>((resolve) => channel.leave().receive('ok', () => resolve()));
    await server.database.db
      .updateTable('devices')
      .set({ approval: 'revoked' })
      .where('id', '=', device.deviceId)
      .execute();
    const refused = await joinError(device.socket, topic, { version: '1.0.0' });
    assert.match(String(refused.reason), /revoked/);
    await disconnectSocket(device.socket);
  });

  test('a group join over a connection whose certificate was revoked is refused', async () => {
    const device = await connectedDevice('group-after-cert');
    const group = await server.call<{ id: string; name: string }>('POST', `/api/v1/orgs/${server.orgId}/groups`, {
      product: server.productId,
      name: `g-${randomUUID().slice(0, 8)}`,
    });
    await server.call('POST', `/api/v1/orgs/${server.orgId}/groups/${group.id}/devices`, {
      devices: [device.deviceId],
    });
    const joined = await joinChannel(device.socket.channel(`device:${randomUUID()}`, { version: '1.0.0' }));
    const [groupTopic] = joined.groups as string[];
    assert.ok(groupTopic, 'the device is told its group');
    await revokeDeviceCertificate(server.database.db, SYSTEM, device.certificateId);
    assert.equal((await joinError(device.socket, groupTopic)).reason, 'unauthorized');
    await disconnectSocket(device.socket);
  });

  test('a firmware download in progress is cut when its certificate is revoked, and the next one is refused', async () => {
    const device = await connectedDevice('download');
    device.socket.disconnect();
    const size = 24 * 1024 * 1024;
    const upload = await fetch(
      `${server.apiUrl}/api/v1/firmware?org=${server.orgId}&product=${server.productId}&version=9.${Date.now() % 100000}.0`,
      {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
        body: randomBytes(size),
      },
    );
    assert.equal(upload.status, 201, await upload.clone().text());
    const firmware = (await upload.json()) as { id: string };
    const url = new URL(server.fleet.firmwareUrl({ id: firmware.id } as never).replace('localhost', '127.0.0.1'));
    const get = () => https.get(url, { agent: false, ...device.tls, servername: 'localhost' });

    const outcome = await new Promise<{ received: number; cut: boolean }>((resolve, reject) => {
      get()
        .on('response', (res) => {
          assert.equal(res.statusCode, 200);
          let received = 0;
          let revoked = false;
          res.on('data', (chunk: Buffer) => {
            received += chunk.length;
            if (revoked) return;
            revoked = true;
            // Hold the stream while the revocation lands: the server is mid-way through the image.
            res.pause();
            server
              .call('POST', revokeUrl(device.deviceId, device.certificateId))
              .then(() => setTimeout(() => res.resume(), 200), reject);
          });
          res.on('end', () => resolve({ received, cut: false }));
          res.on('aborted', () => resolve({ received, cut: true }));
          res.on('error', () => resolve({ received, cut: true }));
        })
        .on('error', reject);
    });
    assert.equal(outcome.cut, true, `the download must be cut (received ${outcome.received} of ${size} bytes)`);
    assert.ok(outcome.received < size);
    const next = await new Promise<number>((resolve, reject) =>
      get()
        .on('response', (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        })
        .on('error', reject),
    );
    assert.equal(next, 403);
  });
});
