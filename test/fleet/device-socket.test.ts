import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import type { Channel, Socket } from 'phoenix';
import { SYSTEM } from '../../server/audit.ts';
import type { DatabaseHandle } from '../../server/db/index.ts';
import * as fleet from '../../server/fleet/index.ts';
import { addSignerCa } from '../../server/identity/index.ts';
import { createTestDatabase, DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, nextEvent, openSocket, pushAndWait, waitFor } from '../helpers/phoenix.ts';
import { deviceCert, deviceCertFromCa, deviceTlsOptions, otherCa, type CertifiedKey } from '../helpers/pki.ts';
import { firmware, OPERATOR, uniq, type Tenant } from './fixtures.ts';
import { startFleetServer, type FleetServer } from './harness.ts';
import { recordPublished } from '../helpers/pubsub.ts';

let handle: DatabaseHandle;
let server: FleetServer;
let acme: Tenant;
let rival: Tenant;
let rivalCa: CertifiedKey;
let v1: fleet.Firmware;
let v2: fleet.Firmware;
const open: Socket[] = [];

interface TestDevice {
  serial: string;
  socket: Socket;
  channel: Channel;
  reply: { groups: string[] };
  deviceId: string;
  /** Every push received on the device channel, in order. */
  pushes: { event: string; payload: Record<string, unknown> }[];
}

/** Connects the official phoenix client as device `serial` and joins `device:<uuid>`. */
async function connectDevice(
  serial: string,
  firmwareUuid: string,
  opts: { cred?: CertifiedKey; params?: Record<string, unknown> } = {},
): Promise<TestDevice> {
  const cred = opts.cred ?? (await deviceCert(serial));
  const socket = await openSocket(server.url, { tls: await deviceTlsOptions(cred) });
  open.push(socket);
  const channel = socket.channel(`device:${firmwareUuid}`, opts.params ?? {});
  const pushes: TestDevice['pushes'] = [];
  for (const event of ['firmware_update', 'join', 'leave'])
    channel.on(event, (payload: Record<string, unknown>) => {
      pushes.push({ event, payload });
    });
  const reply = (await joinChannel(channel)) as { groups: string[] };
  const row = await handle.db
    .selectFrom('devices')
    .select('id')
    .where('identifier', '=', serial)
    .executeTakeFirstOrThrow();
  return { serial, socket, channel, reply, deviceId: row.id, pushes };
}

async function closeDevice(d: TestDevice): Promise<void> {
  await disconnectSocket(d.socket);
  // The server marks the device offline once its channel terminates.
  await waitForDb(
    async () => (await fleet.getDevice(server.ctx, acmeOrRival(d), d.deviceId)).connection_status === 'offline',
    'device offline',
  );
}

function acmeOrRival(d: TestDevice): string {
  return d.serial.startsWith('rival') ? rival.org.id : acme.org.id;
}

