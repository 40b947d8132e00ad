/**
 * The device link against a real database, driven by random event sequences from every protocol
 * (fast-check): every write is a move of the one transition table (or a begin and a move, on a
 * resumed download or a protocol without a begin message), an acknowledged report is
 * persisted as acknowledged, a refused event changes nothing, final states stay final, and each
 * device has at most one open attempt per component, with the operators' counts matching.
 */
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import type { DatabaseHandle } from '../../server/db/index.ts';
import type { DeviceProtocol, UpdateState } from '../../server/db/schema.ts';
import * as fleet from '../../server/fleet/index.ts';
import { findOrRegisterEdgeDevice } from '../../server/fleet/edge-devices.ts';
import { createTestDatabase, DATABASE_KIND } from '../helpers/db.ts';
import { devices, firmware, OPERATOR, recordingContext, tenant } from './fixtures.ts';

let handle: DatabaseHandle;
let ctx: ReturnType<typeof recordingContext>;

before(async () => {
  handle = await createTestDatabase();
  ctx = recordingContext(handle.db);
});
after(async () => {
  await handle.close();
});

const PROTOCOLS: readonly DeviceProtocol[] = ['phoenix', 'grisp', 'wifidogx', 'main-server', 'keyauth'];
const VERSIONS = ['1.0.0', '2.0.0', '3.0.0'] as const;
/** A version the catalogue does not hold (a device running something of its own). */
const UNKNOWN = '9.9.9';
const KINDS: readonly fleet.ReportKind[] = ['begun', 'progress', 'finished', 'error', 'declined', 'rolled_back'];

const device = fc.integer({ min: 0, max: PROTOCOLS.length - 1 });
const version = fc.integer({ min: 0, max: VERSIONS.length });
const step = fc.oneof(
  fc.record({ t: fc.constant('connected' as const), d: device, v: version, settle: fc.boolean() }),
  fc.record({ t: fc.constant('retarget' as const), d: device, f: fc.integer({ min: -1, max: VERSIONS.length - 1 }) }),
  fc.record({ t: fc.constant('update_sent' as const), d: device, f: fc.integer({ min: 0, max: VERSIONS.length - 1 }) }),
  fc.record({
    t: fc.constant('report' as const),
    d: device,
    kind: fc.constantFrom(...KINDS),
    v: version,
    begins: fc.boolean(),
    percent: fc.option(fc.integer({ min: 0, max: 100 }), { nil: undefined }),
  }),
  fc.record({ t: fc.constant('boot_confirmed' as const), d: device, v: version }),
  fc.record({ t: fc.constant('timed_out' as const), d: device }),
  fc.record({ t: fc.constant('closed' as const), d: device }),
  fc.record({ t: fc.constant('sweep' as const) }),
);
type Step = typeof step extends fc.Arbitrary<infer S> ? S : never;

const SUPERSEDED_UNSETTLED: Step[] = [
  { t: 'retarget', d: 1, f: 1 },
  { t: 'connected', d: 1, v: 1, settle: false },
  { t: 'retarget', d: 1, f: 0 },
];

interface World {
  orgId: string;
  /** The raw record of each version (targets name it; Phoenix devices join with its uuid). */
  firmware: fleet.Firmware[];
  /** Each version's variant per protocol: raw, a GRiSP package, a Main Server ZIP. */
  variants: Record<DeviceProtocol, fleet.Firmware[]>;
  sessions: fleet.LinkSession[];
}

/** The package format each protocol of the world installs. */
const FORMAT_OF: Record<DeviceProtocol, string> = {
  phoenix: 'raw',
  grisp: 'grisp',
  wifidogx: 'raw',
  'main-server': 'main-server-zip',
  keyauth: 'raw',
};

/**
 * A tenant with the three versions catalogued (a release each, with a variant per format) and one
 * approved device per protocol; the Main Server device runs the `firmware` extension.
 */
