import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { KyselyPlugin } from 'kysely';
import { createTestDatabase, DATABASE_KIND } from '../helpers/db.ts';
import type { DatabaseHandle } from '../../server/db/index.ts';
import * as fleet from '../../server/fleet/index.ts';
import { devices, firmware, OPERATOR, recordingContext, ref, tenant, uniq } from './fixtures.ts';

let handle: DatabaseHandle;
let setupCtx: ReturnType<typeof recordingContext>;

before(async () => {
  handle = await createTestDatabase();
  setupCtx = recordingContext(handle.db);
});
after(async () => {
  await handle.close();
});

const code = (c: string) => (e: unknown) => e instanceof fleet.FleetError && e.code === c;

/** `n` devices of one group, each with an update to 2.0.0 `sent`; the first `begun` of them have reported begin. */
async function fleetUpdating(n: number, begun = n) {
  const t = await tenant(setupCtx);
  const [v1, v2] = [await firmware(setupCtx, t, '1.0.0'), await firmware(setupCtx, t, '2.0.0')];
  const ds = await devices(setupCtx, t, n);
  const g = await fleet.createGroup(setupCtx, OPERATOR, {
    orgId: t.org.id,
    productId: t.product.id,
    name: uniq('grp'),
  });
  await fleet.addDevicesToGroup(
    setupCtx,
    OPERATOR,
    t.org.id,
    g.id,
    ds.map((d) => d.id),
  );
  await fleet.setGroupTarget(setupCtx, OPERATOR, t.org.id, g.id, v2.id);
  for (const d of ds) await fleet.deviceJoined(setupCtx, ref(d), v1.id);
  for (const d of ds.slice(0, begun))
    await fleet.applyUpdateReport(setupCtx, dev(d), 'firmware_update_begin', { version: '2.0.0' });
  return { t, devices: ds };
}

function dev(d: fleet.Device): fleet.DeviceRef {
  return { deviceId: d.id, orgId: d.org_id };
}

function progress(percent: number) {
  return { version: '2.0.0', percent, bytes: percent * 10, total: 1000 };
}

async function attemptOf(deviceId: string) {
  return handle.db
    .selectFrom('update_attempts')
    .selectAll()
    .where('device_id', '=', deviceId)
    .orderBy('created_at', 'desc')
    .executeTakeFirstOrThrow();
}

