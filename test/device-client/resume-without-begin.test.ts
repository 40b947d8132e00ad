import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import type { Channel, Socket } from 'phoenix';
import { DATABASE_KIND } from '../helpers/db.ts';
import {
  disconnectSocket,
  joinChannel,
  nextEvent,
  openSocket,
  pushAndWait,
  type PushOutcome,
} from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import {
  attemptAudit,
  attemptsOf,
  restartableServer,
  uploadImage,
  type ApiServer,
  type RestartableServer,
} from '../helpers/server-process.ts';
import { until } from '../helpers/until.ts';

// An older Phoenix client (as nerves_hub-era devices are) against `fleethub serve` killed with
// SIGKILL mid-download and started again: on its rejoin the server sends the update again (the
// attempt is `sent` once more), and the device carries on with its download WITHOUT reporting a
// new begin, sending only progress and finish. The server's resume rule (docs/phoenix-device-
// protocol.md) counts the first of them as the begin: the update completes, the implied begin is
// audited, and operators (the operator socket) and webhooks see it as its own `begun` transition
// before the report's own. A progress or finish on an update whose download never began is
// refused with the documented conflict, and changes nothing.

const ADMIN = { email: 'resume-old@example.com', password: 'resume-old-password-123' };
const SERIAL = 'resume-old-1';
const TOTAL = 64 * 1024;

let restartable: RestartableServer;
const sockets: Socket[] = [];
let hooks: http.Server | undefined;
/** The device's one certificate, for every connection. */
let tls: Awaited<ReturnType<typeof deviceTlsOptions>>;

before(async () => {
  restartable = await restartableServer('resume-old', ADMIN);
  tls = await deviceTlsOptions(await deviceCert(SERIAL));
});
after(async () => {
  await Promise.allSettled(sockets.map((s) => disconnectSocket(s)));
  await new Promise((resolve) => (hooks ? hooks.close(resolve) : resolve(undefined)));
  await restartable.close();
});

