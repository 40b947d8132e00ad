import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { SYSTEM } from '../../server/audit.ts';
import { createDevice } from '../../server/fleet/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

interface DeviceJson {
  id: string;
  identifier: string;
  approval: string;
}

describe(`device approval through the REST API (${DATABASE_KIND})`, () => {
  let server: TestServer;
  before(async () => {
    server = await startTestServer();
  });
  after(async () => {
    await server.close();
  });

  const devices = (query: string) =>
    server.call<{ items: DeviceJson[]; total: number }>('GET', `/api/v1/orgs/${server.orgId}/devices?${query}`);

  test('a pending device is listed by the approval filter, approved, then revoked', async () => {
    const pending = await createDevice(server.fleet, SYSTEM, {
      orgId: server.orgId,
      productId: server.productId,
      identifier: 'gw-pending-1',
      protocol: 'wifidogx',
      approval: 'pending',
    });
    assert.deepEqual(
      (await devices('approval=pending')).items.map((d) => d.identifier),
      ['gw-pending-1'],
    );
    assert.deepEqual((await devices('approval=pending&protocol=phoenix')).items, []);

    const approved = await server.call<DeviceJson>(
      'POST',
      `/api/v1/orgs/${server.orgId}/devices/${pending.id}/approve`,
    );
    assert.equal(approved.approval, 'approved');
    assert.equal((await devices('approval=pending')).total, 0);

    const revoked = await server.call<DeviceJson>('POST', `/api/v1/orgs/${server.orgId}/devices/gw-pending-1/revoke`);
    assert.equal(revoked.approval, 'revoked');
    const audit = await server.database.db
      .selectFrom('audit_log')
      .select('action')
      .where('resource_id', '=', pending.id)
      .orderBy('id')
      .execute();
    assert.deepEqual(
      audit.map((a) => a.action).filter((a) => a !== 'device.create'),
      ['device.approve', 'device.revoke'],
    );
  });

  test('an unknown approval value is a 400 with the error shape', async () => {
    const res = await fetch(`${server.apiUrl}/api/v1/orgs/${server.orgId}/devices?approval=maybe`, {
      headers: { authorization: `Bearer ${server.adminToken}` },
    });
    assert.equal(res.status, 400);
    const body = (await res.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, 'invalid');
  });
});