async function world(): Promise<World> {
  const t = await tenant(ctx);
  const byFormat: Record<string, fleet.Firmware[]> = { raw: [], grisp: [], 'main-server-zip': [] };
  for (const v of VERSIONS)
    for (const format of Object.keys(byFormat))
      byFormat[format]!.push(
        await firmware(
          ctx,
          t,
          v,
          format === 'raw' ? {} : { format, sha256: createHash('sha256').update(`${v} ${format}`).digest('hex') },
        ),
      );
  const fw = byFormat.raw!;
  const variants = Object.fromEntries(PROTOCOLS.map((p) => [p, byFormat[FORMAT_OF[p]]!])) as World['variants'];
  const [phoenix] = await devices(ctx, t, 1);
  const sessions: fleet.LinkSession[] = [
    fleet.openLink({ deviceId: phoenix!.id, orgId: t.org.id, productId: t.product.id, protocol: 'phoenix' }),
  ];
  for (const protocol of PROTOCOLS.slice(1)) {
    const { device: d } = await findOrRegisterEdgeDevice(ctx, {
      orgId: t.org.id,
      productId: t.product.id,
      identifier: `${protocol}-${randomUUID().slice(0, 8)}`,
      protocol,
      approval: 'approved',
    });
    sessions.push(fleet.openLink({ deviceId: d.id, orgId: t.org.id, productId: t.product.id, protocol }));
    // A Pi registers with its extensions: this one runs `firmware` (version not reported yet).
    if (protocol === 'main-server')
      await handle.db.insertInto('device_components').values({ device_id: d.id, component: 'firmware' }).execute();
  }
  return { orgId: t.org.id, firmware: fw, variants, sessions };
}

type Snapshot = Map<string, { state: UpdateState; device_id: string; component: string }>;

async function snapshot(w: World): Promise<Snapshot> {
  const rows = await handle.db
    .selectFrom('update_attempts')
    .select(['id', 'state', 'device_id', 'component'])
    .where('org_id', '=', w.orgId)
    .execute();
  return new Map(rows.map((r) => [r.id, r]));
}

/** Runs one step; returns the link's result when the step was a link event. */
async function run(w: World, s: Step): Promise<fleet.LinkResult | undefined> {
  if (s.t === 'sweep') {
    await fleet.sweepStaleUpdates(ctx, { now: new Date(Date.now() + 3_600_000) });
    return undefined;
  }
  const session = w.sessions[s.d]!;
  const versionOf = (i: number) => VERSIONS[i] ?? UNKNOWN;
  if (s.t === 'retarget') {
    if (s.f < 0)
      await fleet.clearDeviceTarget(ctx, OPERATOR, w.orgId, session.deviceId).catch((err: unknown) => {
        if (!(err instanceof fleet.FleetError && err.code === 'not_found')) throw err;
      });
    else await fleet.setDeviceTarget(ctx, OPERATOR, w.orgId, session.deviceId, w.firmware[s.f]!.id);
    return undefined;
  }
  let event: fleet.LinkEvent;
  switch (s.t) {
    case 'connected': {
      const catalogued = w.firmware[s.v];
      event =
        session.protocol === 'phoenix'
          ? {
              type: 'connected',
              running: catalogued
                ? { firmwareUuid: catalogued.id }
                : { firmwareUuid: randomUUID(), params: { version: UNKNOWN } },
            }
          : { type: 'connected', running: { version: versionOf(s.v), settle: s.settle } };
      break;
    }
    case 'update_sent':
      event = {
        type: 'update_sent',
        firmware: w.variants[session.protocol][s.f]!,
        via: `edge:${session.protocol}`,
        poll: s.f === 1,
      };
      break;
    case 'report':
      event = {
        type: 'report',
        kind: s.kind,
        version: versionOf(s.v),
        begins: s.begins,
        ...(s.percent !== undefined ? { percent: s.percent, bytes: 0, total: 0 } : {}),
        ...(s.kind === 'error' || s.kind === 'declined' ? { errors: ['the device said no'] } : {}),
      };
      break;
    case 'boot_confirmed':
      event = { type: 'boot_confirmed', version: versionOf(s.v) };
      break;
    case 'timed_out':
      event = { type: 'timed_out', reason: 'the protocol gave up waiting' };
      break;
    case 'closed':
      event = { type: 'closed', reason: 'socket closed' };
      break;
  }
  const result = await fleet.linkEvent(ctx, session, event);
  w.sessions[s.d] = result.session;
  return result;
}

