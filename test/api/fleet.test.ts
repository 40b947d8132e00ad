import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import { disconnectSocket, joinChannel, nextEvent, openSocket, RawClient } from '../helpers/phoenix.ts';
import { type ErrorAnswer, type Items, startTestApi, type TestApi } from './harness.ts';

type Id = { id: string };

interface GroupStatus {
  devices: number;
  offline: number;
  versions: Record<string, number>;
  updates: Record<string, number>;
  target: { firmware_id: string };
}

describe(`operator API fleet resources (${DATABASE_KIND})`, () => {
  let api: TestApi;
  let admin: string;
  let operator: string;
  let org: { id: string; name: string };
  let product: { id: string };
  const devices: { id: string; identifier: string }[] = [];

  before(async () => {
    api = await startTestApi();
    admin = await api.userToken('root@example.com', 'admin', null);
    org = (await api.call<{ id: string; name: string }>('POST', '/api/v1/orgs', admin, { name: 'acme' })).body;
    product = (await api.call<Id>('POST', `/api/v1/orgs/acme/products`, admin, { name: 'sensor' })).body;
    operator = await api.userToken('ops@acme.example', 'operator', org.id);
    for (let i = 1; i <= 5; i++) {
      const res = await api.call<{ id: string; identifier: string }>('POST', `/api/v1/orgs/acme/devices`, operator, {
        product: 'sensor',
        identifier: `sn-00${i}`,
        tags: i % 2 ? ['odd'] : [],
      });
      assert.equal(res.status, 201, JSON.stringify(res.body));
      devices.push(res.body);
    }
  });
  after(() => api.close());

  test('devices list filters by text, tag and status and paginates with a total', async () => {
    const all = await api.call<Items<unknown>>('GET', '/api/v1/orgs/acme/devices?limit=2&offset=0', operator);
    assert.equal(all.status, 200);
    assert.equal(all.body.total, 5);
    assert.equal(all.body.items.length, 2);
    const page3 = await api.call<Items<unknown>>('GET', '/api/v1/orgs/acme/devices?limit=2&offset=4', operator);
    assert.equal(page3.body.items.length, 1);

    const search = await api.call<Items<{ identifier: string }>>('GET', '/api/v1/orgs/acme/devices?q=003', operator);
    assert.deepEqual(
      search.body.items.map((d) => d.identifier),
      ['sn-003'],
    );
    const odd = await api.call<Items<unknown>>('GET', '/api/v1/orgs/acme/devices?tag=odd', operator);
    assert.equal(odd.body.total, 3);
    const online = await api.call<Items<unknown>>('GET', '/api/v1/orgs/acme/devices?status=online', operator);
    assert.equal(online.body.total, 0);
    const bad = await api.call('GET', '/api/v1/orgs/acme/devices?status=sleeping', operator);
    assert.equal(bad.status, 400);
  });

  test('a device can be fetched by id or identifier, updated and deleted', async () => {
    const byName = await api.call<Id>('GET', '/api/v1/orgs/acme/devices/sn-001', operator);
    assert.equal(byName.status, 200);
    assert.equal(byName.body.id, devices[0]!.id);
    const patched = await api.call<{ description: string; tags: string[] }>(
      'PATCH',
      `/api/v1/orgs/acme/devices/${devices[0]!.id}`,
      operator,
      {
        description: 'on the roof',
        tags: ['roof'],
      },
    );
    assert.equal(patched.status, 200);
    assert.equal(patched.body.description, 'on the roof');
    assert.deepEqual(patched.body.tags, ['roof']);

    const extra = (
      await api.call<Id>('POST', '/api/v1/orgs/acme/devices', operator, { product: 'sensor', identifier: 'temp-1' })
    ).body;
    assert.equal((await api.call('DELETE', `/api/v1/orgs/acme/devices/temp-1`, operator)).status, 204);
    assert.equal((await api.call('GET', `/api/v1/orgs/acme/devices/${extra.id}`, operator)).status, 404);
    const duplicate = await api.call('POST', '/api/v1/orgs/acme/devices', operator, {
      product: 'sensor',
      identifier: 'sn-001',
    });
    assert.equal(duplicate.status, 409);
  });

  test('groups are created, devices are added and removed in bulk, and members are listed', async () => {
    const group = await api.call<{ id: string; device_count: number }>('POST', '/api/v1/orgs/acme/groups', operator, {
      product: 'sensor',
      name: 'field',
    });
    assert.equal(group.status, 201);
    assert.equal(group.body.device_count, 0);

    const added = await api.call<{ added: string[] }>('POST', '/api/v1/orgs/acme/groups/field/devices', operator, {
      devices: [devices[0]!.id, devices[1]!.id, 'sn-003'],
    });
    assert.equal(added.status, 200);
    assert.equal(added.body.added.length, 3);
    const again = await api.call<{ added: string[] }>('POST', '/api/v1/orgs/acme/groups/field/devices', operator, {
      devices: [devices[0]!.id],
    });
    assert.deepEqual(again.body.added, []);

    const members = await api.call<Items<unknown>>('GET', '/api/v1/orgs/acme/groups/field/devices', operator);
    assert.equal(members.body.total, 3);
    const filtered = await api.call<Items<unknown>>(
      'GET',
      `/api/v1/orgs/acme/devices?group=${group.body.id}`,
      operator,
    );
    assert.equal(filtered.body.total, 3);

    const removed = await api.call<{ removed: string[] }>(
      'POST',
      '/api/v1/orgs/acme/groups/field/devices/remove',
      operator,
      {
        devices: ['sn-001', devices[1]!.id],
      },
    );
    assert.equal(removed.status, 200);
    assert.equal(removed.body.removed.length, 2);
    const shown = await api.call<{ device_count: number }>(
      'GET',
      `/api/v1/orgs/acme/groups/${group.body.id}`,
      operator,
    );
    assert.equal(shown.body.device_count, 1);

    const unknown = await api.call('POST', '/api/v1/orgs/acme/groups/field/devices', operator, {
      devices: ['00000000-0000-4000-8000-000000000000'],
    });
    assert.equal(unknown.status, 404);
    const empty = await api.call('POST', '/api/v1/orgs/acme/groups/field/devices', operator, { devices: [] });
    assert.equal(empty.status, 400);
  });

  test('a group target is set by version, reflected in status and cleared', async () => {
    await api.call('POST', '/api/v1/orgs/acme/groups', operator, { product: 'sensor', name: 'fleet' });
    await api.call('POST', '/api/v1/orgs/acme/groups/fleet/devices', operator, { devices: devices.map((d) => d.id) });
    const fw = await api.firmware(org.id, product.id, '2.0.0');

    const set = await api.call<{ target: { firmware_id: string }; attempts: { queued: number } }>(
      'PUT',
      '/api/v1/orgs/acme/groups/fleet/target',
      operator,
      { version: '2.0.0' },
    );
    assert.equal(set.status, 200, JSON.stringify(set.body));
    assert.equal(set.body.target.firmware_id, fw.id);
    assert.equal(set.body.attempts.queued, 5);

    const status = await api.call<GroupStatus>('GET', '/api/v1/orgs/acme/groups/fleet/status', operator);
    assert.equal(status.status, 200);
    assert.equal(status.body.devices, 5);
    assert.equal(status.body.offline, 5);
    assert.equal(status.body.versions.unknown, 5);
    assert.equal(status.body.updates.queued, 5);
    assert.equal(status.body.target.firmware_id, fw.id);

    const updates = await api.call<Items<{ state: string }>>(
      'GET',
      `/api/v1/orgs/acme/devices/${devices[0]!.id}/updates`,
      operator,
    );
    assert.equal(updates.body.total, 1);
    assert.equal(updates.body.items[0]!.state, 'queued');
    const groupUpdates = await api.call<Items<unknown>>(
      'GET',
      '/api/v1/orgs/acme/groups/fleet/updates?state=queued',
      operator,
    );
    assert.equal(groupUpdates.body.total, 5);

    const missing = await api.call('PUT', '/api/v1/orgs/acme/groups/fleet/target', operator, { version: '9.9.9' });
    assert.equal(missing.status, 404);
    const neither = await api.call('PUT', '/api/v1/orgs/acme/groups/fleet/target', operator, {});
    assert.equal(neither.status, 400);

    const deleteTargeted = await api.call<ErrorAnswer>('DELETE', `/api/v1/orgs/acme/firmware/${fw.id}`, operator);
    assert.equal(deleteTargeted.status, 409);
    assert.equal(deleteTargeted.body.error.code, 'conflict');

    assert.equal((await api.call('DELETE', '/api/v1/orgs/acme/groups/fleet/target', operator)).status, 200);
    assert.equal((await api.call('DELETE', '/api/v1/orgs/acme/groups/fleet/target', operator)).status, 404);
    assert.equal((await api.call('DELETE', `/api/v1/orgs/acme/firmware/${fw.id}`, operator)).status, 204);
    assert.equal((await api.call('GET', `/api/v1/orgs/acme/firmware/${fw.id}`, operator)).status, 404);
  });

  test('a device target overrides its groups and can be cleared', async () => {
    const fw = await api.firmware(org.id, product.id, '3.0.0');
    const set = await api.call<{ target: { device_id: string } }>(
      'PUT',
      `/api/v1/orgs/acme/devices/sn-002/target`,
      operator,
      { firmware_id: fw.id },
    );
    assert.equal(set.status, 200);
    assert.equal(set.body.target.device_id, devices[1]!.id);
    const targets = await api.call<Items<{ device_id: string }>>('GET', '/api/v1/orgs/acme/targets', operator);
    assert.ok(targets.body.items.some((t) => t.device_id === devices[1]!.id));
    assert.equal((await api.call('DELETE', `/api/v1/orgs/acme/devices/sn-002/target`, operator)).status, 200);
    const listed = await api.call<Items<{ version: string }>>('GET', '/api/v1/orgs/acme/firmware', operator);
    assert.ok(listed.body.items.some((f) => f.version === '3.0.0'));
  });

  test('device certificates are registered from PEM, listed and revoked', async () => {
    // Only a certificate one of the org's signer CAs issued can be registered to its devices.
    const signer = await api.call<Id>('POST', '/api/v1/orgs/acme/signer-cas', admin, {
      product: 'sensor',
      pem: (await getTestPki()).signerCa.certPem,
    });
    assert.equal(signer.status, 201, JSON.stringify(signer.body));
    const cert = await deviceCert('sn-004');
    const added = await api.call<{ id: string; fingerprint: string; revoked_at: string | null }>(
      'POST',
      '/api/v1/orgs/acme/devices/sn-004/certificates',
      operator,
      {
        pem: cert.certPem,
      },
    );
    assert.equal(added.status, 201, JSON.stringify(added.body));
    assert.match(added.body.fingerprint, /^[0-9a-f]{64}$/);
    assert.equal(added.body.revoked_at, null);
    const listed = await api.call<Items<unknown>>('GET', '/api/v1/orgs/acme/devices/sn-004/certificates', operator);
    assert.equal(listed.body.items.length, 1);
    const revoked = await api.call<{ revoked_at: string | null }>(
      'POST',
      `/api/v1/orgs/acme/devices/sn-004/certificates/${added.body.id}/revoke`,
      operator,
    );
    assert.equal(revoked.status, 200);
    assert.notEqual(revoked.body.revoked_at, null);
    const garbage = await api.call('POST', '/api/v1/orgs/acme/devices/sn-004/certificates', operator, {
      pem: 'not a certificate',
    });
    assert.equal(garbage.status, 400);
    assert.equal((await api.call('DELETE', `/api/v1/orgs/acme/signer-cas/${signer.body.id}`, admin)).status, 200);
  });

  test('signer CAs are added and removed by admins and each change notifies the device listener', async () => {
    const pki = await getTestPki();
    const before = api.signerCaChanges;
    const added = await api.call<Id>('POST', '/api/v1/orgs/acme/signer-cas', admin, {
      product: 'sensor',
      pem: pki.signerCa.certPem,
      description: 'factory',
    });
    assert.equal(added.status, 201, JSON.stringify(added.body));
    assert.equal(api.signerCaChanges, before + 1);
    const again = await api.call('POST', '/api/v1/orgs/acme/signer-cas', admin, {
      product: 'sensor',
      pem: pki.signerCa.certPem,
    });
    assert.equal(again.status, 409);
    const listed = await api.call<Items<{ product_id: string }>>('GET', '/api/v1/orgs/acme/signer-cas', operator);
    assert.equal(listed.body.items.length, 1);
    assert.equal(listed.body.items[0]!.product_id, product.id);
    assert.equal((await api.call('DELETE', `/api/v1/orgs/acme/signer-cas/${added.body.id}`, admin)).status, 200);
    assert.equal(api.signerCaChanges, before + 2);
  });

  test('the audit log records operator actions and filters by resource', async () => {
    const group = (
      await api.call<Id>('POST', '/api/v1/orgs/acme/groups', operator, { product: 'sensor', name: 'audited' })
    ).body;
    const log = await api.call<Items<{ action: string; actor_type: string }>>(
      'GET',
      `/api/v1/orgs/acme/audit?resource_type=group&resource_id=${group.id}`,
      operator,
    );
    assert.equal(log.status, 200);
    assert.equal(log.body.total, 1);
    assert.equal(log.body.items[0]!.action, 'group.create');
    assert.equal(log.body.items[0]!.actor_type, 'operator');
    const paged = await api.call<Items<unknown>>('GET', '/api/v1/orgs/acme/audit?limit=1', operator);
    assert.equal(paged.body.items.length, 1);
    assert.ok(paged.body.total > 1);
  });

  test("an operator socket joined to operator:<org> receives the org's live events; other orgs are refused", async () => {
    const other = (await api.call<Id>('POST', '/api/v1/orgs', admin, { name: 'globex' })).body;
    const socket = await openSocket(`${api.url.replace('http', 'ws')}/socket`, { tls: {}, authToken: operator });
    try {
      const channel = socket.channel(`operator:${org.id}`);
      assert.deepEqual(await joinChannel(channel), { org_id: org.id });
      const event = nextEvent(channel, 'group_deleted');
      const group = (
        await api.call<Id>('POST', '/api/v1/orgs/acme/groups', operator, { product: 'sensor', name: 'doomed' })
      ).body;
      assert.equal((await api.call('DELETE', `/api/v1/orgs/acme/groups/doomed`, operator)).status, 204);
      assert.equal((await event).group_id, group.id);

      await assert.rejects(joinChannel(socket.channel(`operator:${other.id}`)), /unauthorized/);
    } finally {
      await disconnectSocket(socket);
    }
  });

  test('the operator socket refuses connections without a valid token', async () => {
    const base = `${api.url.replace('http', 'ws')}/socket/websocket?vsn=2.0.0`;
    await assert.rejects(
      RawClient.connect(`${base}&token=bogus`, {}),
      (err: { status?: number }) => err.status === 403,
    );
    await assert.rejects(RawClient.connect(base, {}), (err: { status?: number }) => err.status === 401);
  });
});
