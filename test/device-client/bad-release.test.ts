/**
 * Rehearsing a bad release (`fleethub-device simulate --bad-version V --bad-mode M --bad-fraction F`)
 * against the real server, for every protocol simulator: told to install V, the devices the
 * fraction picks (by index) misbehave, the others install it, and the server records for each the
 * attempt state its device link decides today: rollback → rolled_back (keyauth, which cannot say
 * so, failed), fail → failed with the device's reason, hang → open until the product's in-flight
 * timeout, then timed_out.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { type BadMode, misbehaves, Simulation } from '../../device-client/simulator.ts';
import { buildGrispPackage } from '../../device-client/simulators/grisp.ts';
import { simulatorImage } from '../../device-client/simulators/wifidogx.ts';
import { uploadFirmwareStream } from '../../server/cli/firmware.ts';
import { sweepStaleUpdates } from '../../server/fleet/index.ts';
import { createZip } from '../../shared/main-server-package.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';
import { imageChunks } from '../firmware/harness.ts';

// Registers every protocol with the simulator.
import '../../device-client/cli.ts';

type Protocol = 'phoenix' | 'grisp' | 'wifidogx' | 'main-server' | 'keyauth';

/** Four devices, half of them bad: indexes 1 and 3 misbehave, 0 and 2 install the release. */
const COUNT = 4;
const FRACTION = 0.5;

let server: TestServer;
let tmp: string;
let runs = 0;

async function post(url: string, body: Uint8Array<ArrayBuffer>, type: string): Promise<{ id: string }> {
  const res = await fetch(`${server.apiUrl}${url}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': type },
    body,
  });
  assert.equal(res.status, 201, await res.clone().text());
  const out = (await res.json()) as { id?: string; package_id?: string };
  return { id: (out.id ?? out.package_id)! };
}

/** Uploads `version` in the form `protocol` installs; returns the firmware id. */
async function upload(protocol: Protocol, version: string): Promise<string> {
  const q = `product=${server.productId}&org=${server.orgId}&version=${version}`;
  switch (protocol) {
    case 'phoenix': {
      const size = 48 * 1024;
      const fw = (await uploadFirmwareStream({
        client: { url: server.apiUrl, token: server.adminToken },
        query: { product: server.productId, version },
        source: Readable.from(imageChunks(size, runs)),
        size,
      })) as { id: string };
      return fw.id;
    }
    case 'grisp': {
      const pkg = await buildGrispPackage({ version, blocks: [randomBytes(4000), randomBytes(3000)] });
      return (await post(`/api/v1/grisp/firmware?${q}`, new Uint8Array(pkg), 'application/octet-stream')).id;
    }
    case 'wifidogx':
      return (await post(`/api/v1/firmware?${q}`, new Uint8Array(simulatorImage(version)), 'application/octet-stream'))
        .id;
    case 'main-server':
    case 'keyauth': {
      const zip = createZip([
        { name: 'device_update.json', data: JSON.stringify({ extension: 'firmware', version }) },
        { name: 'payload.bin', data: `image ${version}` },
      ]);
      return (await post('/api/v1/main-server/packages', new Uint8Array(zip), 'application/zip')).id;
    }
  }
}

function urlOf(protocol: Protocol): string {
  switch (protocol) {
    case 'phoenix':
      return `${server.deviceUrl.replace(/^https/, 'wss')}/socket`;
    case 'grisp':
      return `${server.deviceUrl.replace(/^https/, 'wss')}/grisp-connect/ws`;
    case 'wifidogx':
      return `${server.apiUrl.replace(/^http/, 'ws')}/ws/wifidogx`;
    case 'main-server':
      return server.apiUrl;
    case 'keyauth':
      return `tcp://127.0.0.1:${server.keyauth!.port}`;
  }
}