/** A webhook receiver answering 204, keeping each delivery's JSON body in arrival order. */
async function startReceiver() {
  const bodies: { type: string; data: { id: string; state: string } }[] = [];
  hooks = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      bodies.push(JSON.parse(Buffer.concat(chunks).toString('utf8')));
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((resolve) => hooks!.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(hooks.address() as AddressInfo).port}/hooks`, bodies };
}

/** The official phoenix client as the device, joined to `device:<uuid>`; every push it receives, in order. */
async function joinAsDevice(server: ApiServer, uuid: string) {
  const socket = await openSocket(server.server.socketUrl, {
    tls,
    // A dead server is not reconnected to: the device joins anew once it is back, as after a reboot.
    reconnectAfterMs: () => 3_600_000,
  });
  sockets.push(socket);
  const channel = socket.channel(`device:${uuid}`, {});
  const updates: Record<string, unknown>[] = [];
  channel.on('firmware_update', (payload: Record<string, unknown>) => void updates.push(payload));
  await joinChannel(channel);
  return { socket, channel, updates };
}

const progress = (version: string, bytes: number) => ({
  version,
  percent: Math.floor((bytes * 100) / TOTAL),
  bytes,
  total: TOTAL,
});

/** An `ok` reply naming the state the report moved the attempt to. */
function assertOk(outcome: PushOutcome, state: string): void {
  assert.deepEqual(outcome, { status: 'ok', response: { state } });
}

describe(`an old Phoenix client resumes without a new begin after kill -9 of its server (${DATABASE_KIND})`, () => {
  test('progress and finish count as the begin: one attempt, succeeded, the begin audited and published', async () => {
    const first = await restartable.start();
    const base = await uploadImage(first, '1.0.0', 4096, 1);
    const next = await uploadImage(first, '2.0.0', TOTAL, 2);
    const receiver = await startReceiver();
    // Persisted: the restarted server delivers to it too.
    await first.call('POST', '/api/v1/orgs/default/webhooks', { url: receiver.url, events: ['update.transition'] });

    const before = await joinAsDevice(first, base.id);
    const told = nextEvent(before.channel, 'firmware_update');
    await first.call('PUT', `/api/v1/orgs/default/devices/${SERIAL}/target`, { firmware_id: next.id });
    assert.equal((await told).firmware_uuid, next.id);
    assertOk(await pushAndWait(before.channel, 'firmware_update_begin', { version: '2.0.0' }), 'begun');
    assertOk(await pushAndWait(before.channel, 'firmware_update_progress', progress('2.0.0', 16_384)), 'downloading');
    const [underway] = await attemptsOf(first, SERIAL);
    assert.equal(underway?.state, 'downloading');

    await first.server.kill();
    before.socket.disconnect();

    const second = await restartable.start();
    const { id: orgId } = await second.call<{ id: string }>('GET', '/api/v1/orgs/default');
    const operators = await openSocket(`${second.server.apiUrl.replace('http', 'ws')}/socket`, {
      tls: {},
      authToken: second.token,
    });
    sockets.push(operators);
    const live: Channel = operators.channel(`operator:${orgId}`);
    const published: string[] = [];
    live.on('update_transition', (p: { id: string; state: string }) => {
      if (p.id === underway!.id) published.push(p.state);
    });
    await joinChannel(live);

    // The rejoin on the old firmware: the update is sent again, the attempt is `sent` once more.
    const resumed = await joinAsDevice(second, base.id);
    await until(() => resumed.updates.length > 0, 'the update sent again on the rejoin');
    assert.equal(resumed.updates[0]!.firmware_uuid, next.id);
    assert.equal((await attemptsOf(second, SERIAL))[0]?.state, 'sent');
    // No begin: progress, then finish, each acknowledged.
    assertOk(await pushAndWait(resumed.channel, 'firmware_update_progress', progress('2.0.0', 49_152)), 'downloading');
    assertOk(await pushAndWait(resumed.channel, 'firmware_update_finish', { version: '2.0.0' }), 'finished');
    await disconnectSocket(resumed.socket);
    // It reboots into the new image and joins on its uuid.
    const rebooted = await joinAsDevice(second, next.id);

    const history = await until(async () => {
      const attempts = await attemptsOf(second, SERIAL);
      return attempts[0]?.state === 'succeeded' && attempts;
    }, 'the attempt to succeed on the rejoin on 2.0.0');
    assert.deepEqual(
      history.map((a) => [a.id, a.to_version, a.state, a.errors ?? []]),
      [[underway!.id, '2.0.0', 'succeeded', []]],
      'one attempt, succeeded, no error',
    );
    const audit = await attemptAudit(second, underway!.id);
    assert.deepEqual(
      audit.map((r) => r.action),
      ['update.begun', 'update.begun', 'update.finished', 'update.succeeded'],
      'begun, begun again (implied), finished, succeeded; never failed',
    );
    assert.equal(audit[0]!.details.reason, undefined, 'the first begin was reported');
    assert.match(
      String(audit[1]!.details.reason),
      /^resumed: firmware_update_progress on an update sent again mid-download$/,
    );
    assert.equal(audit[1]!.details.from_state, 'sent');

    // Operators saw every move in order: the resend, the implied begin, the progress, the finish, the outcome.
    await until(() => published.includes('succeeded'), 'the outcome on the operator socket');
    assert.deepEqual(published, ['sent', 'begun', 'downloading', 'finished', 'succeeded']);
    // Webhooks get each state but progress (docs/webhooks.md): the implied begin among them.
    const delivered = () => receiver.bodies.filter((b) => b.data.id === underway!.id).map((b) => b.data.state);
    await until(() => delivered().includes('succeeded'), 'the outcome delivered to the webhook');
    assert.deepEqual(
      [...delivered()].sort(),
      ['begun', 'begun', 'finished', 'sent', 'succeeded'],
      'before the crash: begun; after it: sent (again), begun (implied), finished, succeeded',
    );

    // An update whose download never began gets no such help: its progress and finish are refused
    // with the documented conflict and change nothing.
    const v3 = await uploadImage(second, '3.0.0', 4096, 3);
    const toldAgain = nextEvent(rebooted.channel, 'firmware_update');
    await second.call('PUT', `/api/v1/orgs/default/devices/${SERIAL}/target`, { firmware_id: v3.id });
    await toldAgain;
    const [fresh] = await attemptsOf(second, SERIAL);
    assert.equal(fresh?.state, 'sent');
    for (const [event, payload] of [
      ['firmware_update_progress', progress('3.0.0', 1024)],
      ['firmware_update_finish', { version: '3.0.0' }],
    ] as const) {
      assert.deepEqual(await pushAndWait(rebooted.channel, event, payload), {
        status: 'error',
        response: {
          reason: `${event} is not allowed while the update is sent; report the begin of the update first`,
          details: { code: 'conflict', state: 'sent', event },
        },
      });
    }
    assert.deepEqual(await attemptsOf(second, SERIAL), [fresh, ...history], 'nothing changed');
    assert.deepEqual(await attemptAudit(second, fresh!.id), [], 'nothing audited');
  });
});
