/**
 * The edge runtime (server/edges/runtime.ts) against the real server: real TLS, real sockets,
 * the simulated GRiSP board and WiFiDogX gateway. Revocation reaches a link on its device topic
 * and closes it through the close effect; a group target reaches it on the group's topic; at
 * shutdown every edge socket hears 1012, as Phoenix sockets do.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';
import { simulatorImage, WifidogxGateway } from '../../device-client/simulators/wifidogx.ts';
import { WIFIDOGX_CLOSE } from '../../server/edges/wifidogx/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';

/** Resolves with the close code the server sends on `ws`. */
function closeCode(ws: WebSocket): Promise<number> {
  return new Promise((resolve) => ws.once('close', (code) => resolve(code)));
}

function opened(ws: WebSocket): Promise<void> {
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
}

async function deviceByIdentifier(server: TestServer, identifier: string) {
  return server.database.db.selectFrom('devices').selectAll().where('identifier', '=', identifier).executeTakeFirst();
}

describe(`edge runtime (${DATABASE_KIND})`, () => {
  let server: TestServer;
  const gateways: WifidogxGateway[] = [];

  /** An auto-approved gateway (labs policy), online with `version`. */
  async function gateway(version = '1.0.0'): Promise<WifidogxGateway> {
    const g = new WifidogxGateway({
      url: `${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`,
      deviceId: `gw-${randomBytes(4).toString('hex')}`,
      version,
      reconnectMs: 100,
    });
    gateways.push(g);
    await g.start();
    await until(async () => (await deviceByIdentifier(server, g.o.deviceId))?.firmware_version === version, 'online');
    return g;
  }

  before(async () => {
    server = await startTestServer({ wifidogxAutoApprove: true, wifidogxAuth: 'open' });
  });
  after(async () => {
    for (const g of gateways) await g.stop();
    await server.close();
  });

  it('closes a revoked gateway’s link with its revoked code, and the link leaves its topics', async () => {
    const topicsBefore = server.edgeRuntime.topicCount;
    const g = await gateway();
    assert.ok(server.edgeRuntime.topicCount > topicsBefore, 'the link subscribed to its device topic');
    const device = (await deviceByIdentifier(server, g.o.deviceId))!;
    const closed = new Promise<{ code: number }>((resolve) => g.once('closed', resolve));
    await server.call('POST', `/api/v1/orgs/${server.orgId}/devices/${device.id}/revoke`);
    assert.equal((await closed).code, WIFIDOGX_CLOSE.revoked);
    await until(() => server.edgeRuntime.topicCount === topicsBefore || undefined, 'the link unsubscribed');
    await until(
      async () => (await deviceByIdentifier(server, g.o.deviceId))?.connection_status === 'offline' || undefined,
      'offline',
    );
  });

  it('a group target reaches a member gateway on the group topic; joining a group subscribes it', async () => {
    const g = await gateway('1.0.0');
    const device = (await deviceByIdentifier(server, g.o.deviceId))!;
    const group = await server.call<{ id: string }>('POST', `/api/v1/orgs/${server.orgId}/groups`, {
      product: server.productId,
      name: `rt-${randomBytes(3).toString('hex')}`,
    });
    const topicsBefore = server.edgeRuntime.topicCount;
    await server.call('POST', `/api/v1/orgs/${server.orgId}/groups/${group.id}/devices`, { devices: [device.id] });
    await until(() => server.edgeRuntime.topicCount === topicsBefore + 1 || undefined, 'the group topic subscribed');
    const res = await fetch(
      `${server.apiUrl}/api/v1/firmware?product=${server.productId}&org=${server.orgId}&version=2.0.0`,
      {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
        body: new Uint8Array(simulatorImage('2.0.0')),
      },
    );
    assert.equal(res.status, 201, await res.clone().text());
    const firmware = (await res.json()) as { id: string };
    const change = await server.call<{ delivery: string }>(
      'PUT',
      `/api/v1/orgs/${server.orgId}/groups/${group.id}/target`,
      { firmware_id: firmware.id },
    );
    assert.equal(change.delivery, 'group');
    await until(
      async () => (await deviceByIdentifier(server, g.o.deviceId))?.firmware_version === '2.0.0' || undefined,
      'the gateway runs the group target',
    );
  });

  it('closes GRiSP and WiFiDogX sockets with 1012 when the server shuts down', async () => {
    const serial = `GRiSP2 device rt${randomBytes(3).toString('hex')}`;
    const tls = await deviceTlsOptions(await deviceCert(serial));
    const board = new WebSocket(`${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`, 'grisp-io-v1', tls);
    const gatewayId = `gw-${randomBytes(4).toString('hex')}`;
    const gw = new WebSocket(`${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`);
    const boardClosed = closeCode(board);
    const gatewayClosed = closeCode(gw);
    await Promise.all([opened(board), opened(gw)]);
    gw.send(JSON.stringify({ type: 'connect', device_id: gatewayId }));
    await until(
      async () => (await deviceByIdentifier(server, gatewayId))?.connection_status === 'online' || undefined,
      'the gateway online',
    );
    for (const g of gateways) await g.stop();
    gateways.length = 0;
    // The board answers nothing (it never shows online): its link is open on the runtime.
    await until(() => server.edgeRuntime.size === 2 || undefined, 'both links open');
    await server.close();
    assert.equal(await boardClosed, 1012);
    assert.equal(await gatewayClosed, 1012);
  });
});
