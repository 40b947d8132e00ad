import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { DeviceClient } from '../../device-client/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { parseMetrics } from '../helpers/prometheus.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';
import { startDevices, matchGroup, type Release, uploadRelease } from './deployment-harness.ts';

interface Deployment {
  id: string;
  kind: string;
  name: string | null;
  state: string;
  group_ids: string[];
  counts: Record<string, number>;
  stages: Array<Record<string, unknown> & { size: number; success: unknown; error: unknown }>;
  retries: number;
  max_concurrent: number | null;
  rate_per_minute: number | null;
}
interface Row {
  identifier: string;
  state: string;
  tries: number;
  told_at: string | null;
  attempt_id: string | null;
  failure_reason: string | null;
  position: number;
}
interface TargetChange {
  deployment_id: string | null;
  already_running: number;
  attempts: { sent: number; queued: number };
  delivery: string;
}

const METRICS_TOKEN = 'target-deployment-metrics-token';

describe(`a plain group target set is a one-stage deployment (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let base: Release;
  const clients: DeviceClient[] = [];

  before(async () => {
    server = await startTestServer({ metricsToken: METRICS_TOKEN });
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-target-deploy-'));
    base = await uploadRelease(server, '1.0.0', 1);
    await uploadRelease(server, '2.0.0', 2);
    await uploadRelease(server, '3.0.0', 3);
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.stop()));
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  const org = () => `/api/v1/orgs/${server.orgId}`;
  /** A raw request as the admin, for answers that are not 2xx. */
  const request = (method: string, url: string, body?: unknown) =>
    server.fetch(`${server.apiUrl}${url}`, {
      method,
      headers: {
        authorization: `Bearer ${server.adminToken}`,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
  const show = (id: string) => server.call<Deployment>('GET', `${org()}/deployments/${id}`);
  const setTarget = (group: string, version: string) =>
    server.call<TargetChange>('PUT', `${org()}/groups/${group}/target`, { version });
  async function rows(id: string): Promise<Row[]> {
    const page = await server.call<{ items: Row[]; total: number }>(
      'GET',
      `${org()}/deployments/${id}/devices?limit=1000`,
    );
    return page.items;
  }
  const names = (prefix: string, n: number) => Array.from({ length: n }, (_, i) => `${prefix}${i}`);
  /** Real devices running 1.0.0, then the clients of `offline` stopped (they stay enrolled, offline). */
  async function fleet(prefix: string, online: number, offline: number, faults?: (i: number) => boolean) {
    const all = names(prefix, online + offline);
    const mine: DeviceClient[] = [];
    await startDevices(server, {
      names: all,
      base,
      stateDir: tmp,
      clients: mine,
      ...(faults ? { faults: (i: number) => (faults(i) ? { rejectInstall: true } : undefined) } : {}),
    });
    clients.push(...mine);
    const stopped = all.slice(online);
    await Promise.all(mine.slice(online).map((c) => c.stop()));
    await until(
      async () =>
        (
          await server.database.db
            .selectFrom('devices')
            .select('id')
            .where('identifier', 'in', stopped.length ? stopped : ['-'])
            .where('connection_status', '=', 'offline')
            .execute()
        ).length === stopped.length,
      `${stopped.length} devices offline`,
      30_000,
    );
    return { all, offline: stopped };
  }

  async function steps(): Promise<number> {
    const res = await fetch(`${server.apiUrl}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } });
    return parseMetrics(await res.text()).find((s) => s.name === 'fleethub_deployment_steps_total')?.value ?? 0;
  }

  // Run first: no phased deployment is running, so nothing else keeps the orchestrator busy.
  test('a target deployment waiting for an offline device is not stepped every second', async () => {
    await fleet('tdidle', 1, 1);
    const group = await matchGroup(server, 'tdidle', 'tdidle*');
    const change = await setTarget(group, '2.0.0');
    await until(
      async () => {
        const d = await show(change.deployment_id!);
        return d.counts.succeeded === 1 && d.counts.in_flight === 1;
      },
      'the online device to succeed (nudged, not ticked)',
      30_000,
    );
    const before = await steps();
    await new Promise((r) => setTimeout(r, 4_000));
    const stepped = (await steps()) - before;
    // A 1 s tick would have stepped it about 4 times; the idle tick (every lease, 15 s) at most once.
    assert.ok(stepped <= 1, `stepped ${stepped} times in 4 s while it waited for an offline device`);
    assert.equal((await show(change.deployment_id!)).state, 'running');
  });

  test('N online + M offline: one running deployment of N+M, counts move as devices succeed, then completed', async () => {
    const { offline } = await fleet('tdon', 3, 2);
    const group = await matchGroup(server, 'tdon', 'tdon*');
    const change = await setTarget(group, '2.0.0');
    assert.ok(change.deployment_id, 'the answer names the deployment');
    assert.equal(change.already_running, 0);
    assert.deepEqual(change.attempts, { sent: 3, queued: 2 });
    assert.equal(change.delivery, 'group', 'the telling stays one group broadcast');

    const d = await show(change.deployment_id);
    assert.equal(d.kind, 'target');
    assert.equal(d.name, 'target tdon');
    assert.deepEqual(d.group_ids, [group]);
    assert.equal(d.retries, 0);
    assert.equal(d.max_concurrent, null);
    assert.equal(d.rate_per_minute, null);
    assert.equal(d.stages.length, 1);
    assert.equal(d.stages[0]!.size, 5);
    assert.deepEqual(d.stages[0]!.success, { count: 0 });
    assert.equal(d.stages[0]!.error, null);
    const told = await rows(d.id);
    assert.deepEqual(
      told.map((r) => [r.identifier, r.state, r.tries, r.position]),
      names('tdon', 5).map((n, i) => [n, 'in_flight', 1, i + 1]),
    );
    assert.ok(told.every((r) => r.attempt_id && r.told_at));

    // The online three install and reboot: they count as succeeded; the offline two stay in flight.
    const partial = await until(
      async () => {
        const x = await show(d.id);
        return x.counts.succeeded === 3 && x;
      },
      'the three online devices to succeed in the target deployment',
      60_000,
    );
    assert.equal(partial.state, 'running');
    assert.equal(partial.counts.in_flight, 2);
    assert.equal(partial.counts.total, 5);

    // The offline ones connect later, update and succeed: completed.
    await startDevices(server, { names: offline, base, stateDir: tmp, clients });
    const done = await until(
      async () => {
        const x = await show(d.id);
        return x.state === 'completed' && x;
      },
      'the target deployment to complete',
      60_000,
    );
    assert.equal(done.counts.succeeded, 5);
    assert.equal(done.counts.failed, 0);
    const audit = await server.database.db
      .selectFrom('audit_log')
      .select('action')
      .where('resource_id', '=', d.id)
      .orderBy('id')
      .execute();
    assert.deepEqual(
      audit.map((a) => a.action),
      ['deployment.created', 'deployment.completed'],
    );
  });

  test('retarget: the same release carries rows over, another supersedes and cancels, clear supersedes', async () => {
    await fleet('tdre', 0, 3);
    const group = await matchGroup(server, 'tdre', 'tdre*');
    const first = await setTarget(group, '2.0.0');
    const a = first.deployment_id!;
    const aRows = await rows(a);
    assert.equal(aRows.length, 3);

    // Same release again: the queued attempts stay; the rows move to the new deployment, not doubled.
    const again = await setTarget(group, '2.0.0');
    const b = again.deployment_id!;
    assert.notEqual(b, a);
    assert.equal((await show(a)).state, 'superseded');
    assert.equal((await show(a)).counts.total, 0, 'moved, not doubled');
    const bRows = await rows(b);
    assert.deepEqual(
      bRows.map((r) => [r.identifier, r.state, r.attempt_id, r.tries, r.told_at]),
      aRows.map((r) => [r.identifier, 'in_flight', r.attempt_id, 1, r.told_at]),
    );
    const inFlight = await server.database.db
      .selectFrom('deployment_devices')
      .innerJoin('devices', 'devices.id', 'deployment_devices.device_id')
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .where('devices.identifier', 'like', 'tdre%')
      .where('deployment_devices.state', '=', 'in_flight')
      .executeTakeFirstOrThrow();
    assert.equal(Number(inFlight.n), 3, 'each device in flight in one deployment');

    // Another release: the old one is superseded, its rows cancelled; a new one holds the devices.
    const other = await setTarget(group, '3.0.0');
    const c = other.deployment_id!;
    const bAfter = await show(b);
    assert.equal(bAfter.state, 'superseded');
    assert.equal(bAfter.counts.cancelled, 3);
    assert.ok((await rows(b)).every((r) => r.state === 'cancelled' && /^superseded/.test(r.failure_reason ?? '')));
    const cRows = await rows(c);
    assert.equal(cRows.length, 3);
    assert.ok(cRows.every((r) => r.state === 'in_flight' && !bRows.some((x) => x.attempt_id === r.attempt_id)));
    const superseded = await server.database.db
      .selectFrom('audit_log')
      .select(['action', 'details'])
      .where('resource_id', '=', b)
      .where('action', '=', 'deployment.superseded')
      .executeTakeFirstOrThrow();
    assert.equal((superseded.details as { by: string }).by, c);

    // Clear: superseded, its devices cancelled; no new deployment; a cleared target does not resolve.
    await server.call('DELETE', `${org()}/groups/${group}/target`);
    const cAfter = await show(c);
    assert.equal(cAfter.state, 'superseded');
    assert.equal(cAfter.counts.cancelled, 3);
    const open = await server.database.db
      .selectFrom('update_attempts')
      .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
      .select('update_attempts.id')
      .where('devices.identifier', 'like', 'tdre%')
      .where('update_attempts.state', 'in', ['queued', 'sent', 'begun', 'downloading', 'finished'])
      .execute();
    assert.equal(open.length, 0, 'the cleared target leaves no open attempt');
    const status = await server.call<{ target_deployment: unknown }>('GET', `${org()}/status?group=${group}`);
    assert.equal(status.target_deployment, null);
  });

  test('a phased deployment over the devices of an active target deployment is allowed; they sync from their attempts', async () => {
    await fleet('tdph', 0, 2);
    const group = await matchGroup(server, 'tdph', 'tdph*');
    const target = (await setTarget(group, '2.0.0')).deployment_id!;
    const phased = await server.call<Deployment>('POST', `${org()}/deployments`, {
      product: 'default',
      version: '3.0.0',
      groups: [group],
      start: false,
    });
    assert.equal(phased.kind, 'phased');
    assert.equal(phased.counts.total, 2);
    assert.equal((await show(target)).state, 'running');
    const listed = await server.call<{ items: Deployment[] }>('GET', `${org()}/deployments?kind=target&limit=1000`);
    assert.ok(listed.items.some((x) => x.id === target));
    assert.ok(listed.items.every((x) => x.kind === 'target'));
    const phasedOnly = await server.call<{ items: Deployment[] }>('GET', `${org()}/deployments?kind=phased`);
    assert.ok(phasedOnly.items.some((x) => x.id === phased.id));
    assert.ok(phasedOnly.items.every((x) => x.kind === 'phased'));
    const bad = await request('GET', `${org()}/deployments?kind=bogus`);
    assert.equal(bad.status, 400);

    const status = await server.call<{ target_deployment: { id: string; state: string; counts: { total: number } } }>(
      'GET',
      `${org()}/status?group=${group}`,
    );
    assert.equal(status.target_deployment.id, target);
    assert.equal(status.target_deployment.counts.total, 2);
  });

  test('pause, resume, approve and abort on a target deployment: 409 with the reason, nothing changes', async () => {
    await fleet('tdpa', 0, 1);
    const group = await matchGroup(server, 'tdpa', 'tdpa*');
    const id = (await setTarget(group, '2.0.0')).deployment_id!;
    for (const action of ['pause', 'resume', 'approve', 'abort']) {
      const res = await request('POST', `${org()}/deployments/${id}/${action}`, {});
      assert.equal(res.status, 409, action);
      const body = (await res.json()) as { error: { code: string; message: string } };
      assert.equal(body.error.code, 'conflict');
      assert.match(body.error.message, /a plain target is not paced: set another target or clear it/);
    }
    const d = await show(id);
    assert.equal(d.state, 'running');
    assert.equal(d.counts.in_flight, 1);
  });

  test('a failing device is failed in the target deployment, and nothing pauses: it completes', async () => {
    await fleet('tdfa', 3, 0, (i) => i === 1);
    const group = await matchGroup(server, 'tdfa', 'tdfa*');
    const id = (await setTarget(group, '2.0.0')).deployment_id!;
    const done = await until(
      async () => {
        const d = await show(id);
        return d.state !== 'running' && d;
      },
      'the target deployment to end',
      60_000,
    );
    assert.equal(done.state, 'completed');
    assert.equal(done.counts.succeeded, 2);
    assert.equal(done.counts.failed, 1);
    const failed = (await rows(id)).filter((r) => r.state === 'failed');
    assert.deepEqual(
      failed.map((r) => r.identifier),
      ['tdfa1'],
    );
  });

  test('a group with nobody to update: the deployment is completed at once, the members running it counted', async () => {
    const empty = await matchGroup(server, 'tdempty', 'nobody-matches*');
    const none = await setTarget(empty, '2.0.0');
    const d = await show(none.deployment_id!);
    assert.equal(d.state, 'completed');
    assert.equal(d.counts.total, 0);
    // Every member of tdon already runs 2.0.0 (the first test): none to tell, all already running.
    const running = await matchGroup(server, 'tdon-again', 'tdon*');
    const again = await setTarget(running, '2.0.0');
    assert.equal(again.already_running, 5);
    assert.equal((await show(again.deployment_id!)).state, 'completed');
  });
});
