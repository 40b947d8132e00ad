import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { edgeDeviceOnline, findOrRegisterEdgeDevice } from '../../server/fleet/edge-devices.ts';
import { createFirmware, SYSTEM, type Firmware } from '../../server/fleet/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, openSocket } from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

/**
 * What a device says it runs is recorded on the device, never in the firmware catalogue: made-up
 * firmware uuids (Phoenix joins) or versions (edges) create no firmware rows and no audit rows,
 * and operators' firmware lists hold only what operators added.
 */
describe(`reported firmware stays out of the catalogue (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let uploaded: Firmware;

  before(async () => {
    server = await startTestServer();
    uploaded = await createFirmware(server.fleet, SYSTEM, {
      orgId: server.orgId,
      productId: server.productId,
      version: '1.0.0',
      sha256: createHash('sha256').update('1.0.0').digest('hex'),
      size: 1024,
      hasBlob: true,
    });
  });
  after(async () => {
    await server?.close();
  });

  async function count(table: 'firmware' | 'audit_log'): Promise<number> {
    const row = await server.database.db
      .selectFrom(table)
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .where('org_id', '=', server.orgId)
      .executeTakeFirstOrThrow();
    return Number(row.n);
  }

  async function firmwareChangedAudits(deviceId: string): Promise<number> {
    const rows = await server.database.db
      .selectFrom('audit_log')
      .select('id')
      .where('action', '=', 'device.firmware_changed')
      .where('resource_id', '=', deviceId)
      .execute();
    return rows.length;
  }

  test('50 joins with made-up firmware uuids create no firmware and no audit rows; the device shows what it reported', async () => {
    const serial = `random-joins-${randomUUID().slice(0, 8)}`;
    const socket = await openSocket(`${server.deviceUrl}/socket`, {
      tls: await deviceTlsOptions(await deviceCert(serial)),
      reconnectAfterMs: () => 60_000,
    });
    try {
      // The connect registered the device just in time (one audit row): count from here.
      const [firmwareBefore, auditBefore] = [await count('firmware'), await count('audit_log')];
      let last = { uuid: '', version: '' };
      for (let i = 0; i < 50; i++) {
        last = { uuid: randomUUID(), version: `0.${i}.${Math.floor(Math.random() * 1000)}` };
        const channel = socket.channel(`device:${last.uuid}`, {
          version: last.version,
          platform: 'rpi4',
          architecture: 'arm',
        });
        await joinChannel(channel);
        await new Promise<void>((resolve) => channel.leave().receive('ok', () => resolve()));
      }
      assert.equal(await count('firmware'), firmwareBefore, 'no firmware rows');
      assert.equal(await count('audit_log'), auditBefore, 'no audit rows');

      const { items } = await server.call<{ items: Array<Record<string, unknown>> }>(
        'GET',
        `/api/v1/orgs/${server.orgId}/devices?q=${serial}`,
      );
      assert.equal(items.length, 1);
      assert.equal(items[0]!.firmware_uuid, last.uuid);
      assert.equal(items[0]!.firmware_version, last.version);
      assert.equal(items[0]!.platform, 'rpi4');
      const firmware = await server.call<{ items: Array<{ id: string }> }>(
        'GET',
        `/api/v1/orgs/${server.orgId}/firmware`,
      );
      assert.deepEqual(
        firmware.items.map((f) => f.id),
        [uploaded.id],
        'the firmware list shows only uploads',
      );
      const status = await server.call<{ versions: Record<string, number> }>(
        'GET',
        `/api/v1/orgs/${server.orgId}/status`,
      );
      assert.equal(status.versions[last.version], 1, 'status counts the reported version');
    } finally {
      await disconnectSocket(socket).catch(() => undefined);
    }
  });

  test('a device alternating between catalogue firmware and made-up uuids is audited once', async () => {
    const serial = `alternating-${randomUUID().slice(0, 8)}`;
    const socket = await openSocket(`${server.deviceUrl}/socket`, {
      tls: await deviceTlsOptions(await deviceCert(serial)),
      reconnectAfterMs: () => 60_000,
    });
    try {
      for (let i = 0; i < 10; i++) {
        const topic = i % 2 === 0 ? `device:${uploaded.id}` : `device:${randomUUID()}`;
        const channel = socket.channel(topic, { version: `9.9.${i}` });
        await joinChannel(channel);
        await new Promise<void>((resolve) => channel.leave().receive('ok', () => resolve()));
      }
      const device = await server.database.db
        .selectFrom('devices')
        .select('id')
        .where('identifier', '=', serial)
        .executeTakeFirstOrThrow();
      assert.equal(await firmwareChangedAudits(device.id), 1);
    } finally {
      await disconnectSocket(socket).catch(() => undefined);
    }
  });

  test('an edge device reporting 50 made-up versions creates no firmware and no audit rows; uploading its version links it', async () => {
    const { device } = await findOrRegisterEdgeDevice(server.fleet, {
      orgId: server.orgId,
      productId: server.productId,
      identifier: `edge-${randomUUID().slice(0, 8)}`,
      protocol: 'wifidogx',
      approval: 'approved',
    });
    const ref = { deviceId: device.id, orgId: device.org_id };
    const [firmwareBefore, auditBefore] = [await count('firmware'), await count('audit_log')];
    let version = '';
    for (let i = 0; i < 50; i++) {
      version = `3.${i}.${Math.floor(Math.random() * 1000)}`;
      const online = await edgeDeviceOnline(server.fleet, ref, { version, platform: 'ramips' });
      assert.deepEqual(online.running, { id: null, component: 'firmware', version });
    }
    assert.equal(await count('firmware'), firmwareBefore, 'no firmware rows');
    assert.equal(await count('audit_log'), auditBefore, 'no audit rows');
    const shown = await server.call<Record<string, unknown>>(
      'GET',
      `/api/v1/orgs/${server.orgId}/devices/${device.id}`,
    );
    assert.equal(shown.firmware_version, version);
    assert.equal(shown.firmware_uuid, null);

    // The operator uploads the version the gateway runs: targeting it then sends the gateway nothing.
    const catalogued = await createFirmware(server.fleet, SYSTEM, {
      orgId: server.orgId,
      productId: server.productId,
      version,
      sha256: createHash('sha256').update(version).digest('hex'),
      size: 1,
      hasBlob: true,
    });
    assert.equal(
      (await server.call<Record<string, unknown>>('GET', `/api/v1/orgs/${server.orgId}/devices/${device.id}`))
        .firmware_uuid,
      catalogued.id,
    );
    const change = await server.call<{ attempts: { sent: number; queued: number } }>(
      'PUT',
      `/api/v1/orgs/${server.orgId}/devices/${device.id}/target`,
      { firmware_id: catalogued.id },
    );
    assert.deepEqual(change.attempts, { sent: 0, queued: 0 });
  });
});
