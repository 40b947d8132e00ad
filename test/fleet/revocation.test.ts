import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, openSocket, waitFor } from '../helpers/phoenix.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

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

    const device = await server.database.db.selectFrom('devices').select(['id', 'identifier']).where('identifier', 'like', 'revoked-%').orderBy('created_at', 'desc').executeTakeFirstOrThrow();
    const [certificate] = await server.call<{ id: string }[] | { items: { id: string }[] }>('GET', `/api/v1/orgs/${server.orgId}/devices/${device.id}/certificates`).then((r) => ('items' in r ? r.items : r));
    await server.call('POST', `/api/v1/orgs/${server.orgId}/devices/${device.id}/certificates/${certificate!.id}/revoke`);

    await waitFor(() => closed, 5000, 'the revoked device to be disconnected');
    socket.disconnect();
    assert.equal(await upgradeStatus(`${server.deviceUrl.replace('https:', 'wss:')}/socket/websocket?vsn=2.0.0`, tls), 403);
    await disconnectSocket(socket).catch(() => undefined);
  });
});