describe(`progress report ingest (${DATABASE_KIND})`, () => {
  test('many concurrent progress reports from many devices are all persisted, in far fewer statements than reports', async () => {
    const { devices: ds } = await fleetUpdating(60);
    const ctx = recordingContext(handle.db);
    const answers = await Promise.all(
      ds.map((d, i) => fleet.applyUpdateReport(ctx, dev(d), 'firmware_update_progress', progress(i % 101))),
    );
    for (const [i, d] of ds.entries()) {
      const persisted = await attemptOf(d.id);
      assert.deepEqual(
        [persisted.state, persisted.percent, persisted.bytes, persisted.total],
        ['downloading', i % 101, (i % 101) * 10, 1000],
      );
      assert.equal(answers[i]!.id, persisted.id, 'each caller gets its own attempt');
      assert.deepEqual([answers[i]!.state, answers[i]!.percent], [persisted.state, persisted.percent]);
    }
    const stats = fleet.progressIngestStats(ctx);
    assert.equal(stats.reports, 60);
    assert.equal(stats.batches, 1, 'reports submitted together share one statement');
    assert.equal(stats.fallbacks, 0);
  });

  test('reports from separate callbacks of one event-loop turn share one statement', async () => {
    // As frames from many sockets are read: one I/O callback each. On PGlite the statement runs
    // on this thread, so a batch started within the first callback's tick would hold one report.
    const { devices: ds } = await fleetUpdating(20);
    const ctx = recordingContext(handle.db);
    const answers = await Promise.all(
      ds.map(
        (d, i) =>
          new Promise<fleet.UpdateAttempt>((resolve, reject) =>
            setImmediate(() =>
              fleet.applyUpdateReport(ctx, dev(d), 'firmware_update_progress', progress(i)).then(resolve, reject),
            ),
          ),
      ),
    );
    assert.deepEqual(
      answers.map((a) => a.percent),
      ds.map((_, i) => i),
    );
    for (const [i, d] of ds.entries()) assert.equal((await attemptOf(d.id)).percent, i);
    assert.deepEqual(fleet.progressIngestStats(ctx), { reports: 20, batches: 1, applied: 20, fallbacks: 0, failed: 0 });
  });

  test('a lone report starts a batch in the same turn of the event loop, and reports arriving while it is written share the next one', async () => {
    const { devices: ds } = await fleetUpdating(20);
    const ctx = recordingContext(handle.db);
    const first = fleet.applyUpdateReport(ctx, dev(ds[0]!), 'firmware_update_progress', progress(5));
    await new Promise((resolve) => setImmediate(resolve)); // the first batch has started
    const rest = ds.slice(1).map((d) => fleet.applyUpdateReport(ctx, dev(d), 'firmware_update_progress', progress(7)));
    assert.equal((await first).percent, 5);
    assert.deepEqual(new Set((await Promise.all(rest)).map((a) => a.percent)), new Set([7]));
    assert.equal(fleet.progressIngestStats(ctx).batches, 2);
  });

  test('several reports for one attempt in a batch persist the latest and every caller gets the persisted attempt', async () => {
    const {
      devices: [d],
    } = await fleetUpdating(1);
    const ctx = recordingContext(handle.db);
    const answers = await Promise.all(
      [10, 20, 30].map((p) => fleet.applyUpdateReport(ctx, dev(d!), 'firmware_update_progress', progress(p))),
    );
    assert.deepEqual(
      answers.map((a) => [a.state, a.percent]),
      [
        ['downloading', 30],
        ['downloading', 30],
        ['downloading', 30],
      ],
    );
    assert.equal((await attemptOf(d!.id)).percent, 30);
    assert.equal(fleet.progressIngestStats(ctx).batches, 1);
  });

  test('operators get one update_transition per persisted attempt, published after the commit', async () => {
    const { t, devices: ds } = await fleetUpdating(3);
    const ctx = recordingContext(handle.db);
    await Promise.all(ds.map((d) => fleet.applyUpdateReport(ctx, dev(d), 'firmware_update_progress', progress(50))));
    const transitions = ctx.events.filter((e) => e.topic === `operator:${t.org.id}` && e.event === 'update_transition');
    assert.deepEqual(new Set(transitions.map((e) => e.payload.device_id)), new Set(ds.map((d) => d.id)));
    assert.ok(transitions.every((e) => e.payload.state === 'downloading' && e.payload.percent === 50));
    const audit = await fleet.listAuditLog(ctx, { orgId: t.org.id, resourceType: 'update_attempt' });
    assert.ok(!audit.items.some((r) => r.action === 'update.downloading'), 'progress is not audited');
  });

  test('a progress report for a version with no update in flight rejects with not_found, and the rest of its batch is persisted', async () => {
    const {
      devices: [a, b],
    } = await fleetUpdating(2);
    const ctx = recordingContext(handle.db);
    const [unknown, good] = await Promise.allSettled([
      fleet.applyUpdateReport(ctx, dev(a!), 'firmware_update_progress', { ...progress(10), version: '7.0.0' }),
      fleet.applyUpdateReport(ctx, dev(b!), 'firmware_update_progress', progress(10)),
    ]);
    assert.equal(unknown.status, 'rejected');
    assert.ok(code('not_found')((unknown as PromiseRejectedResult).reason));
    assert.equal(good.status === 'fulfilled' && good.value.state, 'downloading');
    assert.equal((await attemptOf(a!.id)).state, 'begun');
  });

  test('progress before begin, or after finish, rejects with conflict and changes nothing', async () => {
    const {
      devices: [finished, good, notBegun],
    } = await fleetUpdating(3, 2);
    await fleet.applyUpdateReport(setupCtx, dev(finished!), 'firmware_update_finish', { version: '2.0.0' });
    const ctx = recordingContext(handle.db);
    const results = await Promise.allSettled(
      [notBegun!, finished!, good!].map((d) =>
        fleet.applyUpdateReport(ctx, dev(d), 'firmware_update_progress', progress(40)),
      ),
    );
    assert.ok(code('conflict')((results[0] as PromiseRejectedResult).reason), 'before begin');
    assert.ok(code('conflict')((results[1] as PromiseRejectedResult).reason), 'after finish');
    assert.equal(results[2]!.status, 'fulfilled');
    assert.deepEqual([(await attemptOf(notBegun!.id)).state, (await attemptOf(notBegun!.id)).percent], ['sent', null]);
    assert.deepEqual(
      [(await attemptOf(finished!.id)).state, (await attemptOf(finished!.id)).percent],
      ['finished', 100],
    );
    assert.equal(fleet.progressIngestStats(ctx).fallbacks, 2, 'only the rejected reports took the single-report path');
  });

  test('invalid progress payloads are rejected before any batch', async () => {
    const {
      devices: [d],
    } = await fleetUpdating(1);
    const ctx = recordingContext(handle.db);
    await assert.rejects(
      fleet.applyUpdateReport(ctx, dev(d!), 'firmware_update_progress', {
        version: '2.0.0',
        percent: 101,
        bytes: 1,
        total: 2,
      }),
      code('invalid'),
    );
    assert.equal(fleet.progressIngestStats(ctx).batches, 0);
  });

  test('a batch statement that fails rejects every caller in it', async () => {
    const { devices: ds } = await fleetUpdating(3);
    const unavailable: KyselyPlugin = {
      transformQuery(args) {
        if (args.node.kind === 'RawNode') throw new Error('database unavailable');
        return args.node;
      },
      async transformResult(args) {
        return args.result;
      },
    };
    const ctx = { ...recordingContext(handle.db), db: handle.db.withPlugin(unavailable) };
    const results = await Promise.allSettled(
      ds.map((d) => fleet.applyUpdateReport(ctx, dev(d), 'firmware_update_progress', progress(60))),
    );
    assert.deepEqual(
      results.map((r) => r.status === 'rejected' && (r.reason as Error).message),
      ['database unavailable', 'database unavailable', 'database unavailable'],
    );
    assert.deepEqual(fleet.progressIngestStats(ctx), { reports: 3, batches: 1, applied: 0, fallbacks: 0, failed: 1 });
    for (const d of ds) assert.equal((await attemptOf(d.id)).state, 'begun');
    assert.deepEqual(ctx.events, []);
  });
});
