import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { DeviceClient } from '../../device-client/index.ts';
import { sweepStaleUpdates } from '../../server/fleet/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { joinChannel, nextEvent, openSocket, pushAndWait } from '../helpers/phoenix.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';
import { startDevices as harnessDevices, matchGroup, type Release, uploadRelease } from './deployment-harness.ts';

interface Deployment {
  id: string;
  state: string;
  paused_reason: string | null;
  current_stage: number;
  counts: Record<string, number>;
  stages: Array<Record<string, number> & { index: number; size: number; succeeded_at: string | null }>;
}
interface DeploymentDevice {
  identifier: string;
  stage: number;
  state: string;
  told_at: string | null;
  tries: number;
  failure_reason: string | null;
}

const serial = (prefix: string, i: number) => `${prefix}${String(i).padStart(3, '0')}`;

describe(`deployments: stages, thresholds, pause, resume, abort (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let base: Release;

  const clients: DeviceClient[] = [];

  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-deploy-'));
    base = await upload('1.0.0', 1);
    await upload('2.0.0', 2);
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.stop()));
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  const upload = (version: string, seed: number) => uploadRelease(server, version, seed);
  const api = (org = server.orgId) => `/api/v1/orgs/${org}`;

  /** Real devices (this package's client) running `base`; those in `bad` refuse to install any update. */
  const startDevices = (prefix: string, count: number, bad: (i: number) => boolean) =>
    harnessDevices(server, {
      names: Array.from({ length: count }, (_, i) => serial(prefix, i)),
      base,
      stateDir: tmp,
      clients,
      faults: (i) => (bad(i) ? { rejectInstall: true } : undefined),
    });

  const group = (name: string, match: string) => matchGroup(server, name, match);

  const show = (id: string) => server.call<Deployment>('GET', `${api()}/deployments/${id}`);

  async function devices(id: string, query = ''): Promise<DeploymentDevice[]> {
    const page = await server.call<{ items: DeploymentDevice[]; total: number }>(
      'GET',
      `${api()}/deployments/${id}/devices?limit=1000${query}`,
    );
    assert.equal(page.items.length, page.total);
    return page.items;
  }

  /** Identifiers of devices with any update attempt to `version`. */
  async function attemptedTo(prefix: string, version: string): Promise<string[]> {
    const rows = await server.database.db
      .selectFrom('update_attempts')
      .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
      .select('devices.identifier')
      .distinct()
      .where('update_attempts.to_version', '=', version)
      .where('devices.identifier', 'like', `${prefix}%`)
      .execute();
    return rows.map((r) => r.identifier).sort();
  }

  const range = (prefix: string, from: number, to: number) =>
    Array.from({ length: to - from }, (_, k) => serial(prefix, from + k));

  test('200 devices, 20% failing: the canary trips the 10% threshold, resume continues, abort stops', async () => {
    const bad = (i: number) => i % 5 === 0; // dep000, dep005, ...: 40 of 200
    await startDevices('dep', 200, bad);
    await group('fleet', 'dep*');
    const threshold = { error: { percent: 10 }, min_finished: 10 };
    const created = await server.call<Deployment & { already_running: number }>('POST', `${api()}/deployments`, {
      product: 'default',
      version: '2.0.0',
      groups: ['fleet'],
      stages: [
        { size: { count: 10 }, ...threshold },
        { size: { percent: 50 }, ...threshold },
        { size: 'rest', ...threshold },
      ],
    });
    assert.equal(created.state, 'running');
    assert.equal(created.already_running, 0);
    assert.deepEqual(
      created.stages.map((s) => s.size),
      [10, 100, 90],
    );

    // The canary (dep000..dep009 by identifier): 2 of 10 fail = 20% ≥ 10% → paused.
    const paused = await until(
      async () => {
        const d = await show(created.id);
        return d.state === 'paused' && d.stages[0]!.in_flight === 0 && d;
      },
      'the deployment to pause at the canary',
      60_000,
    );
    assert.match(paused.paused_reason ?? '', /stage 1 error condition: 2 of 10 finished failed \(20% ≥ 10%\)/);
    assert.equal(paused.current_stage, 0);
    const canary = range('dep', 0, 10);
    const rows = await devices(created.id);
    assert.deepEqual(
      rows.filter((r) => r.told_at !== null).map((r) => r.identifier),
      canary,
    );
    assert.deepEqual(
      rows.filter((r) => r.state === 'failed').map((r) => r.identifier),
      ['dep000', 'dep005'],
    );
    assert.deepEqual(
      rows.filter((r) => r.state === 'succeeded').map((r) => r.identifier),
      canary.filter((_, i) => !bad(i)),
    );
    assert.ok(rows.filter((r) => r.state === 'failed').every((r) => /^failed: /.test(r.failure_reason ?? '')));
    // Nobody beyond the canary was told: no attempt to 2.0.0 exists for any other device.
    assert.deepEqual(await attemptedTo('dep', '2.0.0'), canary);
    assert.deepEqual(paused.counts, {
      total: 200,
      pending: 190,
      told: 10,
      in_flight: 0,
      succeeded: 8,
      failed: 2,
      cancelled: 0,
      retrying: 0,
      penalty_box: 0,
    });
    // The succeeded ones run 2.0.0, the failed ones still 1.0.0.
    const running = await server.database.db
      .selectFrom('devices')
      .select(['identifier', 'firmware_version'])
      .where('identifier', 'in', canary)
      .orderBy('identifier')
      .execute();
    assert.deepEqual(
      running.map((r) => r.firmware_version),
      canary.map((_, i) => (bad(i) ? '1.0.0' : '2.0.0')),
    );
    // Paused holds: a few ticks later still nobody new.
    await new Promise((r) => setTimeout(r, 2500));
    assert.deepEqual(await attemptedTo('dep', '2.0.0'), canary);

    // Resume: the canary's failures are accepted, stage 2 (dep010..dep109) is told; its own 20% trips again.
    await server.call('POST', `${api()}/deployments/${created.id}/resume`);
    const again = await until(
      async () => {
        const d = await show(created.id);
        return d.state === 'paused' && d.current_stage === 1 && d.stages[1]!.in_flight === 0 && d;
      },
      'the deployment to pause again in stage 2',
      90_000,
    );
    assert.match(again.paused_reason ?? '', /stage 2 error condition/);
    const stage2 = range('dep', 10, 110);
    const after2 = await devices(created.id);
    assert.deepEqual(
      after2.filter((r) => r.told_at !== null).map((r) => r.identifier),
      [...canary, ...stage2],
    );
    assert.deepEqual(await attemptedTo('dep', '2.0.0'), [...canary, ...stage2]);
    const s2 = after2.filter((r) => r.stage === 1);
    assert.deepEqual(
      s2.filter((r) => r.state === 'failed').map((r) => r.identifier),
      stage2.filter((_, k) => bad(10 + k)),
    );
    assert.equal(s2.filter((r) => r.state === 'succeeded').length, 80);
    assert.ok(
      after2.every((r) => r.tries <= 1),
      'no device told twice',
    );
    assert.deepEqual(again.stages[2]!.told, 0);

    // Abort: nobody new is told, ever.
    const aborted = await server.call<Deployment>('POST', `${api()}/deployments/${created.id}/abort`, {
      reason: 'bad release',
    });
    assert.equal(aborted.state, 'aborted');
    await new Promise((r) => setTimeout(r, 2500));
    assert.deepEqual(await attemptedTo('dep', '2.0.0'), [...canary, ...stage2]);
    const final = await show(created.id);
    assert.deepEqual(final.counts, {
      total: 200,
      pending: 90,
      told: 110,
      in_flight: 0,
      succeeded: 88,
      failed: 22,
      cancelled: 0,
      retrying: 0,
      penalty_box: 0,
    });
    // Every transition is in the audit log.
    const actions = await server.database.db
      .selectFrom('audit_log')
      .select('action')
      .where('resource_id', '=', created.id)
      .orderBy('id')
      .execute();
    assert.deepEqual(
      actions.map((a) => a.action),
      [
        'deployment.created',
        'deployment.paused',
        'deployment.resumed',
        'deployment.stage_succeeded',
        'deployment.stage_started',
        'deployment.paused',
        'deployment.aborted',
      ],
    );
  });

  test('abort cancels an update in flight: the device is told, its late reports are refused', async () => {
    const pki = await getTestPki();
    const cred = await deviceCert('late-1');
    const socket = await openSocket(`${server.deviceUrl.replace(/^https/, 'wss')}/socket`, {
      tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
    });
    try {
      const channel = socket.channel(`device:${base.id}`, {});
      await joinChannel(channel);
      await group('late', 'late-*');
      const update = nextEvent(channel, 'firmware_update', 15_000);
      const d = await server.call<Deployment>('POST', `${api()}/deployments`, {
        product: 'default',
        version: '2.0.0',
        groups: ['late'],
      });
      const pushed = await update;
      assert.equal(pushed.version, '2.0.0');
      assert.equal((await pushAndWait(channel, 'firmware_update_begin', { version: '2.0.0' })).status, 'ok');

      const cancelled = nextEvent(channel, 'update_cancelled');
      const aborted = await server.call<Deployment>('POST', `${api()}/deployments/${d.id}/abort`);
      assert.equal(aborted.state, 'aborted');
      assert.deepEqual(aborted.counts, { ...aborted.counts, total: 1, cancelled: 1, in_flight: 0, succeeded: 0 });
      const push = await cancelled;
      assert.equal(push.version, '2.0.0');
      assert.match(String(push.reason), new RegExp(`deployment ${d.id} was aborted`));

      // A late report is refused, saying why, and recorded; it never counts as success.
      const late = await pushAndWait(channel, 'firmware_update_finish', { version: '2.0.0' });
      assert.equal(late.status, 'error');
      assert.match(String(late.response.reason), new RegExp(`deployment ${d.id} was aborted`));
      const recorded = await server.database.db
        .selectFrom('audit_log')
        .select(['action', 'details'])
        .where('resource_id', '=', d.id)
        .where('action', '=', 'deployment.late_report')
        .execute();
      assert.equal(recorded.length, 1);
      const [row] = await devices(d.id);
      assert.equal(row!.state, 'cancelled');
      const attempt = await server.database.db
        .selectFrom('update_attempts')
        .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
        .select('update_attempts.state')
        .where('devices.identifier', '=', 'late-1')
        .executeTakeFirstOrThrow();
      assert.equal(attempt.state, 'cancelled');
    } finally {
      socket.disconnect();
    }
  });

  test('success waits for the reboot; a device that rolls back counts as failed', async () => {
    const pki = await getTestPki();
    const cred = await deviceCert('rb-1');
    const socket = await openSocket(`${server.deviceUrl.replace(/^https/, 'wss')}/socket`, {
      tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
    });
    try {
      const channel = socket.channel(`device:${base.id}`, {});
      await joinChannel(channel);
      await group('rb', 'rb-*');
      const update = nextEvent(channel, 'firmware_update', 15_000);
      const d = await server.call<Deployment>('POST', `${api()}/deployments`, {
        product: 'default',
        version: '2.0.0',
        groups: ['rb'],
      });
      await update;
      for (const event of ['firmware_update_begin', 'firmware_update_finish'])
        assert.equal((await pushAndWait(channel, event, { version: '2.0.0' })).status, 'ok');
      // `finished` is not success: a few orchestrator ticks later the device is still in flight.
      await new Promise((r) => setTimeout(r, 2500));
      const waiting = await show(d.id);
      assert.equal(waiting.state, 'running');
      assert.equal(waiting.counts.in_flight, 1);
      assert.equal(waiting.counts.succeeded, 0);
      assert.equal(waiting.stages[0]!.succeeded_at, null);

      // It comes back on the old firmware: rolled back, a failure; the stage cannot succeed → paused.
      await new Promise<void>((resolve) => channel.leave().receive('ok', () => resolve()));
      await joinChannel(socket.channel(`device:${base.id}`, {}));
      const paused = await until(
        async () => {
          const x = await show(d.id);
          return x.state === 'paused' && x;
        },
        'the deployment to pause on the rollback',
        15_000,
      );
      assert.match(paused.paused_reason ?? '', /stage 1 finished short of its success condition: 0 of 1 succeeded/);
      const [row] = await devices(d.id);
      assert.equal(row!.state, 'failed');
      assert.equal(row!.failure_reason, 'rolled_back');
      await server.call('POST', `${api()}/deployments/${d.id}/abort`);
    } finally {
      socket.disconnect();
    }
  });

  test('pacing: never more than max_concurrent in flight, measured from the attempts', async () => {
    // Slow downloads (64 kbit/s: about 2 s for 16 KiB), so updates overlap unless the limit holds.
    await harnessDevices(server, {
      names: Array.from({ length: 6 }, (_, i) => serial('mc', i)),
      base,
      stateDir: tmp,
      clients,
      kbps: 64,
    });
    await group('mc', 'mc*');
    const d = await server.call<Deployment>('POST', `${api()}/deployments`, {
      product: 'default',
      version: '2.0.0',
      groups: ['mc'],
      max_concurrent: 2,
    });
    await until(async () => (await show(d.id)).state === 'completed', 'the deployment to complete', 90_000);
    const attempts = await server.database.db
      .selectFrom('update_attempts')
      .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
      .select(['update_attempts.sent_at', 'update_attempts.completed_at', 'update_attempts.state'])
      .where('devices.identifier', 'like', 'mc%')
      .where('update_attempts.to_version', '=', '2.0.0')
      .execute();
    assert.equal(attempts.length, 6);
    assert.ok(attempts.every((a) => a.state === 'succeeded'));
    // The most updates in flight at one instant (an update is in flight from its push to its outcome).
    const edges = attempts.flatMap((a) => [
      { t: a.sent_at!.getTime(), d: 1 },
      { t: a.completed_at!.getTime(), d: -1 },
    ]);
    edges.sort((x, y) => x.t - y.t || x.d - y.d);
    let inFlight = 0;
    let most = 0;
    for (const e of edges) {
      inFlight += e.d;
      most = Math.max(most, inFlight);
    }
    assert.equal(most, 2);
  });

  test('pacing: rate_per_minute tells at most that many devices in any 60 s', async () => {
    await startDevices('rt', 4, () => false);
    await group('rt', 'rt*');
    const d = await server.call<Deployment>('POST', `${api()}/deployments`, {
      product: 'default',
      version: '2.0.0',
      groups: ['rt'],
      rate_per_minute: 3,
    });
    // Three are told at once and succeed; the fourth waits for the minute to pass.
    await until(async () => (await show(d.id)).counts.succeeded === 3, 'three devices to succeed', 30_000);
    await new Promise((r) => setTimeout(r, 3000));
    assert.equal((await show(d.id)).counts.told, 3);
    await until(async () => (await show(d.id)).state === 'completed', 'the deployment to complete', 90_000);
    const told = (await devices(d.id)).map((r) => new Date(r.told_at!).getTime()).sort((a, b) => a - b);
    assert.equal(told.length, 4);
    assert.ok(told[3]! - told[0]! >= 60_000, `the fourth was told ${told[3]! - told[0]!} ms after the first`);
  });

  test("a deployment's in-flight timeout replaces the product's: a silent device times out and fails", async () => {
    const pki = await getTestPki();
    const cred = await deviceCert('to-1');
    const socket = await openSocket(`${server.deviceUrl.replace(/^https/, 'wss')}/socket`, {
      tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
    });
    try {
      const channel = socket.channel(`device:${base.id}`, {});
      await joinChannel(channel);
      await group('to', 'to-*');
      const update = nextEvent(channel, 'firmware_update', 15_000);
      const d = await server.call<Deployment>('POST', `${api()}/deployments`, {
        product: 'default',
        version: '2.0.0',
        groups: ['to'],
        in_flight_timeout_s: 60,
      });
      await update;
      // Under the deployment's 60 s nothing times out; past it the sweep times the attempt out.
      assert.equal(await sweepStaleUpdates(server.fleet, { now: new Date(Date.now() + 30_000) }), 0);
      assert.equal(await sweepStaleUpdates(server.fleet, { now: new Date(Date.now() + 61_000) }), 1);
      const paused = await until(
        async () => {
          const x = await show(d.id);
          return x.state === 'paused' && x;
        },
        'the deployment to record the timeout',
        15_000,
      );
      assert.equal(paused.counts.failed, 1);
      const [row] = await devices(d.id);
      assert.equal(row!.failure_reason, 'timed_out');
      await server.call('POST', `${api()}/deployments/${d.id}/abort`);
    } finally {
      socket.disconnect();
    }
  });

  test('a device in an active deployment cannot be in a second one: 409 with the count', async () => {
    await startDevices('ovl', 3, () => false);
    await group('ovl-a', 'ovl*');
    const first = await server.call<Deployment>('POST', `${api()}/deployments`, {
      product: 'default',
      version: '2.0.0',
      groups: ['ovl-a'],
      start: false,
    });
    assert.equal(first.state, 'draft');
    const res = await fetch(`${server.apiUrl}${api()}/deployments`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ product: 'default', version: '2.0.0', groups: ['ovl-a'] }),
    });
    assert.equal(res.status, 409);
    const body = (await res.json()) as { error: { code: string; message: string; details: Record<string, unknown> } };
    assert.equal(body.error.code, 'conflict');
    assert.equal(body.error.details.overlapping_devices, 3);
    assert.deepEqual(body.error.details.deployments, [first.id]);
    // A draft tells nobody.
    assert.deepEqual(await attemptedTo('ovl', '2.0.0'), []);
  });
});