async function waitForDb(check: () => Promise<boolean>, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function newGroup(name = uniq('grp')): Promise<fleet.GroupWithCount> {
  const g = await fleet.createGroup(server.ctx, OPERATOR, { orgId: acme.org.id, productId: acme.product.id, name });
  return fleet.getGroup(server.ctx, acme.org.id, g.id);
}

async function attemptsOf(deviceId: string) {
  return handle.db
    .selectFrom('update_attempts')
    .selectAll()
    .where('device_id', '=', deviceId)
    .orderBy('created_at')
    .orderBy('id')
    .execute();
}

before(async () => {
  handle = await createTestDatabase();
  server = await startFleetServer(handle.db);
  const ctx = server.ctx;
  const orgA = await fleet.createOrg(ctx, OPERATOR, { name: uniq('acme') });
  acme = { org: orgA, product: await fleet.createProduct(ctx, OPERATOR, { orgId: orgA.id, name: 'sensor' }) };
  const orgB = await fleet.createOrg(ctx, OPERATOR, { name: uniq('rival') });
  rival = { org: orgB, product: await fleet.createProduct(ctx, OPERATOR, { orgId: orgB.id, name: 'sensor' }) };
  const { getTestPki } = await import('../helpers/pki.ts');
  await addSignerCa(handle.db, SYSTEM, {
    orgId: acme.org.id,
    productId: acme.product.id,
    pem: (await getTestPki()).signerCa.certPem,
  });
  rivalCa = otherCa('rival signer');
  await addSignerCa(handle.db, SYSTEM, { orgId: rival.org.id, productId: rival.product.id, pem: rivalCa.certPem });
  await server.listener.refreshTrust();
  v1 = await firmware(ctx, acme, '1.0.0');
  v2 = await firmware(ctx, acme, '2.0.0');
});

after(async () => {
  await Promise.allSettled(open.map((s) => disconnectSocket(s)));
  await server?.close();
  await handle?.close();
});

describe(`device and group channels over mutual TLS (${DATABASE_KIND})`, () => {
  test('the join reply lists the device’s group channels', async () => {
    const serial = uniq('gl');
    const first = await connectDevice(serial, v1.id);
    assert.deepEqual(first.reply, { groups: [] });
    await closeDevice(first);
    const g = await newGroup();
    await fleet.addDevicesToGroup(server.ctx, OPERATOR, acme.org.id, g.id, [first.deviceId]);
    const again = await connectDevice(serial, v1.id);
    assert.deepEqual(again.reply, { groups: [g.topic] });
    await closeDevice(again);
  });

  test('membership changes push join and leave; removal and deletion close the group channel', async () => {
    const d = await connectDevice(uniq('mem'), v1.id);
    const g = await newGroup();
    const joinPush = nextEvent(d.channel, 'join');
    await fleet.addDevicesToGroup(server.ctx, OPERATOR, acme.org.id, g.id, [d.deviceId]);
    assert.deepEqual(await joinPush, { channel: g.topic });
    let groupChannel = d.socket.channel(g.topic, {});
    await joinChannel(groupChannel);

    let closed = new Promise<void>((resolve) => groupChannel.onClose(() => resolve()));
    const leavePush = nextEvent(d.channel, 'leave');
    await fleet.removeDevicesFromGroup(server.ctx, OPERATOR, acme.org.id, g.id, [d.deviceId]);
    assert.deepEqual(await leavePush, { channel: g.topic });
    await closed;

    await fleet.addDevicesToGroup(server.ctx, OPERATOR, acme.org.id, g.id, [d.deviceId]);
    groupChannel = d.socket.channel(g.topic, {});
    await joinChannel(groupChannel);
    closed = new Promise<void>((resolve) => groupChannel.onClose(() => resolve()));
    const leaveOnDelete = nextEvent(d.channel, 'leave');
    await fleet.deleteGroup(server.ctx, OPERATOR, acme.org.id, g.id);
    assert.deepEqual(await leaveOnDelete, { channel: g.topic });
    await closed;
    await closeDevice(d);
  });

  test('a device cannot join a group of another organization, nor one it is not a member of', async () => {
    const g = await newGroup();
    const member = await connectDevice(uniq('member'), v1.id);
    await fleet.addDevicesToGroup(server.ctx, OPERATOR, acme.org.id, g.id, [member.deviceId]);
    const serial = uniq('rival');
    const stranger = await connectDevice(serial, randomUUID(), {
      cred: await deviceCertFromCa(rivalCa, serial),
      params: { version: '0.1.0', platform: 'x', architecture: 'y' },
    });
    assert.equal((await fleet.getDevice(server.ctx, rival.org.id, stranger.deviceId)).org_id, rival.org.id);
    await assert.rejects(joinChannel(stranger.socket.channel(g.topic, {})), (e: { response?: unknown }) => {
      assert.deepEqual(e.response, { reason: 'unauthorized' });
      return true;
    });
    const outsider = await connectDevice(uniq('outsider'), v1.id);
    await assert.rejects(joinChannel(outsider.socket.channel(g.topic, {})), (e: { response?: unknown }) => {
      assert.deepEqual(e.response, { reason: 'unauthorized' });
      return true;
    });
    await joinChannel(member.socket.channel(g.topic, {}));
    for (const d of [member, stranger, outsider]) await closeDevice(d);
  });

  test('a group retarget reaches 50 connected devices exactly once, encoded once', async () => {
    const g = await newGroup();
    const devices: TestDevice[] = [];
    // 45 on the old firmware, 5 already on the target (they ignore it; it is still sent once).
    for (let i = 0; i < 50; i++) devices.push(await connectDevice(uniq('fan'), i < 45 ? v1.id : v2.id));
    const joins = devices.map((d) => nextEvent(d.channel, 'join'));
    await fleet.addDevicesToGroup(
      server.ctx,
      OPERATOR,
      acme.org.id,
      g.id,
      devices.map((d) => d.deviceId),
    );
    await Promise.all(joins);
    const groupUpdates = new Map<string, Record<string, unknown>[]>();
    await Promise.all(
      devices.map(async (d) => {
        const ch = d.socket.channel(g.topic, {});
        groupUpdates.set(d.deviceId, []);
        ch.on('firmware_update', (p: Record<string, unknown>) => {
          groupUpdates.get(d.deviceId)!.push(p);
        });
        await joinChannel(ch);
      }),
    );
    const encodesBefore = server.endpoint.stats.broadcastEncodes;
    const deliveredBefore = server.endpoint.stats.broadcastsDelivered;

    const change = await fleet.setGroupTarget(server.ctx, OPERATOR, acme.org.id, g.id, v2.id);
    assert.equal(change.delivery, 'group');
    assert.deepEqual(change.attempts, { sent: 45, queued: 0 });
    await waitFor(
      () => [...groupUpdates.values()].every((list) => list.length >= 1),
      10_000,
      'every device got firmware_update',
    );
    // A round trip on every socket: anything still in flight would have arrived before the reply.
    await Promise.all(devices.map((d) => pushAndWait(d.channel, 'no_such_event', {})));
    for (const [id, list] of groupUpdates) assert.equal(list.length, 1, `device ${id} got ${list.length} updates`);
    assert.deepEqual([...groupUpdates.values()][0]![0], {
      url: `https://127.0.0.1/firmware/${v2.id}`,
      version: '2.0.0',
      sha256: v2.sha256,
      size: 1024,
      firmware_uuid: v2.id,
    });
    assert.ok(
      devices.every((d) => d.pushes.every((p) => p.event !== 'firmware_update')),
      'nothing on the device channels',
    );
    assert.equal(server.endpoint.stats.broadcastEncodes - encodesBefore, 1);
    assert.equal(server.endpoint.stats.broadcastsDelivered - deliveredBefore, 50);
    for (const d of devices) await disconnectSocket(d.socket);
  });

  test('a device connecting after the change gets firmware_update right after its join reply', async () => {
    const serial = uniq('late');
    const first = await connectDevice(serial, v1.id);
    await closeDevice(first);
    const g = await newGroup();
    await fleet.addDevicesToGroup(server.ctx, OPERATOR, acme.org.id, g.id, [first.deviceId]);
    await fleet.setGroupTarget(server.ctx, OPERATOR, acme.org.id, g.id, v2.id);
    assert.equal((await attemptsOf(first.deviceId))[0]?.state, 'queued');
    const d = await connectDevice(serial, v1.id);
    await waitFor(() => d.pushes.length > 0, 5000, 'firmware_update push');
    assert.deepEqual(d.pushes, [
      {
        event: 'firmware_update',
        payload: {
          url: `https://127.0.0.1/firmware/${v2.id}`,
          version: '2.0.0',
          sha256: v2.sha256,
          size: 1024,
          firmware_uuid: v2.id,
        },
      },
    ]);
    assert.equal((await attemptsOf(d.deviceId))[0]?.state, 'sent');
    await closeDevice(d);
  });

  test('update reports are persisted in order; bad payloads and unknown events get error replies', async () => {
    const serial = uniq('rep');
    const first = await connectDevice(serial, v1.id);
    await fleet.setDeviceTarget(server.ctx, OPERATOR, acme.org.id, first.deviceId, v2.id);
    await waitFor(() => first.pushes.some((p) => p.event === 'firmware_update'), 5000, 'firmware_update');
    const ch = first.channel;
    assert.deepEqual(await pushAndWait(ch, 'firmware_update_begin', { version: '2.0.0' }), {
      status: 'ok',
      response: { state: 'begun' },
    });
    const bad = await pushAndWait(ch, 'firmware_update_progress', {
      version: '2.0.0',
      percent: 150,
      bytes: 1,
      total: 2,
    });
    assert.equal(bad.status, 'error');
    assert.match(String(bad.response.reason), /percent/);
    assert.deepEqual(bad.response.details, { code: 'invalid', field: 'percent' });
    assert.equal(
      (await pushAndWait(ch, 'firmware_update_progress', { version: '2.0.0', percent: 50, bytes: 512, total: 1024 }))
        .status,
      'ok',
    );
    assert.equal((await pushAndWait(ch, 'firmware_update_finish', { version: '2.0.0' })).status, 'ok');
    const late = await pushAndWait(ch, 'firmware_update_progress', {
      version: '2.0.0',
      percent: 60,
      bytes: 600,
      total: 1024,
    });
    assert.equal(late.status, 'error');
    assert.equal(
      (late.response.details as { code: string }).code,
      'conflict',
      'progress after finish is not a valid transition',
    );
    const unknownBefore = server.deviceSocket.stats.unknownEvents;
    assert.deepEqual(await pushAndWait(ch, 'make_coffee', {}), {
      status: 'error',
      response: { reason: 'unknown event' },
    });
    assert.equal(server.deviceSocket.stats.unknownEvents, unknownBefore + 1);
    const [attempt] = await attemptsOf(first.deviceId);
    assert.deepEqual([attempt?.state, attempt?.percent, attempt?.bytes], ['finished', 100, 512]);
    const log = await fleet.listAuditLog(server.ctx, {
      orgId: acme.org.id,
      resourceType: 'update_attempt',
      resourceId: attempt!.id,
    });
    assert.deepEqual(log.items.map((r) => r.action).reverse(), ['update.begun', 'update.finished']);

    // The device reboots into the new firmware: the update succeeded.
    await closeDevice(first);
    const rebooted = await connectDevice(serial, v2.id);
    assert.deepEqual(rebooted.pushes, []);
    assert.equal((await attemptsOf(first.deviceId))[0]?.state, 'succeeded');
    await closeDevice(rebooted);
  });

  test('a device that comes back on its old firmware after finish is marked rolled back', async () => {
    const serial = uniq('rb');
    const first = await connectDevice(serial, v1.id);
    await fleet.setDeviceTarget(server.ctx, OPERATOR, acme.org.id, first.deviceId, v2.id);
    await waitFor(() => first.pushes.some((p) => p.event === 'firmware_update'), 5000, 'firmware_update');
    await pushAndWait(first.channel, 'firmware_update_begin', { version: '2.0.0' });
    await pushAndWait(first.channel, 'firmware_update_finish', { version: '2.0.0' });
    await closeDevice(first);
    const back = await connectDevice(serial, v1.id);
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(back.pushes, [], 'a rolled-back update is not resent automatically');
    assert.deepEqual(
      (await attemptsOf(first.deviceId)).map((a) => a.state),
      ['rolled_back'],
    );
    await closeDevice(back);
  });

  test('a second connection of the same device closes the first, and no connect publishes a message', async () => {
    const serial = uniq('twice');
    const cred = await deviceCert(serial);
    // Every message this node sends to the cluster while the device connects (a node of its own:
    // what it publishes is what every other node would receive).
    const published = recordPublished(server.pubsub);
    const first = await connectDevice(serial, v1.id, { cred });
    const closeCode = new Promise<number>((resolve) => first.socket.onClose((e: { code: number }) => resolve(e.code)));
    const firstClosed = new Promise<void>((resolve) =>
      first.socket.onClose(() => {
        // Stop the client's automatic reconnect, which would in turn replace the second connection.
        first.socket.disconnect();
        resolve();
      }),
    );
    const second = await connectDevice(serial, v1.id, { cred });
    await firstClosed;
    published.stop();
    assert.equal(await closeCode, 1008, 'the replaced socket is closed by its node with the close code');
    // The device was offline, then online on this node: neither connect costs a message; the
    // topics published are the joins' own (operators' device_status, the attempt's transition).
    assert.deepEqual(
      published.messages.filter((m) => !m.topic.startsWith('operator:')),
      [],
      JSON.stringify(published.messages),
    );
    assert.deepEqual(
      await pushAndWait(second.channel, 'ping', {}),
      { status: 'error', response: { reason: 'unknown event' } },
      'the second connection lives on',
    );
    await waitForDb(
      async () => (await fleet.getDevice(server.ctx, acme.org.id, second.deviceId)).connection_status === 'online',
      'online',
    );
    await closeDevice(second);
  });
});