/** The devices' ids in the simulator's order, once each is registered, approved and online. */
async function admitted(protocol: Protocol, sim: Simulation): Promise<string[]> {
  const serials = sim.tallies.map((t) => t.serial);
  if (protocol === 'main-server') {
    await until(
      async () => {
        const rows = await server.database.db
          .selectFrom('devices')
          .select('identifier')
          .where('identifier', 'in', serials)
          .execute();
        return rows.length === serials.length;
      },
      'the Pis registered',
      30_000,
    );
    for (const serial of serials) await server.call('POST', `/api/v1/main-server/devices/${serial}/approve`);
  }
  let keyauthIds = new Map<string, string>();
  if (protocol === 'keyauth') {
    const pending = await until(
      async () => {
        const { items } = await server.call<{ items: Array<{ fingerprint: string; device_id: string; name: string }> }>(
          'GET',
          '/api/v1/keyauth/clients?approval=pending&limit=1000',
        );
        const ours = items.filter((c) => serials.includes(c.name));
        return ours.length === serials.length ? ours : undefined;
      },
      'the keyauth clients pending',
      30_000,
    );
    for (const c of pending) await server.call('POST', `/api/v1/keyauth/clients/${c.fingerprint}/approve`);
    keyauthIds = new Map(pending.map((c) => [c.name, c.device_id]));
  }
  await sim.waitFor((s) => s.joined === COUNT, 60_000);
  const rows = await until(
    async () => {
      const found = await server.database.db
        .selectFrom('devices')
        .select(['id', 'identifier', 'connection_status', 'approval'])
        .where(
          protocol === 'keyauth' ? 'id' : 'identifier',
          'in',
          protocol === 'keyauth' ? [...keyauthIds.values()] : serials,
        )
        .execute();
      return found.length === COUNT && found.every((d) => d.connection_status === 'online' && d.approval === 'approved')
        ? found
        : undefined;
    },
    `${protocol} devices online and approved`,
    30_000,
  );
  return serials.map((serial) =>
    protocol === 'keyauth' ? keyauthIds.get(serial)! : rows.find((r) => r.identifier === serial)!.id,
  );
}

async function attemptStates(firmwareId: string, deviceIds: string[]) {
  const rows = await server.database.db
    .selectFrom('update_attempts')
    .select(['device_id', 'state', 'errors'])
    .where('firmware_id', '=', firmwareId)
    .where('device_id', 'in', deviceIds)
    .execute();
  return deviceIds.map((id) => rows.find((r) => r.device_id === id));
}

const FINAL = ['succeeded', 'failed', 'rolled_back', 'timed_out', 'cancelled'];

/** What the device link records for a misbehaving device, per protocol and mode. */
function expected(protocol: Protocol, mode: BadMode): string {
  if (mode === 'fail') return 'failed';
  if (mode === 'hang') return 'timed_out';
  return protocol === 'keyauth' ? 'failed' : 'rolled_back';
}

/**
 * One rehearsal: COUNT devices of `protocol` on 1.0.0, a group retargeted to a bad version; the
 * misbehaving ones end as `expected` says, the others succeed.
 */