async function check(w: World, s: Step, before: Snapshot, result: fleet.LinkResult | undefined): Promise<void> {
  const after = await snapshot(w);
  const what = JSON.stringify(s);
  for (const [id, was] of before) {
    const now = after.get(id);
    assert.ok(now, `${what}: attempt ${id} vanished`);
    if (now.state !== was.state)
      assert.ok(
        fleet.isAllowedEventMove(was.state, now.state),
        `${what}: ${was.state} → ${now.state} is not in the table`,
      );
  }
  for (const [id, a] of after) {
    if (!before.has(id)) assert.ok(['queued', 'sent'].includes(a.state), `${what}: new attempt ${id} is ${a.state}`);
  }
  const open = new Map<string, number>();
  for (const a of after.values()) {
    if (!(fleet.OPEN_STATES as readonly string[]).includes(a.state)) continue;
    const key = `${a.device_id}/${a.component}`;
    open.set(key, (open.get(key) ?? 0) + 1);
  }
  for (const [key, n] of open) assert.ok(n <= 1, `${what}: ${n} open attempts for ${key}`);
  if (result && !result.ok)
    assert.deepEqual(after, before, `${what}: refused (${result.refusal.code}) but attempts changed`);
  if (result?.ok && result.attempt && (s.t === 'report' || s.t === 'update_sent' || s.t === 'timed_out'))
    assert.equal(
      after.get(result.attempt.id)?.state,
      result.attempt.state,
      `${what}: acknowledged state not persisted`,
    );
  const counts = await fleet.countUpdateStates(ctx, { orgId: w.orgId });
  for (const state of fleet.UPDATE_STATES)
    assert.equal(
      counts[state],
      [...after.values()].filter((a) => a.state === state).length,
      `${what}: count of ${state}`,
    );
}

