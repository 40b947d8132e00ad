import assert from 'node:assert/strict';
import { once } from 'node:events';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { DeviceClient } from '../../device-client/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import {
  attemptAudit,
  attemptsOf,
  restartableServer,
  uploadImage,
  type RestartableServer,
} from '../helpers/server-process.ts';
import { until } from '../helpers/until.ts';

// `fleethub serve` killed with SIGKILL while a Phoenix device downloads its update, then started
// again on the same data and ports. On the rejoin the server sends the update again (the attempt
// is `sent` once more); the device resumes its download with Range where it was cut and reports
// on. The update must complete: no failure anywhere, the device on the new firmware.

const ADMIN = { email: 'resume-crash@example.com', password: 'resume-crash-password-123' };
const SERIAL = 'resume-crash-1';
/**
 * 16 MiB read at 32 Mbit/s: about 4 s, and far more than the socket buffers hold (a few MiB on
 * loopback), so that the kill at the first progress the server records cuts the download for sure.
 */
const SIZE = 16 * 1024 * 1024;
const KBPS = 32_000;

let crashable: RestartableServer;
const clients: DeviceClient[] = [];

before(async () => {
  crashable = await restartableServer('resume-crash', ADMIN);
});
after(async () => {
  await Promise.all(clients.map((c) => c.stop()));
  await crashable.close();
});

describe(`a Phoenix download survives kill -9 of its server (${DATABASE_KIND})`, () => {
  test('the device resumes after the restart and the update succeeds, with no failure recorded', async () => {
    const pki = await getTestPki();
    const first = await crashable.start();
    const base = await uploadImage(first, '1.0.0', 32 * 1024, 1);
    const next = await uploadImage(first, '2.0.0', SIZE, 2);

    const cred = await deviceCert(SERIAL);
    const client = new DeviceClient({
      url: first.server.socketUrl,
      tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
      stateDir: path.join(crashable.dataDir, 'devices', SERIAL),
      firmware: { uuid: base.id, version: base.version },
      // The download cut by the crash retries until the server is back (a start can take a while).
      downloadAttempts: 1500,
      downloadRetryDelayMs: () => 200,
      reconnectAfterMs: () => 200,
      progressIntervalMs: 100,
      faults: () => ({ kbps: KBPS }),
    });
    clients.push(client);
    const errors: string[][] = [];
    client.on('update_error', (e) => errors.push(e.errors));
    const reported: string[] = [];
    client.on('reported', (r) => reported.push(r.event));
    client.on('joined', () => reported.push('joined'));
    const download: { finished?: { bytesFetched: number; attempts: number } } = {};
    client.on('update_finished', (e) => (download.finished = e));
    const joined = once(client, 'joined');
    await client.start();
    await joined;

    const attempts = (s: typeof first) => attemptsOf(s, SERIAL);
    await first.call('PUT', `/api/v1/orgs/default/devices/${SERIAL}/target`, { firmware_id: next.id });

    // The server has recorded progress of the download: kill it there, mid-download.
    const underway = await until(
      async () => (await attempts(first)).find((a) => a.state === 'downloading' && (a.bytes ?? 0) > 0),
      'progress of the download recorded by the server',
      60_000,
    );
    await first.server.kill();
    const beforeCrash = reported.length;
    assert.equal(client.updating, '2.0.0', 'the update was still underway when the server died');
    assert.ok(underway.bytes! < SIZE, `cut at ${underway.bytes} of ${SIZE} bytes`);

    const second = await crashable.start();
    const last = await until(
      async () => {
        const [a] = await attempts(second);
        return a && ['succeeded', 'failed', 'rolled_back', 'timed_out', 'cancelled'].includes(a.state) && a;
      },
      'the attempt to end after the restart',
      180_000,
    );
    const history = await attempts(second);
    assert.deepEqual(
      history.map((a) => [a.id, a.to_version, a.state]),
      [[underway.id, '2.0.0', 'succeeded']],
      `one attempt, succeeded: ${JSON.stringify(last)}`,
    );
    assert.deepEqual(errors, [], 'the device reported no error');
    await until(() => client.running?.version === '2.0.0', 'the device to run 2.0.0', 30_000);
    const device = await second.call<{ firmware_version: string; connection_status: string }>(
      'GET',
      `/api/v1/orgs/default/devices/${SERIAL}`,
    );
    assert.equal(device.firmware_version, '2.0.0');
    // The download resumed with Range where the crash cut it: far less than twice the image.
    const { finished } = download;
    assert.ok(finished && finished.attempts > 1, `download attempts: ${finished?.attempts}`);
    assert.ok(finished.bytesFetched < 1.5 * SIZE, `fetched ${finished.bytesFetched} bytes for ${SIZE}`);
    // On the rejoin (before it announces `joined`) the device reported its begin again; then its
    // progress and finish, and it joined on the new firmware.
    const sinceCrash = reported.slice(beforeCrash);
    const begin = sinceCrash.indexOf('firmware_update_begin');
    assert.equal(sinceCrash[begin + 1], 'joined', sinceCrash.join(', '));
    assert.deepEqual(
      sinceCrash.filter((e) => e !== 'firmware_update_progress'),
      ['firmware_update_begin', 'joined', 'firmware_update_finish', 'joined'],
      sinceCrash.join(', '),
    );
    // The audit history of the attempt: begun (again after the resend), finished, succeeded; never
    // failed. The device said begin itself: no begin had to be implied (the server's resume rule).
    const audit = await attemptAudit(second, underway.id);
    const actions = audit.map((r) => r.action);
    const begun = actions.filter((a) => a === 'update.begun').length;
    assert.deepEqual(
      audit.filter((r) => String(r.details.reason ?? '').startsWith('resumed')),
      [],
      'no begin implied',
    );
    assert.ok(begun >= 2, `begun before the crash and again after it: ${actions.join(', ')}`);
    assert.deepEqual(
      actions,
      [...Array(begun).fill('update.begun'), 'update.finished', 'update.succeeded'],
      actions.join(', '),
    );
  });
});
