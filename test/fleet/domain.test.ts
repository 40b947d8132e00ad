import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { createTestDatabase, DATABASE_KIND } from '../helpers/db.ts';
import type { DatabaseHandle } from '../../server/db/index.ts';
import * as fleet from '../../server/fleet/index.ts';
import { devices, firmware, OPERATOR, recordingContext, ref, tenant, uniq } from './fixtures.ts';

let handle: DatabaseHandle;
let ctx: ReturnType<typeof recordingContext>;

before(async () => {
  handle = await createTestDatabase();
  ctx = recordingContext(handle.db);
});
after(async () => {
  await handle.close();
});

async function attemptsOf(deviceId: string) {
  return handle.db
    .selectFrom('update_attempts')
    .selectAll()
    .where('device_id', '=', deviceId)
    .orderBy('created_at')
    .orderBy('id')
    .execute();
}

describe(`fleet domain (${DATABASE_KIND})`, () => {
  describe('validation', () => {
    test('names that cannot appear in a topic are rejected as invalid', async () => {
      for (const name of ['', 'has space', 'a:b', '-leading', 'x'.repeat(64)]) {
        await assert.rejects(
          fleet.createOrg(ctx, OPERATOR, { name }),
          (e: unknown) => e instanceof fleet.FleetError && e.code === 'invalid',
        );
      }
    });

    test('a duplicate organization name is a conflict', async () => {
      const name = uniq('dup');
      await fleet.createOrg(ctx, OPERATOR, { name });
      await assert.rejects(
        fleet.createOrg(ctx, OPERATOR, { name }),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'conflict',
      );
    });

    test('firmware versions must be semantic versions', async () => {
      const t = await tenant(ctx);
      await assert.rejects(
        firmware(ctx, t, 'latest'),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'invalid' && e.details?.field === 'version',
      );
    });

    test('a product requiring signatures refuses unsigned firmware images', async () => {
      const t = await tenant(ctx, { requiresSignature: true });
      await assert.rejects(
        firmware(ctx, t, '1.0.0'),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'invalid' && e.details?.field === 'signature',
      );
      const signed = await firmware(ctx, t, '1.0.0', { signature: 'c2ln' });
      assert.equal(signed.signature, 'c2ln');
    });

    test('organizations and products are found by id or by name', async () => {
      const t = await tenant(ctx);
      assert.equal((await fleet.getOrg(ctx, t.org.name)).id, t.org.id);
      assert.equal((await fleet.getOrg(ctx, t.org.id)).name, t.org.name);
      assert.equal((await fleet.getProduct(ctx, t.org.id, t.product.name)).id, t.product.id);
      await assert.rejects(
        fleet.getProduct(ctx, randomUUID(), t.product.id),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'not_found',
      );
    });
  });

  describe('target resolution', () => {
    test('a device-level target overrides its groups, the lowest group priority wins, and ties go to the most recent target', async () => {
      const t = await tenant(ctx);
      const [d] = await devices(ctx, t, 1);
      const [v1, v2, v3, v4] = await Promise.all(['1.0.0', '2.0.0', '3.0.0', '4.0.0'].map((v) => firmware(ctx, t, v)));
      const g10 = await fleet.createGroup(ctx, OPERATOR, {
        orgId: t.org.id,
        productId: t.product.id,
        name: uniq('g10'),
        priority: 10,
      });
      const g10b = await fleet.createGroup(ctx, OPERATOR, {
        orgId: t.org.id,
        productId: t.product.id,
        name: uniq('g10b'),
        priority: 10,
      });
      const g50 = await fleet.createGroup(ctx, OPERATOR, {
        orgId: t.org.id,
        productId: t.product.id,
        name: uniq('g50'),
        priority: 50,
      });
      for (const g of [g10, g10b, g50]) await fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [d!.id]);

      assert.equal(await fleet.resolveTarget(handle.db, d!.id), undefined);
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g50.id, v1!.id);
      assert.equal((await fleet.resolveTarget(handle.db, d!.id))?.firmware.id, v1!.id);
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g10.id, v2!.id);
      assert.deepEqual((await fleet.resolveTarget(handle.db, d!.id))?.source, { type: 'group', groupId: g10.id });
      await new Promise((r) => setTimeout(r, 5));
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g10b.id, v3!.id);
      assert.equal(
        (await fleet.resolveTarget(handle.db, d!.id))?.firmware.id,
        v3!.id,
        'tie on priority: the most recently set target wins',
      );
      await fleet.setDeviceTarget(ctx, OPERATOR, t.org.id, d!.id, v4!.id);
      const resolved = await fleet.resolveTarget(handle.db, d!.id);
      assert.equal(resolved?.firmware.id, v4!.id);
      assert.deepEqual(resolved?.source, { type: 'device' });
      await fleet.clearDeviceTarget(ctx, OPERATOR, t.org.id, d!.id);
      assert.equal((await fleet.resolveTarget(handle.db, d!.id))?.firmware.id, v3!.id);
    });

    test('a target must be firmware of the same product with an uploaded image', async () => {
      const t = await tenant(ctx);
      const other = await tenant(ctx);
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('g') });
      const foreign = await firmware(ctx, other, '1.0.0');
      await assert.rejects(
        fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, foreign.id),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'not_found',
      );
      const reported = await firmware(ctx, t, '0.9.0', { hasBlob: false, sha256: null, size: null });
      await assert.rejects(
        fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, reported.id),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'invalid',
      );
    });
  });

  describe('group retarget', () => {
    test('creates attempts in bulk (sent online, queued offline), skips devices on target, and publishes ONE group firmware_update', async () => {
      const t = await tenant(ctx);
      const [old, next] = [await firmware(ctx, t, '1.0.0'), await firmware(ctx, t, '1.1.0')];
      const members = await devices(ctx, t, 30);
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      await fleet.addDevicesToGroup(
        ctx,
        OPERATOR,
        t.org.id,
        g.id,
        members.map((d) => d.id),
      );
      // 10 online on the old firmware, 2 online already on the target, 18 never connected.
      for (const d of members.slice(0, 10)) await fleet.deviceJoined(ctx, ref(d), old.id);
      for (const d of members.slice(10, 12)) await fleet.deviceJoined(ctx, ref(d), next.id);
      ctx.events.length = 0;

      const change = await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, next.id);
      assert.deepEqual(change.attempts, { sent: 10, queued: 18 });
      assert.equal(change.delivery, 'group');
      const updates = ctx.events.filter((e) => e.event === 'firmware_update');
      assert.equal(updates.length, 1);
      assert.equal(updates[0]!.topic, `group:${t.org.name}:${t.product.name}:${g.name}`);
      assert.deepEqual(updates[0]!.payload, {
        url: `https://fleethub.test/firmware/${next.id}?sig=test`,
        version: '1.1.0',
        sha256: next.sha256,
        size: 1024,
        firmware_uuid: next.id,
      });
      // Devices of every protocol hear the group topic; only operators hear of the change itself.
      assert.deepEqual(
        ctx.events.filter((e) => e.event === 'target_changed').map((e) => [e.topic, e.payload]),
        [
          [
            `operator:${t.org.id}`,
            {
              org_id: t.org.id,
              product_id: t.product.id,
              group_id: g.id,
              component: 'firmware',
              firmware_id: next.id,
              attempts: { sent: 10, queued: 18 },
            },
          ],
        ],
      );
      const counts = await fleet.countUpdateStates(ctx, { orgId: t.org.id, groupId: g.id });
      assert.equal(counts.sent, 10);
      assert.equal(counts.queued, 18);
      assert.equal((await attemptsOf(members[10]!.id)).length, 0, 'a device already on the target gets no attempt');
    });

    test('retargeting supersedes open attempts for the previous firmware', async () => {
      const t = await tenant(ctx);
      const [v1, v2] = [await firmware(ctx, t, '1.0.0'), await firmware(ctx, t, '2.0.0')];
      const [d] = await devices(ctx, t, 1);
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      await fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [d!.id]);
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, v1.id);
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, v2.id);
      const states = (await attemptsOf(d!.id)).map((a) => [a.to_version, a.state]);
      assert.deepEqual(states, [
        ['1.0.0', 'cancelled'],
        ['2.0.0', 'queued'],
      ]);
    });

    test('when an online member resolves another target, each device is told on its own topic instead of the group', async () => {
      const t = await tenant(ctx);
      const [v0, v1, v9] = [
        await firmware(ctx, t, '0.1.0'),
        await firmware(ctx, t, '1.0.0'),
        await firmware(ctx, t, '9.0.0'),
      ];
      const [a, b] = await devices(ctx, t, 2);
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      await fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [a!.id, b!.id]);
      await fleet.setDeviceTarget(ctx, OPERATOR, t.org.id, b!.id, v9.id);
      await fleet.deviceJoined(ctx, ref(a!), v0.id);
      await fleet.deviceJoined(ctx, ref(b!), v0.id);
      ctx.events.length = 0;
      const change = await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, v1.id);
      assert.equal(change.delivery, 'devices');
      const updates = ctx.events.filter((e) => e.event === 'firmware_update');
      assert.deepEqual(
        updates.map((e) => [e.topic, e.payload.version]),
        [[`device_id:${a!.id}`, '1.0.0']],
      );
    });
  });

  describe('membership', () => {
    test('online devices are told to join and leave group channels; deleting a group tells members to leave, then stops the group', async () => {
      const t = await tenant(ctx);
      const fw = await firmware(ctx, t, '1.0.0');
      const [on, off] = await devices(ctx, t, 2);
      await fleet.deviceJoined(ctx, ref(on!), fw.id);
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      const topic = `group:${t.org.name}:${t.product.name}:${g.name}`;
      ctx.events.length = 0;
      const { added } = await fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [on!.id, off!.id]);
      assert.equal(added.length, 2);
      assert.deepEqual(
        ctx.events.filter((e) => e.event === 'join'),
        [{ topic: `device_id:${on!.id}`, event: 'join', payload: { channel: topic } }],
      );
      assert.deepEqual(
        (await fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [on!.id])).added,
        [],
        'adding twice adds nothing',
      );

      ctx.events.length = 0;
      await fleet.removeDevicesFromGroup(ctx, OPERATOR, t.org.id, g.id, [on!.id]);
      assert.deepEqual(
        ctx.events.filter((e) => e.event === 'leave'),
        [{ topic: `device_id:${on!.id}`, event: 'leave', payload: { channel: topic } }],
      );

      await fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [on!.id]);
      ctx.events.length = 0;
      await fleet.deleteGroup(ctx, OPERATOR, t.org.id, g.id);
      const seq = ctx.events
        .filter((e) => e.event === 'leave' || e.event === 'group_deleted')
        .map((e) => `${e.topic} ${e.event}`);
      assert.deepEqual(seq, [
        `device_id:${on!.id} leave`,
        `${topic} group_deleted`,
        `operator:${t.org.id} group_deleted`,
      ]);
      assert.deepEqual(await fleet.deviceGroupTopics(handle.db, on!.id), []);
    });

    test('devices of another product or organization cannot be added to a group', async () => {
      const t = await tenant(ctx);
      const other = await tenant(ctx);
      const [mine] = await devices(ctx, t, 1);
      const [theirs] = await devices(ctx, other, 1);
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      await assert.rejects(
        fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [mine!.id, theirs!.id]),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'not_found',
      );
      assert.equal((await fleet.listGroupMembers(ctx, t.org.id, g.id)).total, 0, 'nothing was added');
    });

    test('a device added to a targeted group while online gets its update on its own topic', async () => {
      const t = await tenant(ctx);
      const [v1, v2] = [await firmware(ctx, t, '1.0.0'), await firmware(ctx, t, '2.0.0')];
      const [d] = await devices(ctx, t, 1);
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, v2.id);
      await fleet.deviceJoined(ctx, ref(d!), v1.id);
      ctx.events.length = 0;
      await fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [d!.id]);
      assert.deepEqual(
        ctx.events.filter((e) => e.topic === `device_id:${d!.id}`).map((e) => e.event),
        ['join', 'firmware_update'],
      );
      assert.equal((await attemptsOf(d!.id))[0]?.state, 'sent');
    });
  });

  describe('device join and update reports', () => {
    async function setup() {
      const t = await tenant(ctx);
      const [v1, v2] = [await firmware(ctx, t, '1.0.0'), await firmware(ctx, t, '2.0.0')];
      const [d] = await devices(ctx, t, 1);
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      await fleet.addDevicesToGroup(ctx, OPERATOR, t.org.id, g.id, [d!.id]);
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, v2.id);
      return { t, v1, v2, d: d!, g };
    }

    test('a device connecting after the change gets the update on join and its attempt becomes sent', async () => {
      const { t, v1, v2, d, g } = await setup();
      const joined = await fleet.deviceJoined(ctx, ref(d), v1.id);
      assert.deepEqual(joined.groups, [`group:${t.org.name}:${t.product.name}:${g.name}`]);
      assert.equal(joined.update?.version, '2.0.0');
      assert.equal(joined.update?.firmware_uuid, v2.id);
      const [attempt] = await attemptsOf(d.id);
      assert.equal(attempt?.state, 'sent');
      assert.equal(attempt?.from_version, '1.0.0');
      const device = await fleet.getDevice(ctx, t.org.id, d.id);
      assert.equal(device.connection_status, 'online');
      assert.equal(device.connected_node, 'node-a');
      assert.equal(device.firmware_version, '1.0.0');
    });

    test('reports move the attempt through begun, downloading and finished, persisted in order', async () => {
      const { v1, d } = await setup();
      await fleet.deviceJoined(ctx, ref(d), v1.id);
      const dev = { deviceId: d.id, orgId: d.org_id };
      assert.equal(
        (await fleet.applyUpdateReport(ctx, dev, 'firmware_update_begin', { version: '2.0.0' })).state,
        'begun',
      );
      const p1 = await fleet.applyUpdateReport(ctx, dev, 'firmware_update_progress', {
        version: '2.0.0',
        percent: 40,
        bytes: 400,
        total: 1000,
      });
      assert.deepEqual([p1.state, p1.percent, p1.bytes, p1.total], ['downloading', 40, 400, 1000]);
      const p2 = await fleet.applyUpdateReport(ctx, dev, 'firmware_update_progress', {
        version: '2.0.0',
        percent: 90,
        bytes: 900,
        total: 1000,
      });
      assert.equal(p2.percent, 90);
      const fin = await fleet.applyUpdateReport(ctx, dev, 'firmware_update_finish', { version: '2.0.0' });
      assert.equal(fin.state, 'finished');
      assert.ok(fin.begun_at && fin.finished_at);
      const audit = await fleet.listAuditLog(ctx, {
        orgId: d.org_id,
        resourceType: 'update_attempt',
        resourceId: fin.id,
      });
      assert.deepEqual(audit.items.map((r) => [r.action, r.actor_type, r.actor_id]).reverse(), [
        ['update.begun', 'device', d.id],
        ['update.finished', 'device', d.id],
      ]);
    });

    test('invalid transitions, bad payloads and unknown versions are typed errors that change nothing', async () => {
      const { v1, d } = await setup();
      await fleet.deviceJoined(ctx, ref(d), v1.id);
      const dev = { deviceId: d.id, orgId: d.org_id };
      const code = (c: string) => (e: unknown) => e instanceof fleet.FleetError && e.code === c;
      await assert.rejects(
        fleet.applyUpdateReport(ctx, dev, 'firmware_update_progress', {
          version: '2.0.0',
          percent: 10,
          bytes: 1,
          total: 10,
        }),
        code('conflict'),
      );
      await assert.rejects(
        fleet.applyUpdateReport(ctx, dev, 'firmware_update_finish', { version: '2.0.0' }),
        code('conflict'),
      );
      await assert.rejects(
        fleet.applyUpdateReport(ctx, dev, 'firmware_update_begin', { version: '7.0.0' }),
        code('not_found'),
      );
      await assert.rejects(fleet.applyUpdateReport(ctx, dev, 'firmware_update_begin', {}), code('invalid'));
      await fleet.applyUpdateReport(ctx, dev, 'firmware_update_begin', { version: '2.0.0' });
      for (const bad of [
        { percent: 101, bytes: 1, total: 2 },
        { percent: 5.5, bytes: 1, total: 2 },
        { percent: 5, bytes: -1, total: 2 },
        { percent: 5, bytes: '1', total: 2 },
        { percent: 5, bytes: 3, total: 2 },
      ]) {
        await assert.rejects(
          fleet.applyUpdateReport(ctx, dev, 'firmware_update_progress', { version: '2.0.0', ...bad }),
          code('invalid'),
          JSON.stringify(bad),
        );
      }
      await assert.rejects(
        fleet.applyUpdateReport(ctx, dev, 'firmware_update_error', { version: '2.0.0', errors: 'disk full' }),
        code('invalid'),
      );
      const [attempt] = await attemptsOf(d.id);
      assert.equal(attempt?.state, 'begun');
      assert.equal(attempt?.percent, null);
      const failed = await fleet.applyUpdateReport(ctx, dev, 'firmware_update_error', {
        version: '2.0.0',
        errors: ['disk full'],
      });
      assert.equal(failed.state, 'failed');
      assert.deepEqual(failed.errors, ['disk full']);
    });

    test('rejoining on the target firmware after finish marks the update succeeded', async () => {
      const { v1, v2, d } = await setup();
      await fleet.deviceJoined(ctx, ref(d), v1.id);
      const dev = { deviceId: d.id, orgId: d.org_id };
      await fleet.applyUpdateReport(ctx, dev, 'firmware_update_begin', { version: '2.0.0' });
      await fleet.applyUpdateReport(ctx, dev, 'firmware_update_finish', { version: '2.0.0' });
      await fleet.deviceDisconnected(ctx, d.id);
      const joined = await fleet.deviceJoined(ctx, ref(d), v2.id);
      assert.equal(joined.update, undefined);
      const [attempt] = await attemptsOf(d.id);
      assert.equal(attempt?.state, 'succeeded');
      assert.ok(attempt?.completed_at);
      assert.equal((await fleet.getDevice(ctx, d.org_id, d.id)).firmware_version, '2.0.0');
    });

    test('rejoining on the old firmware after finish marks the update rolled back and does not resend it', async () => {
      const { v1, d } = await setup();
      await fleet.deviceJoined(ctx, ref(d), v1.id);
      const dev = { deviceId: d.id, orgId: d.org_id };
      await fleet.applyUpdateReport(ctx, dev, 'firmware_update_begin', { version: '2.0.0' });
      await fleet.applyUpdateReport(ctx, dev, 'firmware_update_finish', { version: '2.0.0' });
      const joined = await fleet.deviceJoined(ctx, ref(d), v1.id);
      assert.equal(joined.update, undefined);
      assert.deepEqual(
        (await attemptsOf(d.id)).map((a) => a.state),
        ['rolled_back'],
      );
    });

    test('setting the same target again retries a device whose update failed', async () => {
      const { t, v1, v2, d, g } = await setup();
      await fleet.deviceJoined(ctx, ref(d), v1.id);
      await fleet.applyUpdateReport(ctx, { deviceId: d.id, orgId: d.org_id }, 'firmware_update_error', {
        version: '2.0.0',
        errors: ['bad signature'],
      });
      assert.equal((await fleet.deviceJoined(ctx, ref(d), v1.id)).update, undefined, 'no automatic retry on rejoin');
      await new Promise((r) => setTimeout(r, 5));
      const change = await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, v2.id);
      assert.deepEqual(change.attempts, { sent: 1, queued: 0 });
      assert.deepEqual(
        (await attemptsOf(d.id)).map((a) => a.state),
        ['failed', 'sent'],
      );
    });

    test('an unknown firmware uuid is recorded on the device from the join params, not in the catalogue, and rejected without them', async () => {
      const t = await tenant(ctx);
      const [d] = await devices(ctx, t, 1);
      const uuid = randomUUID();
      await assert.rejects(
        fleet.deviceJoined(ctx, ref(d!), uuid, {}),
        (e: unknown) =>
          e instanceof fleet.FleetError && e.code === 'invalid' && /join with params \{version/.test(e.message),
      );
      await assert.rejects(
        fleet.deviceJoined(ctx, ref(d!), uuid, { version: '0.3.0', platform: 'x'.repeat(101) }),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'invalid' && e.details?.field === 'platform',
      );
      const joined = await fleet.deviceJoined(ctx, ref(d!), uuid, {
        version: '0.3.0',
        platform: 'rpi0',
        architecture: 'arm',
      });
      assert.deepEqual(joined.firmware, { id: uuid, version: '0.3.0' });
      await assert.rejects(
        fleet.getFirmware(ctx, t.org.id, uuid),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'not_found',
      );
      assert.deepEqual(await fleet.listFirmware(ctx, t.org.id), []);
      const device = await fleet.getDevice(ctx, t.org.id, d!.id);
      assert.deepEqual(
        [device.firmware_uuid, device.firmware_version, device.platform, device.architecture],
        [uuid, '0.3.0', 'rpi0', 'arm'],
      );
    });

    test('rejoining on firmware the catalogue does not hold after finish marks the update rolled back', async () => {
      const { v1, d } = await setup();
      await fleet.deviceJoined(ctx, ref(d), v1.id);
      const dev = { deviceId: d.id, orgId: d.org_id };
      await fleet.applyUpdateReport(ctx, dev, 'firmware_update_begin', { version: '2.0.0' });
      await fleet.applyUpdateReport(ctx, dev, 'firmware_update_finish', { version: '2.0.0' });
      await fleet.deviceJoined(ctx, ref(d), randomUUID(), { version: '2.0.0' });
      assert.deepEqual(
        (await attemptsOf(d.id)).map((a) => a.state),
        ['rolled_back'],
      );
    });

    test('disconnect marks the device offline only while this node owns its connection', async () => {
      const t = await tenant(ctx);
      const fw = await firmware(ctx, t, '1.0.0');
      const [d] = await devices(ctx, t, 1);
      const first = await fleet.deviceJoined(ctx, ref(d!), fw.id);
      const nodeB = recordingContext(handle.db, 'node-b');
      await fleet.deviceJoined(nodeB, ref(d!), fw.id);
      assert.equal(await fleet.deviceDisconnected(ctx, d!.id, first.connectedAt), false);
      assert.equal((await fleet.getDevice(ctx, t.org.id, d!.id)).connection_status, 'online');
      assert.equal(await fleet.deviceDisconnected(nodeB, d!.id), true);
      assert.equal((await fleet.getDevice(ctx, t.org.id, d!.id)).connection_status, 'offline');
    });

    test("a reconnect that changes nothing is one statement with the full join's outcome", async () => {
      const { t, v1, v2, d, g } = await setup();
      await fleet.deviceJoined(ctx, ref(d), v1.id);
      await fleet.applyUpdateReport(ctx, { deviceId: d.id, orgId: d.org_id }, 'firmware_update_error', {
        version: '2.0.0',
        errors: ['disk full'],
      });
      await fleet.deviceDisconnected(ctx, d.id);
      let statements = 0;
      const counting = recordingContext(
        handle.db.withPlugin({
          transformQuery: (args) => {
            statements++;
            return args.node;
          },
          transformResult: async (args) => args.result,
        }),
      );
      const rejoined = await fleet.deviceJoined(counting, ref(d), v1.id);
      assert.equal(statements, 1);
      assert.deepEqual(rejoined.groups, [`group:${t.org.name}:${t.product.name}:${g.name}`]);
      assert.equal(rejoined.update, undefined, 'the failed update is not retried on rejoin');
      assert.deepEqual(rejoined.firmware, { id: v1.id, version: '1.0.0' });
      assert.deepEqual(
        counting.events.map((e) => [e.event, e.payload.status]),
        [['device_status', 'online']],
      );
      assert.equal((await fleet.getDevice(ctx, t.org.id, d.id)).connection_status, 'online');
      assert.equal(await fleet.deviceDisconnected(counting, d.id, rejoined.connectedAt), true);

      // Retargeting again while the device is offline queues an attempt: the next join is the full one.
      await new Promise((r) => setTimeout(r, 5));
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, v2.id);
      statements = 0;
      const updated = await fleet.deviceJoined(counting, ref(d), v1.id);
      assert.ok(statements > 1);
      assert.equal(updated.update?.firmware_uuid, v2.id);
      assert.deepEqual(
        (await attemptsOf(d.id)).map((a) => a.state),
        ['failed', 'sent'],
      );
    });

    test('devices connected to a node that stopped beating are marked offline', async () => {
      const t = await tenant(ctx);
      const fw = await firmware(ctx, t, '1.0.0');
      const [d] = await devices(ctx, t, 1);
      const ghost = recordingContext(handle.db, uniq('ghost'));
      await fleet.markNodeAlive(ghost);
      await fleet.deviceJoined(ghost, ref(d!), fw.id);
      await fleet.markNodeAlive(ctx);
      assert.equal(await fleet.reconcileOfflineDevices(ctx, { staleAfterMs: 60_000 }), 0);
      await handle.db
        .updateTable('nodes')
        .set({ heartbeat_at: new Date(Date.now() - 120_000) })
        .where('name', '=', ghost.nodeName)
        .execute();
      assert.ok((await fleet.reconcileOfflineDevices(ctx, { staleAfterMs: 60_000 })) >= 1);
      assert.equal((await fleet.getDevice(ctx, t.org.id, d!.id)).connection_status, 'offline');
    });

    test('the sweeper times out attempts that made no progress', async () => {
      const { v1, d } = await setup();
      await fleet.deviceJoined(ctx, ref(d), v1.id);
      assert.equal(await fleet.sweepStaleUpdates(ctx, { defaultTimeoutS: 60 }), 0);
      const n = await fleet.sweepStaleUpdates(ctx, { defaultTimeoutS: 60, now: new Date(Date.now() + 120_000) });
      assert.ok(n >= 1);
      assert.equal((await attemptsOf(d.id))[0]?.state, 'timed_out');
    });
  });

  describe('firmware and audit', () => {
    test('deleting targeted firmware is refused with a conflict, and allowed once the target is cleared', async () => {
      const t = await tenant(ctx);
      const fw = await firmware(ctx, t, '1.0.0');
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, fw.id);
      await assert.rejects(
        fleet.deleteFirmware(ctx, OPERATOR, t.org.id, fw.id),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'conflict',
      );
      await fleet.clearGroupTarget(ctx, OPERATOR, t.org.id, g.id);
      await fleet.deleteFirmware(ctx, OPERATOR, t.org.id, fw.id);
      await assert.rejects(
        fleet.getFirmware(ctx, t.org.id, fw.id),
        (e: unknown) => e instanceof fleet.FleetError && e.code === 'not_found',
      );
    });

    test('operator mutations write audit records with the actor, and a refused mutation writes none', async () => {
      const t = await tenant(ctx);
      const fw = await firmware(ctx, t, '1.0.0');
      const g = await fleet.createGroup(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, name: uniq('grp') });
      await fleet.setGroupTarget(ctx, OPERATOR, t.org.id, g.id, fw.id);
      const before = (await fleet.listAuditLog(ctx, { orgId: t.org.id })).total;
      await assert.rejects(fleet.deleteFirmware(ctx, OPERATOR, t.org.id, fw.id));
      const log = await fleet.listAuditLog(ctx, { orgId: t.org.id });
      assert.equal(log.total, before);
      assert.deepEqual(log.items.map((r) => r.action).reverse(), [
        'org.create',
        'product.create',
        'firmware.create',
        'group.create',
        'target.set',
        // The target set's one-stage deployment, completed at once: the group has nobody to update.
        'deployment.created',
        'deployment.completed',
      ]);
      assert.ok(log.items.every((r) => r.actor_type === 'operator' && r.actor_id === 'op-1'));
    });

    test('devices are listed with filters and a total', async () => {
      const t = await tenant(ctx);
      const fw = await firmware(ctx, t, '1.0.0');
      const list = await devices(ctx, t, 5);
      await fleet.updateDevice(ctx, OPERATOR, t.org.id, list[0]!.id, {
        description: 'kitchen sensor',
        tags: ['eu', 'beta'],
      });
      await fleet.deviceJoined(ctx, ref(list[1]!), fw.id);
      assert.equal((await fleet.listDevices(ctx, { orgId: t.org.id, limit: 2 })).items.length, 2);
      assert.equal((await fleet.listDevices(ctx, { orgId: t.org.id, limit: 2 })).total, 5);
      assert.deepEqual(
        (await fleet.listDevices(ctx, { orgId: t.org.id, q: 'KITCHEN' })).items.map((d) => d.id),
        [list[0]!.id],
      );
      assert.deepEqual(
        (await fleet.listDevices(ctx, { orgId: t.org.id, tag: 'beta' })).items.map((d) => d.id),
        [list[0]!.id],
      );
      assert.deepEqual(
        (await fleet.listDevices(ctx, { orgId: t.org.id, status: 'online' })).items.map((d) => d.id),
        [list[1]!.id],
      );
      assert.deepEqual(
        (await fleet.listDevices(ctx, { orgId: t.org.id, version: '1.0.0' })).items.map((d) => d.id),
        [list[1]!.id],
      );
      await fleet.deleteDevice(ctx, OPERATOR, t.org.id, list[4]!.id);
      assert.equal((await fleet.listDevices(ctx, { orgId: t.org.id })).total, 4);
    });
  });
});
