/**
 * One release, one artifact per package format: a group of Phoenix devices, GRiSP boards,
 * WiFiDogX gateways, Main Server Pis and keyauth clients (real clients over real sockets) is
 * retargeted once to a release with a raw image, a GRiSP package and a Main Server ZIP. Every
 * device installs the variant its protocol takes, and the per-device counts are exact. Then the
 * applicability rule: a target for a component creates no attempt for members that do not run
 * it (shown `not_applicable`), and a device-level target it cannot install is refused.
 */
import assert from 'node:assert/strict';
import { createHash, createPublicKey, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { DeviceClient } from '../../device-client/index.ts';
import { buildGrispPackage, GrispBoard } from '../../device-client/simulators/grisp.ts';
import { KeyauthClient } from '../../device-client/simulators/keyauth.ts';
import { MainServerDevice } from '../../device-client/simulators/main-server.ts';
import { simulatorImage, WifidogxGateway } from '../../device-client/simulators/wifidogx.ts';
import { createLogger } from '../../server/log.ts';
import { createZip } from '../../shared/main-server-package.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';

const EACH = 2;
let server: TestServer;
const tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-mixed-release-'));
const stops: Array<() => Promise<void>> = [];
/** Every `firmware download` line the server logged: which image was sent whole. */
const downloads: Array<{ sha256: string; completed: boolean }> = [];

interface FirmwareRow {
  id: string;
  format: string;
  sha256: string;
  version: string;
  component: string;
}

interface Status {
  devices: number;
  updates: Record<string, number>;
  device_states: Record<string, number>;
}

/** Uploads bytes as firmware through `route` (the generic upload, the GRiSP or the Main Server package route). */
async function upload(route: string, body: Buffer, contentType = 'application/octet-stream'): Promise<Response> {
  return fetch(`${server.apiUrl}${route}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': contentType },
    body: new Uint8Array(body),
  });
}

function mainServerZip(extension: string, version: string): Buffer {
  return createZip([
    { name: 'device_update.json', data: JSON.stringify({ extension, version }) },
    { name: 'payload.bin', data: `${extension} ${version}` },
  ]);
}

const sha256 = (data: Buffer) => createHash('sha256').update(data).digest('hex');

/** The named state counts of a status answer that are not 0. */
function nonZero(counts: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(counts).filter(([, n]) => n !== 0));
}

async function devicesNamed(identifiers: string[]) {
  return server.database.db
    .selectFrom('devices')
    .select(['id', 'identifier', 'protocol', 'firmware_version', 'firmware_uuid', 'connection_status'])
    .where('identifier', 'in', identifiers)
    .execute();
}

function phoenixDevice(
  serial: string,
  cred: { certPem: string; keyPem: string },
  ca: string,
  base: { id: string; version: string },
) {
  const device = new DeviceClient({
    url: `${server.deviceUrl.replace(/^https/, 'wss')}/socket`,
    tls: { cert: cred.certPem, key: cred.keyPem, ca },
    stateDir: path.join(tmp, serial),
    firmware: { uuid: base.id, version: base.version },
    downloadRetryDelayMs: () => 50,
  });
  stops.push(() => device.stop());
  return device;
}

function mainServerPi(deviceId: string, extensions: Array<{ name: string; version: string }>) {
  const pi = new MainServerDevice({
    url: server.apiUrl,
    deviceId,
    stateDir: path.join(tmp, deviceId),
    extensions,
    pollIntervalMs: 200,
    heartbeatIntervalMs: 60_000,
  });
  stops.push(() => pi.stop());
  return pi;
}

async function approvedPi(pi: MainServerDevice): Promise<void> {
  await pi.start();
  const approved = new Promise((r) => pi.once('approved', r));
  await server.call('POST', `/api/v1/main-server/devices/${encodeURIComponent(pi.o.deviceId)}/approve`);
  await approved;
}

before(async () => {
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const text of String(chunk).split('\n').filter(Boolean)) {
        const line = JSON.parse(text) as { msg?: string; sha256?: string; completed?: boolean; level?: number };
        if (process.env.MIXED_DEBUG && (line.level ?? 0) >= 40) console.error(text);
        if (line.msg === 'firmware download') downloads.push({ sha256: line.sha256!, completed: line.completed! });
      }
      done();
    },
  });
  // Labs: auto-approval trusts the bare device_id claim, which only the open policy allows.
  server = await startTestServer(
    { wifidogxAutoApprove: true, wifidogxAuth: 'open' },
    { log: createLogger({ level: 'info', destination: sink }) },
  );
});

after(async () => {
  for (const stop of stops) await stop();
  await server?.close();
  rmSync(tmp, { recursive: true, force: true });
});

describe(`a mixed group retargeted once to a release with a variant per format (${DATABASE_KIND})`, () => {
  let release: { raw: FirmwareRow; grisp: FirmwareRow; zip: FirmwareRow };
  /** The group of the second test and its members, for the deployment of the third. */
  let fleet: { groupId: string; identifiers: string[]; gateways: WifidogxGateway[]; boards: GrispBoard[] } | undefined;

  test('a release holds one variant per format: a second format is added, the same format with other bytes is 409', async () => {
    const query = `product=${server.productId}&org=${server.orgId}&version=3.0.0`;
    const rawImage = simulatorImage('3.0.0', 6000);
    const raw = await upload(`/api/v1/firmware?${query}`, rawImage);
    assert.equal(raw.status, 201);
    // No WiFiDogX marker in the package: a gateway given it would stay on its version.
    const pkg = await buildGrispPackage({ version: '3.0.0', blocks: [randomBytes(4000)] });
    const grisp = await upload(`/api/v1/grisp/firmware?${query}`, pkg);
    assert.equal(grisp.status, 201, await grisp.clone().text());
    const zip = await upload('/api/v1/main-server/packages', mainServerZip('firmware', '3.0.0'), 'application/zip');
    assert.equal(zip.status, 201, await zip.clone().text());
    const zipId = ((await zip.json()) as { package_id: string }).package_id;

    // The same format again: identical bytes answer the record, other bytes are refused.
    assert.equal((await upload(`/api/v1/firmware?${query}`, rawImage)).status, 200);
    const clash = await upload(`/api/v1/firmware?${query}`, simulatorImage('3.0.0', 10));
    assert.equal(clash.status, 409);
    assert.equal(((await clash.json()) as { error: { code: string } }).error.code, 'duplicate_version');

    const rows = (await server.database.db
      .selectFrom('firmware')
      .select(['id', 'format', 'sha256', 'version', 'component'])
      .where('product_id', '=', server.productId)
      .where('version', '=', '3.0.0')
      .execute()) as FirmwareRow[];
    const byFormat = Object.fromEntries(rows.map((r) => [r.format, r]));
    assert.deepEqual(Object.keys(byFormat).sort(), ['grisp', 'main-server-zip', 'raw']);
    assert.equal(byFormat['main-server-zip']!.id, zipId);
    assert.equal(byFormat.raw!.sha256, sha256(rawImage));
    release = { raw: byFormat.raw!, grisp: byFormat.grisp!, zip: byFormat['main-server-zip']! };
  });

  test(`${EACH} devices of each of the five protocols reach the target through their own variant`, async () => {
    assert.ok(release, 'the release was uploaded');
    const pki = await getTestPki();
    const tag = randomBytes(3).toString('hex');
    const base = await server.call<{ id: string }>('POST', '/api/v1/firmware', {
      product: server.productId,
      org: server.orgId,
      version: '1.0.0',
    });

    const phoenix: DeviceClient[] = [];
    const boards: GrispBoard[] = [];
    const gateways: WifidogxGateway[] = [];
    const pis: MainServerDevice[] = [];
    const clients: KeyauthClient[] = [];
    const identifiers: string[] = [];
    const fingerprints: string[] = [];
    for (let i = 0; i < EACH; i++) {
      const serial = `mixed-phoenix-${tag}-${i}`;
      phoenix.push(
        phoenixDevice(serial, await deviceCert(serial), pki.rootCa.certPem, { id: base.id, version: '1.0.0' }),
      );
      identifiers.push(serial);

      const grispSerial = `GRiSP2 mixed-${tag}-${i}`;
      const gcred = await deviceCert(grispSerial);
      const board = new GrispBoard({
        url: `${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`,
        tls: { cert: gcred.certPem, key: gcred.keyPem, ca: pki.rootCa.certPem },
        serial: grispSerial,
        version: '1.0.0',
        reconnectMs: 100,
        progressThrottleMs: 0,
      });
      stops.push(() => board.stop());
      boards.push(board);
      identifiers.push(grispSerial);

      const gateway = new WifidogxGateway({
        url: `${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`,
        deviceId: `mixed-gw-${tag}-${i}`,
        version: '1.0.0',
        reconnectMs: 100,
      });
      stops.push(() => gateway.stop());
      gateways.push(gateway);
      identifiers.push(gateway.o.deviceId);

      pis.push(mainServerPi(`mixed-pi-${tag}-${i}`, [{ name: 'firmware', version: '1.0.0' }]));
      identifiers.push(`mixed-pi-${tag}-${i}`);

      const client = new KeyauthClient({
        host: '127.0.0.1',
        port: server.keyauth!.port,
        stateDir: path.join(tmp, `keyauth-${tag}-${i}`),
        version: '1.0.0',
        pollIntervalMs: 200,
      });
      stops.push(() => client.stop());
      clients.push(client);
      const fingerprint = createHash('sha256')
        .update(createPublicKey(client.publicKeyPem).export({ type: 'spki', format: 'der' }))
        .digest('hex');
      fingerprints.push(fingerprint);
      identifiers.push(`key-${fingerprint.slice(0, 16)}`);
    }

    await Promise.all([
      ...phoenix.map((d) => d.start()),
      ...boards.map((b) => b.start()),
      ...pis.map((pi) => approvedPi(pi)),
      ...clients.map(async (client, i) => {
        await client.start();
        const authorised = new Promise((r) => client.once('authorised', r));
        await server.call('POST', `/api/v1/keyauth/clients/${fingerprints[i]}/approve`);
        await authorised;
      }),
    ]);
    // A gateway reads one frame per read: the server spaces its frames, and this process (the
    // server and every other device) is quietest for them one at a time.
    for (const g of gateways) await g.start();
    const total = EACH * 5;
    await until(
      async () =>
        (await devicesNamed(identifiers)).filter(
          (d) => d.connection_status === 'online' && d.firmware_version === '1.0.0',
        ).length === total,
      `all ${total} online on 1.0.0`,
      30_000,
    ).catch(async (err: Error) => {
      throw new Error(`${err.message}: ${JSON.stringify(await devicesNamed(identifiers))}`);
    });
    const members = await devicesNamed(identifiers);
    for (const protocol of ['phoenix', 'grisp', 'wifidogx', 'main-server', 'keyauth'])
      assert.equal(members.filter((d) => d.protocol === protocol).length, EACH, protocol);

    const group = await server.call<{ id: string }>('POST', `/api/v1/orgs/${server.orgId}/groups`, {
      product: server.productId,
      name: `mixed-release-${tag}`,
    });
    await server.call('POST', `/api/v1/orgs/${server.orgId}/groups/${group.id}/devices`, {
      devices: members.map((d) => d.id),
    });
    const downloadsBefore = downloads.length;

    // ONE retarget, naming the release by its version.
    const change = await server.call<{ attempts: { sent: number; queued: number }; delivery: string }>(
      'PUT',
      `/api/v1/orgs/${server.orgId}/groups/${group.id}/target`,
      { version: '3.0.0' },
    );
    assert.deepEqual(change.attempts, { sent: total, queued: 0 });
    // Members install different variants: each device gets its own push, not one group broadcast.
    assert.equal(change.delivery, 'devices');

    await until(
      async () => (await devicesNamed(identifiers)).every((d) => d.firmware_version === '3.0.0'),
      'every member on 3.0.0',
      90_000,
    );
    const status = () => server.call<Status>('GET', `/api/v1/orgs/${server.orgId}/groups/${group.id}/status`);
    await until(async () => (await status()).device_states.succeeded === total, `${total} devices succeeded`, 30_000);
    const final = await status();
    assert.equal(final.devices, total);
    assert.deepEqual(nonZero(final.device_states), { succeeded: total });
    assert.deepEqual(nonZero(final.updates), { succeeded: total });

    // Each device's attempt is for the variant its protocol installs.
    const expected: Record<string, FirmwareRow> = {
      phoenix: release.raw,
      grisp: release.grisp,
      wifidogx: release.raw,
      'main-server': release.zip,
      keyauth: release.raw,
    };
    const attempts = await server.database.db
      .selectFrom('update_attempts')
      .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
      .select([
        'devices.protocol',
        'update_attempts.firmware_id',
        'update_attempts.state',
        'update_attempts.to_version',
      ])
      .where(
        'update_attempts.device_id',
        'in',
        members.map((d) => d.id),
      )
      .execute();
    assert.equal(attempts.length, total, 'one attempt per device');
    for (const a of attempts) {
      assert.equal(a.state, 'succeeded', a.protocol);
      assert.equal(a.to_version, '3.0.0');
      assert.equal(a.firmware_id, expected[a.protocol]!.id, `${a.protocol} installs ${expected[a.protocol]!.format}`);
    }

    // What each device took: the Phoenix devices joined with the raw variant's uuid; the
    // gateways read the version from the raw image (the package has no marker); the keyauth
    // clients stored the raw bytes; the Pis unpacked the ZIP and the boards the package.
    const after = await devicesNamed(identifiers);
    for (const d of after.filter((x) => x.protocol === 'phoenix')) assert.equal(d.firmware_uuid, release.raw.id);
    for (const g of gateways) assert.equal(g.version, '3.0.0');
    for (const [i] of clients.entries())
      assert.equal(
        sha256(readFileSync(path.join(tmp, `keyauth-${tag}-${i}`, 'keyauth-image.bin'))),
        release.raw.sha256,
      );
    for (const pi of pis) assert.equal(pi.state.versions.firmware, '3.0.0');
    for (const b of boards) assert.equal(b.running, '3.0.0');
    const served = new Set(
      downloads
        .slice(downloadsBefore)
        .filter((d) => d.completed)
        .map((d) => d.sha256),
    );
    assert.deepEqual([...served].sort(), [release.raw.sha256, release.grisp.sha256, release.zip.sha256].sort());
    for (const g of gateways) assert.deepEqual(g.violations, []);
    fleet = { groupId: group.id, identifiers, gateways, boards };
  });

  test('a deployment to the same mixed group: a canary of boards and a keyauth client, then the rest', async () => {
    assert.ok(fleet, 'the mixed group is on 3.0.0');
    const query = `product=${server.productId}&org=${server.orgId}&version=4.0.0`;
    assert.equal((await upload(`/api/v1/firmware?${query}`, simulatorImage('4.0.0', 6000))).status, 201);
    const pkg = await buildGrispPackage({ version: '4.0.0', blocks: [randomBytes(4000)] });
    assert.equal((await upload(`/api/v1/grisp/firmware?${query}`, pkg)).status, 201);
    const zip = await upload('/api/v1/main-server/packages', mainServerZip('firmware', '4.0.0'), 'application/zip');
    assert.equal(zip.status, 201);
    const total = fleet.identifiers.length;

    const created = await server.call<{ id: string; state: string; stages: Array<{ size: number }> }>(
      'POST',
      `/api/v1/orgs/${server.orgId}/deployments`,
      {
        product: server.productId,
        version: '4.0.0',
        groups: [fleet.groupId],
        stages: [{ size: { count: 3 } }, { size: 'rest' }],
      },
    );
    assert.equal(created.state, 'running');
    assert.deepEqual(
      created.stages.map((st) => st.size),
      [3, total - 3],
    );
    interface Row {
      identifier: string;
      stage: number;
      state: string;
      tries: number;
      told_at: string;
    }
    const show = () =>
      server.call<{ state: string; counts: Record<string, number>; stages: Array<{ succeeded_at: string | null }> }>(
        'GET',
        `/api/v1/orgs/${server.orgId}/deployments/${created.id}`,
      );
    const done = await until(
      async () => {
        const d = await show();
        return d.state === 'completed' && d;
      },
      'the mixed deployment to complete',
      120_000,
    ).catch(async (err: Error) => {
      throw new Error(`${err.message}: ${JSON.stringify(await show())}`);
    });
    assert.equal(done.counts.succeeded, total);
    assert.equal(done.counts.failed, 0);
    const rows = (
      await server.call<{ items: Row[] }>(
        'GET',
        `/api/v1/orgs/${server.orgId}/deployments/${created.id}/devices?limit=100`,
      )
    ).items;
    assert.equal(rows.length, total);
    assert.ok(
      rows.every((r) => r.state === 'succeeded' && r.tries === 1),
      JSON.stringify(rows),
    );
    // The canary: the first three by identifier — the two boards (a new relvsn reported and the
    // boot confirmed) and a keyauth client; nobody else was told before it succeeded.
    const canary = rows.filter((r) => r.stage === 0).map((r) => r.identifier);
    assert.deepEqual(canary, [...fleet.identifiers].sort().slice(0, 3));
    assert.equal(canary.filter((id) => id.startsWith('GRiSP2 ')).length, 2);
    const canaryDone = new Date(done.stages[0]!.succeeded_at!).getTime();
    for (const r of rows.filter((x) => x.stage === 1))
      assert.ok(new Date(r.told_at).getTime() >= canaryDone, `${r.identifier} was told before the canary succeeded`);

    const after = await devicesNamed(fleet.identifiers);
    assert.ok(
      after.every((d) => d.firmware_version === '4.0.0'),
      JSON.stringify(after),
    );
    for (const b of fleet.boards) assert.equal(b.running, '4.0.0');
    for (const g of fleet.gateways) {
      assert.equal(g.version, '4.0.0');
      assert.deepEqual(g.violations, []);
    }
  });
});

describe(`applicability: a target concerns only the members that run its component and can install it (${DATABASE_KIND})`, () => {
  test('a component target creates no attempt for members without the component; the counts show them not_applicable', async () => {
    const pki = await getTestPki();
    const tag = randomBytes(3).toString('hex');
    const base = await server.call<{ id: string }>('POST', '/api/v1/firmware', {
      product: server.productId,
      org: server.orgId,
      version: '1.0.1',
    });
    const serial = `applies-phoenix-${tag}`;
    const device = phoenixDevice(serial, await deviceCert(serial), pki.rootCa.certPem, {
      id: base.id,
      version: '1.0.1',
    });
    // One Pi runs the app only (no `firmware` extension), one runs both.
    const appOnly = mainServerPi(`applies-app-${tag}`, [{ name: 'HomeApp', version: '1.0.0' }]);
    const both = mainServerPi(`applies-both-${tag}`, [
      { name: 'firmware', version: '1.0.1' },
      { name: 'HomeApp', version: '1.0.0' },
    ]);
    await Promise.all([device.start(), approvedPi(appOnly), approvedPi(both)]);
    const identifiers = [serial, appOnly.o.deviceId, both.o.deviceId];
    await until(
      async () => (await devicesNamed(identifiers)).filter((d) => d.connection_status === 'online').length === 3,
      'all three online',
    );
    const members = await devicesNamed(identifiers);
    const idOf = (identifier: string) => members.find((d) => d.identifier === identifier)!.id;
    const group = await server.call<{ id: string }>('POST', `/api/v1/orgs/${server.orgId}/groups`, {
      product: server.productId,
      name: `applies-${tag}`,
    });
    await server.call('POST', `/api/v1/orgs/${server.orgId}/groups/${group.id}/devices`, {
      devices: members.map((d) => d.id),
    });
    const attemptsOf = async (component: string) =>
      server.database.db
        .selectFrom('update_attempts')
        .select(['device_id', 'state'])
        .where('component', '=', component)
        .where(
          'device_id',
          'in',
          members.map((d) => d.id),
        )
        .execute();
    const status = (component: string) =>
      server.call<Status>('GET', `/api/v1/orgs/${server.orgId}/groups/${group.id}/status?component=${component}`);

    // A HomeApp target: the two Pis update it, the Phoenix device does not run HomeApp.
    const app = await upload('/api/v1/main-server/packages', mainServerZip('HomeApp', '2.0.0'), 'application/zip');
    assert.equal(app.status, 201);
    const appId = ((await app.json()) as { package_id: string }).package_id;
    const appChange = await server.call<{ attempts: { sent: number; queued: number } }>(
      'PUT',
      `/api/v1/orgs/${server.orgId}/groups/${group.id}/target`,
      { firmware_id: appId },
    );
    assert.deepEqual(appChange.attempts, { sent: 2, queued: 0 });
    await until(async () => (await status('HomeApp')).device_states.succeeded === 2, 'both Pis on HomeApp 2.0.0');
    assert.deepEqual(nonZero((await status('HomeApp')).device_states), { succeeded: 2, not_applicable: 1 });
    const appAttempts = await attemptsOf('HomeApp');
    assert.deepEqual(
      appAttempts.map((a) => a.device_id).sort(),
      [idOf(appOnly.o.deviceId), idOf(both.o.deviceId)].sort(),
    );
    assert.equal(device.running?.version, '1.0.1', 'the Phoenix device was sent nothing');

    // A firmware target (the raw and ZIP variants of 3.0.0): the app-only Pi has no firmware to update.
    const fwChange = await server.call<{ attempts: { sent: number; queued: number } }>(
      'PUT',
      `/api/v1/orgs/${server.orgId}/groups/${group.id}/target`,
      { version: '3.0.0' },
    );
    assert.deepEqual(fwChange.attempts, { sent: 2, queued: 0 });
    await until(async () => (await status('firmware')).device_states.succeeded === 2, 'two members on 3.0.0', 30_000);
    assert.deepEqual(nonZero((await status('firmware')).device_states), { succeeded: 2, not_applicable: 1 });
    const fwAttempts = await attemptsOf('firmware');
    assert.deepEqual(fwAttempts.map((a) => a.device_id).sort(), [idOf(serial), idOf(both.o.deviceId)].sort());
    assert.ok(fwAttempts.every((a) => a.state === 'succeeded'));
    // The HomeApp counts are unchanged by the firmware target.
    assert.deepEqual(nonZero((await status('HomeApp')).device_states), { succeeded: 2, not_applicable: 1 });
  });

  test('a device-level target the device cannot install is a 400 and changes nothing', async () => {
    const pi = await server.database.db
      .selectFrom('devices')
      .select(['id', 'identifier'])
      .where('identifier', 'like', 'applies-app-%')
      .executeTakeFirstOrThrow();
    const phoenix = await server.database.db
      .selectFrom('devices')
      .select('id')
      .where('identifier', 'like', 'applies-phoenix-%')
      .executeTakeFirstOrThrow();
    const setTarget = (device: string, body: unknown) =>
      fetch(`${server.apiUrl}/api/v1/orgs/${server.orgId}/devices/${device}/target`, {
        method: 'PUT',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
    const attemptsBefore = await server.database.db
      .selectFrom('update_attempts')
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .executeTakeFirstOrThrow();

    // The Pi does not run `firmware`.
    const noComponent = await setTarget(pi.id, { version: '3.0.0' });
    assert.equal(noComponent.status, 400);
    assert.match(
      ((await noComponent.json()) as { error: { message: string } }).error.message,
      /does not run component firmware/,
    );
    // A release of raw images only has nothing a Pi installs; the Phoenix device does not run HomeApp.
    const rawOnly = await upload(
      `/api/v1/firmware?product=${server.productId}&org=${server.orgId}&version=4.0.0&component=HomeApp`,
      randomBytes(100),
    );
    assert.equal(rawOnly.status, 201);
    const noVariant = await setTarget(pi.id, { version: '4.0.0', component: 'HomeApp' });
    assert.equal(noVariant.status, 400);
    const body = (await noVariant.json()) as { error: { message: string; details: { formats: string[] } } };
    assert.match(body.error.message, /no variant a main-server device installs/);
    assert.deepEqual(body.error.details.formats, ['raw']);
    const otherComponent = await setTarget(phoenix.id, { version: '2.0.0', component: 'HomeApp' });
    assert.equal(otherComponent.status, 400);

    const targets = await server.database.db
      .selectFrom('targets')
      .select('id')
      .where('device_id', 'in', [pi.id, phoenix.id])
      .execute();
    assert.deepEqual(targets, []);
    const attemptsAfter = await server.database.db
      .selectFrom('update_attempts')
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .executeTakeFirstOrThrow();
    assert.equal(Number(attemptsAfter.n), Number(attemptsBefore.n));
  });
});
