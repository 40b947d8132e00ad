/**
 * Deployment pacing beyond a constant rate (docs/deployments.md), against the real server with
 * real devices (this package's client, and raw Phoenix sockets where a device must decline or
 * stay silent): retries with a doubling backoff, declined devices never retried, timed-out ones
 * retried, the penalty box holding a device out and releasing it, the exponential rate as AWS IoT
 * Jobs define it (measured from the push timestamps), and the create body's 400s.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { DeviceClient, UpdateFaults } from '../../device-client/index.ts';
import { buildGrispPackage } from '../../device-client/simulators/grisp.ts';
import { currentRate } from '../../server/fleet/deployments/index.ts';
import { sweepStaleUpdates } from '../../server/fleet/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { nextEvent, pushAndWait } from '../helpers/phoenix.ts';
import { parseMetrics } from '../helpers/prometheus.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';
import {
  startDevices as harnessDevices,
  rawDevice as harnessRawDevice,
  matchGroup,
  type Release,
  uploadRelease,
} from './deployment-harness.ts';

interface Deployment {
  id: string;
  state: string;
  paused_reason: string | null;
  counts: Record<string, number>;
  rate: Record<string, unknown>;
  penalty_failures: number | null;
}
interface DeploymentDevice {
  identifier: string;
  state: string;
  tries: number;
  told_at: string | null;
  succeeded_at: string | null;
  retry_at: string | null;
  failure_reason: string | null;
}

const METRICS_TOKEN = 'pacing-metrics-token';

describe(`deployments: retries, penalty box, exponential rate (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let base: Release;
  const clients: DeviceClient[] = [];
  const sockets: Array<{ disconnect(): void }> = [];

  before(async () => {
    server = await startTestServer({ metricsToken: METRICS_TOKEN });
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-pacing-'));
    base = await upload('1.0.0', 1);
    await upload('2.0.0', 2);
  });
  after(async () => {
    for (const s of sockets) s.disconnect();
    await Promise.all(clients.map((c) => c.stop()));
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  const url = (p: string) => `/api/v1/orgs/${server.orgId}${p}`;
  const upload = (version: string, seed: number) => uploadRelease(server, version, seed);
  const startDevices = (names: string[], faults: (i: number, n: number) => UpdateFaults | undefined) =>
    harnessDevices(server, { names, base, stateDir: tmp, clients, faults });
  async function rawDevice(name: string) {
    const { socket, channel } = await harnessRawDevice(server, name, base);
    sockets.push(socket);
    return channel;
  }
  const group = (name: string, match: string) => matchGroup(server, name, match);

  const create = (body: Record<string, unknown>) =>
    server.call<Deployment>('POST', url('/deployments'), { product: 'default', version: '2.0.0', ...body });
  const show = (id: string) => server.call<Deployment>('GET', url(`/deployments/${id}`));
  async function devices(id: string): Promise<DeploymentDevice[]> {
    return (await server.call<{ items: DeploymentDevice[] }>('GET', url(`/deployments/${id}/devices?limit=1000`)))
      .items;
  }
  /** The device's attempts to 2.0.0, oldest first. */
  async function attempts(identifier: string) {
    return server.database.db
      .selectFrom('update_attempts')
      .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
      .select([
        'update_attempts.state',
        'update_attempts.sent_at',
        'update_attempts.begun_at',
        'update_attempts.completed_at',
        'update_attempts.via',
      ])
      .where('devices.identifier', '=', identifier)
      .where('update_attempts.to_version', '=', '2.0.0')
      .orderBy('update_attempts.created_at')
      .execute();
  }
  async function metric(name: string): Promise<number> {
    const res = await fetch(`${server.apiUrl}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } });
    return parseMetrics(await res.text()).find((s) => s.name === name)?.value ?? 0;
  }
  const fail = { failDownload: true };

  test('retries: a failing device is told again after a doubling backoff; a declined one never', async () => {
    // rty-a fails its first update then succeeds; rty-b fails every time; rty-c declines.
    await startDevices(['rty-a', 'rty-b'], (i, n) => (i === 1 || n === 1 ? fail : undefined));
    const decliner = await rawDevice('rty-c');
    const declined = nextEvent(decliner, 'firmware_update', 15_000);
    await group('rty', 'rty-*');
    const retriedBefore = await metric('fleethub_deployment_retries_total');
    const d = await create({
      groups: ['rty'],
      retries: 2,
      retry_backoff_s: 1,
      stages: [{ size: 'rest', success: { count: 1 } }],
    });
    assert.equal((await declined).version, '2.0.0');
    // Refused before beginning: the device declined it.
    assert.equal(
      (await pushAndWait(decliner, 'firmware_update_error', { version: '2.0.0', errors: ['no room'] })).status,
      'ok',
    );

    const done = await until(
      async () => {
        const x = await show(d.id);
        return x.state === 'completed' && x;
      },
      'the deployment to complete',
      60_000,
    );
    assert.deepEqual(
      { ...done.counts },
      {
        total: 3,
        pending: 0,
        told: 3,
        in_flight: 0,
        retrying: 0,
        penalty_box: 0,
        succeeded: 1,
        failed: 2,
        cancelled: 0,
      },
    );
    const rows = new Map((await devices(d.id)).map((r) => [r.identifier, r]));
    assert.equal(rows.get('rty-a')!.state, 'succeeded');
    assert.equal(rows.get('rty-a')!.tries, 2);
    assert.equal(rows.get('rty-b')!.state, 'failed');
    assert.equal(rows.get('rty-b')!.tries, 3, '1 + 2 retries');
    assert.match(rows.get('rty-b')!.failure_reason ?? '', /^failed: download of 2\.0\.0 failed/);
    assert.equal(rows.get('rty-c')!.state, 'failed');
    assert.equal(rows.get('rty-c')!.tries, 1, 'a declined device is never retried');
    assert.match(rows.get('rty-c')!.failure_reason ?? '', /^failed: no room/);

    // One attempt per try; each retry was sent no sooner than its backoff after the failure (1 s, then 2 s).
    assert.deepEqual(
      (await attempts('rty-a')).map((a) => a.state),
      ['failed', 'succeeded'],
    );
    assert.deepEqual(
      (await attempts('rty-c')).map((a) => a.state),
      ['failed'],
    );
    const b = await attempts('rty-b');
    assert.deepEqual(
      b.map((a) => a.state),
      ['failed', 'failed', 'failed'],
    );
    assert.ok(b.every((a) => a.via === `deployment:${d.id}`));
    for (const [k, backoffMs] of [
      [1, 1000],
      [2, 2000],
    ] as const) {
      const waited = b[k]!.sent_at!.getTime() - b[k - 1]!.completed_at!.getTime();
      assert.ok(waited >= backoffMs, `retry ${k} was sent ${waited} ms after the failure, backoff ${backoffMs} ms`);
    }
    // rty-a once, rty-b twice.
    assert.equal((await metric('fleethub_deployment_retries_total')) - retriedBefore, 3);
  });

  test('a timed-out device is retried; once its retries are spent its failure is final', async () => {
    const channel = await rawDevice('rto-1');
    await group('rto', 'rto-*');
    const first = nextEvent(channel, 'firmware_update', 15_000);
    const d = await create({ groups: ['rto'], retries: 1, retry_backoff_s: 0, in_flight_timeout_s: 60 });
    await first;
    // Silent past the deployment's timeout: timed out, and told again.
    const second = nextEvent(channel, 'firmware_update', 15_000);
    assert.equal(await sweepStaleUpdates(server.fleet, { now: new Date(Date.now() + 61_000) }), 1);
    assert.equal((await second).version, '2.0.0');
    for (const [event, payload] of [
      ['firmware_update_begin', { version: '2.0.0' }],
      ['firmware_update_error', { version: '2.0.0', errors: ['flash write failed'] }],
    ] as const)
      assert.equal((await pushAndWait(channel, event, payload)).status, 'ok');
    const paused = await until(
      async () => {
        const x = await show(d.id);
        return x.state === 'paused' && x;
      },
      'the deployment to record the final failure',
      15_000,
    );
    assert.equal(paused.counts.failed, 1);
    const [row] = await devices(d.id);
    assert.equal(row!.tries, 2);
    assert.match(row!.failure_reason ?? '', /^failed: flash write failed/);
    assert.deepEqual(
      (await attempts('rto-1')).map((a) => a.state),
      ['timed_out', 'failed'],
    );
    await server.call('POST', url(`/deployments/${d.id}/abort`));
  });

  test('the penalty box holds a device that failed twice in the window out for the hold, then releases it', async () => {
    // Fails its first two updates, then succeeds.
    await startDevices(['pen-1'], (_, n) => (n <= 2 ? fail : undefined));
    await group('pen', 'pen-*');
    const boxedBefore = await metric('fleethub_deployment_penalty_boxed_total');
    const d = await create({
      groups: ['pen'],
      retries: 3,
      retry_backoff_s: 0,
      penalty: { failures: 2, window_s: 600, hold_s: 4 },
    });
    assert.equal(d.penalty_failures, 2);
    // Shown as such: the device list, the counts (and `fleethub deployments show`, test/cli).
    const held = await until(
      async () => {
        const x = await show(d.id);
        return x.counts.penalty_box === 1 && x;
      },
      'the device in the penalty box',
      30_000,
    );
    assert.equal(held.state, 'running');
    const [row] = await devices(d.id);
    assert.equal(row!.state, 'penalty_box');
    assert.equal(row!.tries, 2);
    assert.ok(row!.retry_at);
    assert.equal((await metric('fleethub_deployment_penalty_boxed_total')) - boxedBefore, 1);

    // Released after the hold: told again, and it succeeds.
    await until(async () => (await show(d.id)).state === 'completed', 'the deployment to complete', 30_000);
    const a = await attempts('pen-1');
    assert.deepEqual(
      a.map((x) => x.state),
      ['failed', 'failed', 'succeeded'],
    );
    const held_ms = a[2]!.sent_at!.getTime() - a[1]!.completed_at!.getTime();
    assert.ok(held_ms >= 4000, `released ${held_ms} ms after the second failure (hold 4 s)`);
    // The first retry had no backoff (0 s): the penalty box is what held the second one.
    const [done] = await devices(d.id);
    assert.equal(done!.state, 'succeeded');
    assert.equal(done!.tries, 3);
    assert.equal(done!.retry_at, null);

    // Both moves are audited on the deployment: boxed with its failure count and hold, then released.
    const device = await server.database.db
      .selectFrom('devices')
      .select('id')
      .where('identifier', '=', 'pen-1')
      .executeTakeFirstOrThrow();
    const entries = await server.database.db
      .selectFrom('audit_log')
      .select(['action', 'actor_type', 'details'])
      .where('resource_type', '=', 'deployment')
      .where('resource_id', '=', d.id)
      .where('action', 'in', ['deployment.device_boxed', 'deployment.device_released'])
      .orderBy('id')
      .execute();
    assert.deepEqual(
      entries.map((e) => e.action),
      ['deployment.device_boxed', 'deployment.device_released'],
    );
    const [boxed, released] = entries.map((e) => e.details as Record<string, unknown>);
    assert.equal(entries[0]!.actor_type, 'system');
    assert.deepEqual(
      { ...boxed, retry_at: undefined },
      {
        device_id: device.id,
        stage: 0,
        tries: 2,
        failures: 2,
        window_s: 600,
        hold_s: 4,
        retry_at: undefined,
        failure_reason: boxed!.failure_reason,
      },
    );
    assert.match(String(boxed!.failure_reason), /^failed/);
    const heldUntil = Date.parse(String(boxed!.retry_at));
    // The hold runs from the second failure (timestamps to the millisecond: ±1 ms of rounding).
    const hold = heldUntil - a[1]!.completed_at!.getTime();
    assert.ok(Math.abs(hold - 4000) <= 1, `held ${hold} ms from the second failure`);
    assert.deepEqual(
      { ...released, held_until: Date.parse(String(released!.held_until)) },
      { device_id: device.id, stage: 0, tries: 3, held_until: heldUntil },
    );
  });

  test('a device that is retried without reaching the penalty box is never audited as boxed', async () => {
    // Fails once, then succeeds: one retry, below the penalty's two failures.
    await startDevices(['pnb-1'], (_, n) => (n === 1 ? fail : undefined));
    await group('pnb', 'pnb-*');
    const d = await create({
      groups: ['pnb'],
      retries: 3,
      retry_backoff_s: 0,
      penalty: { failures: 2, window_s: 600, hold_s: 4 },
    });
    await until(async () => (await show(d.id)).state === 'completed', 'the deployment to complete', 30_000);
    const [row] = await devices(d.id);
    assert.equal(row!.tries, 2);
    const entries = await server.database.db
      .selectFrom('audit_log')
      .select('action')
      .where('resource_id', '=', d.id)
      .where('action', 'in', ['deployment.device_boxed', 'deployment.device_released'])
      .execute();
    assert.deepEqual(entries, []);
  });

  /** Devices grouped by the step that told them (one step: one transaction, one `told_at`). */
  async function batches(id: string): Promise<DeploymentDevice[][]> {
    const rows = (await devices(id)).sort((x, y) => Date.parse(x.told_at!) - Date.parse(y.told_at!));
    const out: DeploymentDevice[][] = [];
    for (const r of rows) {
      const last = out.at(-1);
      if (last && last[0]!.told_at === r.told_at) last.push(r);
      else out.push([r]);
    }
    return out;
  }

  test('exponential rate, criterion notified: 1 a minute, ×3 at each device notified', async () => {
    const names = ['exn-0', 'exn-1', 'exn-2', 'exn-3'];
    await startDevices(names, () => undefined);
    await group('exn', 'exn-*');
    const d = await create({
      groups: ['exn'],
      rate: { type: 'exponential', base: 1, factor: 3, criterion: 'notified', every: 1 },
    });
    assert.deepEqual(d.rate, { type: 'exponential', base: 1, factor: 3, criterion: 'notified', every: 1 });
    await until(async () => (await show(d.id)).state === 'completed', 'the deployment to complete', 60_000);
    // Rate 1 (nobody notified) → 1; rate 3 (1 notified), 1 told in the last minute → 2; rate 27 → the last.
    // A constant 1 a minute would have taken three more minutes.
    assert.deepEqual(
      (await batches(d.id)).map((b) => b.length),
      [1, 2, 1],
    );
  });

  test('exponential rate, criterion succeeded: the rate rises only as devices succeed', async () => {
    const names = ['exs-0', 'exs-1', 'exs-2', 'exs-3'];
    await startDevices(names, () => undefined);
    await group('exs', 'exs-*');
    const d = await create({
      groups: ['exs'],
      rate: { type: 'exponential', base: 1, factor: 2, criterion: 'succeeded', every: 1, max: 10 },
    });
    await until(async () => (await show(d.id)).state === 'completed', 'the deployment to complete', 60_000);
    // 1 (0 succeeded) → 1; 2 (1 succeeded) − 1 told → 1; 4 (2 succeeded) − 2 told → 2.
    const told = await batches(d.id);
    assert.deepEqual(
      told.map((b) => b.length),
      [1, 1, 2],
    );
    // Each batch was told only after the success that raised the rate.
    const succeededAt = (b: DeploymentDevice[]) => Math.max(...b.map((r) => Date.parse(r.succeeded_at!)));
    assert.ok(Date.parse(told[1]![0]!.told_at!) >= succeededAt(told[0]!));
    assert.ok(Date.parse(told[2]![0]!.told_at!) >= succeededAt(told[1]!));
  });

  test('already running is per release: devices on another variant of it are left out, not told', async () => {
    // The exs-* devices run the raw 2.0.0 (the test above); add the GRiSP variant of the same release.
    const pkg = await buildGrispPackage({ version: '2.0.0', blocks: [randomBytes(4000)] });
    const res = await fetch(
      `${server.apiUrl}/api/v1/grisp/firmware?product=${server.productId}&org=${server.orgId}&version=2.0.0`,
      {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
        body: new Uint8Array(pkg),
      },
    );
    assert.equal(res.status, 201, await res.clone().text());
    const grisp = (await res.json()) as { id: string; format: string };
    assert.equal(grisp.format, 'grisp');
    await group('var', 'exs-*');
    const d = await server.call<Deployment & { already_running: number }>('POST', url('/deployments'), {
      product: 'default',
      firmware_id: grisp.id,
      groups: ['var'],
    });
    assert.equal(d.already_running, 4);
    assert.equal(d.counts.total, 0);
    assert.equal(d.state, 'running');
    await until(async () => (await show(d.id)).state === 'completed', 'the empty deployment to complete', 15_000);
    assert.equal((await attempts('exs-0')).length, 1, 'nobody was told again');
  });

  test('currentRate: AWS IoT Jobs exponentialRate, capped', () => {
    const exp = (every?: number, max?: number) => ({
      rate: {
        type: 'exponential' as const,
        base: 10,
        factor: 1.5,
        criterion: 'succeeded' as const,
        ...(every ? { every } : {}),
        ...(max ? { max } : {}),
      },
      rate_per_minute: null,
    });
    const at = (succeeded: number, every?: number, max?: number) =>
      currentRate(exp(every, max), { notified: 1000, succeeded });
    // every defaults to base: ×1.5 at 10, 20, 30 succeeded.
    assert.deepEqual(
      [0, 9, 10, 19, 20, 30].map((n) => at(n)),
      [10, 10, 15, 15, 22, 33],
    );
    assert.deepEqual(
      [0, 4, 5, 10].map((n) => at(n, 5)),
      [10, 10, 15, 22],
    );
    assert.equal(at(1_000_000, 1, 100), 100);
    assert.equal(currentRate({ rate: { type: 'constant' }, rate_per_minute: 30 }, { notified: 99, succeeded: 99 }), 30);
    assert.equal(
      currentRate({ rate: { type: 'constant' }, rate_per_minute: null }, { notified: 0, succeeded: 0 }),
      null,
    );
  });

  test('bad pacing values are refused with a 400 that names the field, and nothing is created', async () => {
    await group('bad', 'nobody-*');
    const before = await server.database.db.selectFrom('deployments').select('id').execute();
    const exp = { type: 'exponential', base: 2, factor: 1.5, criterion: 'notified' };
    for (const [body, message] of [
      [{ rate: { ...exp, factor: 0 } }, /rate\/factor must be >= 1\.1/],
      [{ rate: { ...exp, factor: 1 } }, /rate\/factor must be >= 1\.1/],
      [{ rate: { ...exp, factor: 6 } }, /rate\/factor must be <= 5/],
      [{ rate: { ...exp, base: 0 } }, /rate\/base must be >= 1/],
      [{ rate: { ...exp, base: -3 } }, /rate\/base must be >= 1/],
      [{ rate: { ...exp, base: 1.5 } }, /rate\/base must be integer/],
      [{ rate: { ...exp, criterion: 'downloaded' } }, /rate\/criterion must be equal to one of the allowed values/],
      [{ rate: { type: 'exponential', base: 2, factor: 2 } }, /an exponential rate needs criterion/],
      [{ rate: { type: 'constant', base: 2 } }, /a constant rate takes no base/],
      [{ rate: { ...exp, max: 1 } }, /rate\.max is a whole number of devices a minute, at least rate\.base/],
      [{ rate: exp, rate_per_minute: 10 }, /with an exponential rate use rate\.max/],
      [{ retries: -1 }, /retries must be >= 0/],
      [{ retries: 11 }, /retries must be <= 10/],
      [{ retries: 1, retry_backoff_s: -5 }, /retry_backoff_s must be >= 0/],
      [{ retries: 2, penalty: { failures: 0, window_s: 60, hold_s: 60 } }, /penalty\/failures must be >= 1/],
      [{ retries: 2, penalty: { failures: 2, window_s: 0, hold_s: 60 } }, /penalty\/window_s must be >= 1/],
      [{ retries: 2, penalty: { failures: 2, window_s: 60 } }, /must have required property 'hold_s'/],
      [
        { retries: 1, penalty: { failures: 2, window_s: 60, hold_s: 60 } },
        /penalty\.failures \(2\) must be at most retries \(1\)/,
      ],
      [{ penalty: { failures: 1, window_s: 60, hold_s: 60 } }, /must be at most retries \(0\)/],
    ] as const) {
      const res = await fetch(`${server.apiUrl}${url('/deployments')}`, {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
        body: JSON.stringify({ product: 'default', version: '2.0.0', groups: ['bad'], ...body }),
      });
      const text = await res.text();
      assert.equal(res.status, 400, `${JSON.stringify(body)}: ${text}`);
      const err = JSON.parse(text) as {
        error: { code: string; message: string; details?: { issues?: Array<{ path: string; message: string }> } };
      };
      assert.equal(err.error.code, 'invalid');
      const said = [err.error.message, ...(err.error.details?.issues ?? []).map((i) => `${i.path} ${i.message}`)].join(
        '\n',
      );
      assert.match(said, message, `${JSON.stringify(body)}: ${said}`);
    }
    assert.deepEqual(await server.database.db.selectFrom('deployments').select('id').execute(), before);
  });
});