describe(`device link (${DATABASE_KIND})`, () => {
  test('random event sequences from every protocol keep to the transition table', async () => {
    let accepted = 0;
    let refused = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(step, { minLength: 1, maxLength: 30 }), async (steps) => {
        const w = await world();
        for (const s of steps) {
          const before = await snapshot(w);
          const result = await run(w, s);
          if (result?.ok) accepted++;
          else if (result) refused++;
          await check(w, s, before, result);
        }
      }),
      {
        numRuns: Number(process.env.LINK_PROPERTY_RUNS ?? 25),
        // Found by this property: a retarget while the device already runs the pending firmware
        // (not yet settled) left two open attempts.
        examples: [[SUPERSEDED_UNSETTLED]],
      },
    );
    // Both sides of the table were exercised.
    assert.ok(accepted > 0 && refused > 0, `accepted ${accepted}, refused ${refused}`);
  });

  test('a move the table does not hold is refused with a typed result and changes nothing', async () => {
    const w = await world();
    const grisp = w.sessions[1]!;
    await fleet.setDeviceTarget(ctx, OPERATOR, w.orgId, grisp.deviceId, w.firmware[1]!.id);
    const online = await fleet.linkEvent(ctx, grisp, { type: 'connected', running: { version: '1.0.0' } });
    assert.ok(online.ok);
    assert.equal(online.effects[0]?.type, 'push_update');
    // finished before begun: not in the table.
    const before = await snapshot(w);
    const early = await fleet.linkEvent(ctx, online.session, { type: 'report', kind: 'finished', version: '2.0.0' });
    assert.equal(early.ok, false);
    assert.equal(!early.ok && early.refusal.code, 'conflict');
    assert.deepEqual(await snapshot(w), before);
    // The same report from a protocol without a begin message begins it first.
    const finished = await fleet.linkEvent(ctx, online.session, {
      type: 'report',
      kind: 'finished',
      version: '2.0.0',
      begins: true,
    });
    assert.ok(finished.ok);
    assert.equal(finished.attempt?.state, 'finished');
    const confirmed = await fleet.linkEvent(ctx, online.session, { type: 'boot_confirmed', version: '2.0.0' });
    assert.ok(confirmed.ok);
    assert.equal(confirmed.attempt?.state, 'succeeded');
    // Final: nothing moves it again.
    const late = await fleet.linkEvent(ctx, online.session, {
      type: 'report',
      kind: 'error',
      version: '2.0.0',
      errors: ['too late'],
    });
    assert.equal(!late.ok && late.refusal.code, 'not_found');
  });

  test('a download resumed after its update was sent again counts as begun; reports on another attempt are refused', async () => {
    const w = await world();
    const phoenix = w.sessions[0]!;
    const [v1, v2, v3] = w.firmware as [fleet.Firmware, fleet.Firmware, fleet.Firmware];
    const link = (event: fleet.LinkEvent) => fleet.linkEvent(ctx, phoenix, event);
    const ok = async (event: fleet.LinkEvent) => {
      const result = await link(event);
      assert.ok(result.ok, `${JSON.stringify(event)}: ${!result.ok && result.refusal.message}`);
      return result;
    };
    /** A report that must be refused with `code` and change nothing. */
    const refusedWith = async (event: fleet.LinkEvent, code: string) => {
      const before = await snapshot(w);
      const result = await link(event);
      assert.equal(!result.ok && result.refusal.code, code, JSON.stringify(event));
      assert.deepEqual(await snapshot(w), before);
      return result.ok ? '' : result.refusal.message;
    };
    const progress = (version: string, percent: number): fleet.LinkEvent => ({
      type: 'report',
      kind: 'progress',
      version,
      percent,
      bytes: percent * 1000,
      total: 100_000,
    });
    const reconnect = () => ok({ type: 'connected', running: { firmwareUuid: v1.id } });

    await fleet.setDeviceTarget(ctx, OPERATOR, w.orgId, phoenix.deviceId, v2.id);
    assert.equal((await reconnect()).effects[0]?.type, 'push_update');
    await ok({ type: 'report', kind: 'begun', version: '2.0.0' });
    assert.equal((await ok(progress('2.0.0', 10))).attempt?.state, 'downloading');
    // The device reconnects mid-download (the server restarted): the update is sent again.
    const resent = await reconnect();
    assert.equal(resent.effects[0]?.type, 'push_update');
    const [sent] = [...(await snapshot(w)).values()];
    assert.equal(sent?.state, 'sent');
    // It resumes without a new begin: the progress begins the attempt again, then moves it.
    const resumed = await ok(progress('2.0.0', 40));
    assert.equal(resumed.attempt?.state, 'downloading');
    assert.equal(resumed.attempt?.percent, 40);
    // So does a finish after another resend; the outcome is decided on the rejoin as always.
    await reconnect();
    assert.equal((await ok({ type: 'report', kind: 'finished', version: '2.0.0' })).attempt?.state, 'finished');
    const joined = await ok({ type: 'connected', running: { firmwareUuid: v2.id } });
    assert.deepEqual(joined.effects, []);
    const attemptId = resumed.attempt!.id;
    const done = await handle.db
      .selectFrom('update_attempts')
      .selectAll()
      .where('id', '=', attemptId)
      .executeTakeFirstOrThrow();
    assert.equal(done.state, 'succeeded');
    const audited = await handle.db
      .selectFrom('audit_log')
      .select(['action', 'details'])
      .where('resource_id', '=', attemptId)
      .orderBy('id')
      .execute();
    assert.deepEqual(
      audited.map((r) => r.action),
      ['update.begun', 'update.begun', 'update.begun', 'update.finished', 'update.succeeded'],
    );
    const reasons = audited.map((r) => (r.details as { reason?: string }).reason);
    assert.match(reasons[1]!, /^resumed: firmware_update_progress/);
    assert.match(reasons[2]!, /^resumed: firmware_update_finish/);

    // Not the device's current attempt: an update to 3.0.0 that never began is refused a progress,
    // saying what is missing; a report for 2.0.0 (done) or an unknown version finds no update.
    await fleet.setDeviceTarget(ctx, OPERATOR, w.orgId, phoenix.deviceId, v3.id);
    await ok({ type: 'connected', running: { firmwareUuid: v2.id } });
    assert.match(
      await refusedWith(progress('3.0.0', 5), 'conflict'),
      /not allowed while the update is sent; report the begin/,
    );
    await refusedWith({ type: 'report', kind: 'finished', version: '3.0.0' }, 'conflict');
    await refusedWith(progress('2.0.0', 50), 'not_found');
    await refusedWith({ type: 'report', kind: 'finished', version: '9.9.9' }, 'not_found');
    // Superseded mid-download: the cancelled attempt's reports find no update either.
    await ok({ type: 'report', kind: 'begun', version: '3.0.0' });
    await ok(progress('3.0.0', 20));
    await fleet.setDeviceTarget(ctx, OPERATOR, w.orgId, phoenix.deviceId, v1.id);
    await ok({ type: 'connected', running: { firmwareUuid: v2.id } });
    await refusedWith(progress('3.0.0', 60), 'not_found');
    await refusedWith({ type: 'report', kind: 'finished', version: '3.0.0' }, 'not_found');
  });

  test("one sweep times out a silent update of every protocol, after the product's timeout or the server's", async () => {
    const w = await world();
    const target = w.firmware[1]!;
    const variant = (p: DeviceProtocol) => w.variants[p][1]!;
    // Each protocol's own way to an update underway.
    const paths: Record<DeviceProtocol, fleet.LinkEvent[]> = {
      phoenix: [{ type: 'report', kind: 'begun', version: target.version }],
      grisp: [
        { type: 'update_sent', firmware: variant('grisp'), via: 'edge:grisp' },
        { type: 'report', kind: 'progress', version: target.version, percent: 10, begins: true },
      ],
      wifidogx: [{ type: 'update_sent', firmware: variant('wifidogx'), via: 'edge:wifidogx' }],
      'main-server': [
        { type: 'update_sent', firmware: variant('main-server'), via: 'edge:main-server', poll: true },
        { type: 'report', kind: 'progress', version: target.version, begins: true },
      ],
      keyauth: [
        { type: 'update_sent', firmware: variant('keyauth'), via: 'edge:keyauth', poll: true },
        { type: 'report', kind: 'progress', version: target.version, percent: 50, begins: true },
      ],
    };
    for (const [i, session] of w.sessions.entries()) {
      await fleet.setDeviceTarget(ctx, OPERATOR, w.orgId, session.deviceId, target.id);
      const running =
        session.protocol === 'phoenix' ? { firmwareUuid: w.firmware[0]!.id } : { version: w.firmware[0]!.version };
      let link = await fleet.linkEvent(ctx, session, { type: 'connected', running });
      assert.ok(link.ok, session.protocol);
      for (const event of paths[session.protocol]) {
        link = await fleet.linkEvent(ctx, link.session, event);
        assert.ok(link.ok, `${session.protocol} ${event.type}: ${!link.ok && link.refusal.message}`);
      }
      w.sessions[i] = link.session;
    }
    const states = async () => {
      const rows = await handle.db
        .selectFrom('update_attempts')
        .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
        .select(['devices.protocol', 'update_attempts.state'])
        .select('update_attempts.firmware_id')
        .where('update_attempts.org_id', '=', w.orgId)
        .where('update_attempts.to_version', '=', target.version)
        .execute();
      // Each device's attempt is for the variant its protocol installs.
      for (const r of rows) assert.equal(r.firmware_id, variant(r.protocol).id, r.protocol);
      return Object.fromEntries(rows.map((r) => [r.protocol, r.state]));
    };
    assert.deepEqual(await states(), {
      phoenix: 'begun',
      grisp: 'downloading',
      wifidogx: 'sent',
      'main-server': 'begun',
      keyauth: 'downloading',
    });
    const minutes = (n: number) => new Date(Date.now() + n * 60_000);
    // The server's default (30 min) has not passed after 5 minutes.
    assert.equal(await fleet.sweepStaleUpdates(ctx, { now: minutes(5) }), 0);
    // The product's own timeout (2 min) has.
    const product = await handle.db
      .selectFrom('devices')
      .select('product_id')
      .where('id', '=', w.sessions[0]!.deviceId)
      .executeTakeFirstOrThrow();
    await fleet.updateProduct(ctx, OPERATOR, w.orgId, product.product_id, { updateTimeoutSeconds: 120 });
    assert.equal(await fleet.sweepStaleUpdates(ctx, { now: minutes(1) }), 0);
    assert.equal(await fleet.sweepStaleUpdates(ctx, { now: minutes(5) }), PROTOCOLS.length);
    assert.deepEqual(await states(), Object.fromEntries(PROTOCOLS.map((p) => [p, 'timed_out'])));
    // Final: a late report is refused, the sweep finds nothing more.
    const late = await fleet.linkEvent(ctx, w.sessions[1]!, {
      type: 'report',
      kind: 'progress',
      version: target.version,
      percent: 90,
    });
    assert.equal(!late.ok && late.refusal.code, 'not_found');
    assert.equal(await fleet.sweepStaleUpdates(ctx, { now: minutes(20) }), 0);
    await assert.rejects(
      fleet.updateProduct(ctx, OPERATOR, w.orgId, product.product_id, { updateTimeoutSeconds: 5 }),
      (e: unknown) => e instanceof fleet.FleetError && e.code === 'invalid',
    );
  });
});