async function rehearse(protocol: Protocol, mode: BadMode): Promise<void> {
  const run = ++runs;
  const pki = await getTestPki();
  const base = await upload(protocol, `1.${run}.0`);
  const badVersion = `2.${run}.0`;
  const sim = new Simulation({
    protocol,
    count: COUNT,
    url: urlOf(protocol),
    certsDir: path.join(tmp, 'certs'),
    pkiDir: pki.dir,
    slotsDir: path.join(tmp, `slots-${run}`),
    serialPrefix: `bad${run}`,
    firmware: { uuid: base, version: `1.${run}.0` },
    staggerMs: 5,
    badRelease: { version: badVersion, mode, fraction: FRACTION },
  });
  try {
    await sim.start();
    const ids = await admitted(protocol, sim);
    const bad = sim.tallies.map((t) => t.bad);
    assert.deepEqual(bad, [false, true, false, true]);
    assert.deepEqual(
      bad,
      ids.map((_, i) => misbehaves(i, FRACTION)),
    );
    const target = await upload(protocol, badVersion);
    const group = `bad-${run}`;
    await server.call('POST', `/api/v1/orgs/${server.orgId}/groups`, { product: server.productId, name: group });
    await server.call('POST', `/api/v1/orgs/${server.orgId}/groups/${group}/devices`, { devices: ids });
    await server.call('PUT', `/api/v1/orgs/${server.orgId}/groups/${group}/target`, { firmware_id: target });

    const want = expected(protocol, mode);
    if (mode === 'hang') {
      // The bad ones go silent mid-update: their attempts stay open, the good ones succeed.
      await sim.waitFor((s) => s.hung === 2 && s.succeeded === 2, 60_000);
      const open = await until(
        async () => {
          const states = await attemptStates(target, ids);
          return states.every((s, i) => (bad[i] ? s && !FINAL.includes(s.state) : s?.state === 'succeeded'))
            ? states
            : undefined;
        },
        'hung attempts open, the rest succeeded',
        30_000,
      );
      assert.equal(open.filter((s) => s?.state === 'succeeded').length, 2);
      // The one sweep with the product's own in-flight timeout (60 s, the shortest allowed) and a
      // clock moved past it; half of it changes nothing.
      await server.call('PATCH', `/api/v1/orgs/${server.orgId}/products/${server.productId}`, {
        update_timeout_seconds: 60,
      });
      try {
        assert.equal(await sweepStaleUpdates(server.fleet, { now: new Date(Date.now() + 30_000) }), 0);
        assert.equal(await sweepStaleUpdates(server.fleet, { now: new Date(Date.now() + 90_000) }), 2);
      } finally {
        await server.call('PATCH', `/api/v1/orgs/${server.orgId}/products/${server.productId}`, {
          update_timeout_seconds: null,
        });
      }
    }
    const states = await until(
      async () => {
        const s = await attemptStates(target, ids);
        return s.every((a) => a && FINAL.includes(a.state)) ? s : undefined;
      },
      `every ${protocol} attempt final`,
      60_000,
    );
    assert.deepEqual(
      states.map((s) => s!.state),
      bad.map((b) => (b ? want : 'succeeded')),
      JSON.stringify(states),
    );
    if (mode === 'fail' || (protocol === 'keyauth' && mode === 'rollback'))
      for (const [i, s] of states.entries())
        if (bad[i]) assert.match(JSON.stringify(s!.errors), /bad release rehearsal/, `${protocol} says why`);
    // The simulator's own table agrees with the server (once the devices have heard back).
    await sim.waitFor(
      (s) =>
        s.succeeded === 2 &&
        s.failed === (want === 'failed' && mode !== 'hang' ? 2 : 0) &&
        s.rolledBack === (want === 'rolled_back' ? 2 : 0) &&
        s.hung === (mode === 'hang' ? 2 : 0),
      30_000,
    );
    // The misbehaving devices still run the old firmware, the others the new one.
    const running = await server.database.db
      .selectFrom('device_components')
      .select(['device_id', 'version'])
      .where('component', '=', 'firmware')
      .where('device_id', 'in', ids)
      .execute();
    assert.deepEqual(
      ids.map((id) => running.find((r) => r.device_id === id)?.version),
      bad.map((b) => (b ? `1.${run}.0` : badVersion)),
    );
  } finally {
    await sim.stop();
  }
}

describe(`rehearsing a bad release with the simulators (${DATABASE_KIND})`, () => {
  before(async () => {
    // Gateways register approved (a lab setting that needs the open policy).
    server = await startTestServer({ wifidogxAutoApprove: true, wifidogxAuth: 'open' });
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-bad-release-'));
  });
  after(async () => {
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  test('misbehaves exactly floor(n·f) of the first n devices, spread by index', () => {
    const pick = (n: number, f: number) => Array.from({ length: n }, (_, i) => i).filter((i) => misbehaves(i, f));
    assert.deepEqual(pick(20, 0.2), [4, 9, 14, 19]);
    assert.deepEqual(pick(4, 0.5), [1, 3]);
    assert.equal(pick(200, 0.2).length, 40);
    assert.equal(pick(100, 0.29).length, 29);
    assert.deepEqual(pick(5, 1), [0, 1, 2, 3, 4]);
    assert.deepEqual(pick(5, 0), []);
  });

  for (const protocol of ['phoenix', 'grisp', 'wifidogx', 'main-server', 'keyauth'] as const)
    for (const mode of ['rollback', 'fail', 'hang'] as const)
      test(
        `${protocol}, --bad-mode ${mode}: the bad half ends ${expected(protocol, mode)}, the rest succeeded`,
        {
          timeout: 180_000,
        },
        () => rehearse(protocol, mode),
      );
});
