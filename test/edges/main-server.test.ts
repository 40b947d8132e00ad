/**
 * The Main Server REST protocol against the real server over real HTTP: every endpoint with the
 * seed's example bodies, the authorisation matrix, packages, heartbeats, and a simulated Pi
 * (checksum mismatch → failed, failing install → rolled back).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createUser } from '../../server/api/index.ts';
import { sweepOfflineDevices } from '../../server/edges/main-server/index.ts';
import { createZip } from '../../shared/main-server-package.ts';
import { runMainServerCommand } from '../../server/cli/main-server.ts';
import { MainServerDevice } from '../../device-client/simulators/main-server.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

let server: TestServer;
let viewerToken: string;
const tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-main-server-'));

/** A row of `/updates`. */
interface UpdateRow {
  device_id: string;
  extension_id: number;
  name: string;
  current_version: string;
  available_version: string;
  is_compatible: boolean;
  update_available: boolean;
  package_id: string;
  download_url: string;
}

/** What the tests read of a Main Server answer; each route fills its part. */
interface MsBody {
  status: string;
  message: string;
  error: string;
  details: string;
  claim_token: string;
  device_id: string;
  device_token: string;
  extension_id: number;
  package_id: string;
  package_path: string;
  sha256: string;
  update_state: string;
  version: string;
  devices: Array<{ id: string; name: string; ip: string; status: string }>;
  updates: UpdateRow[];
}

/** The operator API's answer to a package upload. */
interface PackageBody {
  error: { code: string };
  extension_id: number;
  package_id: string;
  format: string;
  version: string;
  sha256: string;
}

interface Answer<T = MsBody> {
  status: number;
  body: T;
  headers: Headers;
}

async function ms(
  method: string,
  pathname: string,
  options: { body?: unknown; token?: string; headers?: Record<string, string> } = {},
): Promise<Answer> {
  const res = await fetch(`${server.apiUrl}/api/main-server${pathname}`, {
    method,
    headers: {
      ...(options.body !== undefined ? { 'content-type': 'application/json' } : {}),
      ...(options.token ? { authorization: `Bearer ${options.token}` } : {}),
      ...options.headers,
    },
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const text = await res.text();
  let body: unknown = text;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    // binary download
  }
  return { status: res.status, body: body as MsBody, headers: res.headers };
}

async function uploadPackage(
  manifest: Record<string, unknown>,
  extra: Array<{ name: string; data: string }> = [],
  raw?: Buffer,
): Promise<Answer<PackageBody>> {
  const zip = raw ?? createZip([{ name: 'device_update.json', data: JSON.stringify(manifest) }, ...extra]);
  const res = await fetch(`${server.apiUrl}/api/v1/main-server/packages`, {
    method: 'POST',
    headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/zip' },
    body: new Uint8Array(zip),
  });
  return { status: res.status, body: (await res.json()) as PackageBody, headers: res.headers };
}

/** Registers `id`, approves it through REST and collects its token with the claim. */
async function approvedDevice(id: string, extensions: Array<{ name: string; version: string }>): Promise<string> {
  const reg = await ms('POST', '/register-device', {
    body: { device_id: id, name: `Display ${id}`, ip: '192.168.1.100', extensions },
  });
  assert.equal(reg.status, 202, JSON.stringify(reg.body));
  await server.call('POST', `/api/v1/main-server/devices/${id}/approve`);
  const claimed = await ms('POST', '/register-device', {
    body: { device_id: id, extensions, claim_token: reg.body.claim_token },
  });
  assert.equal(claimed.status, 200, JSON.stringify(claimed.body));
  return claimed.body.device_token;
}

function assertSeedError(a: Answer, status: number): void {
  assert.equal(a.status, status, JSON.stringify(a.body));
  assert.deepEqual(Object.keys(a.body).sort(), ['details', 'error']);
  assert.equal(typeof a.body.error, 'string');
  assert.equal(typeof a.body.details, 'string');
}

async function attemptStates(identifier: string): Promise<string[]> {
  const rows = await server.database.db
    .selectFrom('update_attempts')
    .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
    .select('update_attempts.state')
    .where('devices.identifier', '=', identifier)
    .orderBy('update_attempts.created_at')
    .execute();
  return rows.map((r) => r.state);
}

before(async () => {
  server = await startTestServer();
  const email = `viewer-${Date.now()}@example.com`;
  await createUser(server.database.db, { email, password: 'viewer-password-123', role: 'viewer' });
  const login = await fetch(`${server.apiUrl}/api/v1/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password: 'viewer-password-123' }),
  });
  viewerToken = ((await login.json()) as { token: string }).token;
});

after(async () => {
  await server?.close();
  rmSync(tmp, { recursive: true, force: true });
});

describe(`Main Server REST on ${DATABASE_KIND}`, () => {
  let token: string;
  let extensionId: number;
  let packageId: string;

  test('register-device with the seed example body records a pending device and answers 202 with a claim token', async () => {
    const reg = await ms('POST', '/register-device', {
      body: {
        device_id: 'raspi-001',
        name: 'Living Room Display',
        ip: '192.168.1.100',
        extensions: [{ name: 'ExtensionName', version: '1.0.0' }],
      },
    });
    assert.equal(reg.status, 202);
    assert.equal(reg.body.status, 'pending');
    assert.match(reg.body.claim_token, /^fhc_/);
    const device = await server.database.db
      .selectFrom('devices')
      .selectAll()
      .where('identifier', '=', 'raspi-001')
      .executeTakeFirstOrThrow();
    assert.equal(device.protocol, 'main-server');
    assert.equal(device.approval, 'pending');
    // A repeat without the claim is refused; a wrong claim is unauthorised; the right one stays pending.
    assertSeedError(await ms('POST', '/register-device', { body: { device_id: 'raspi-001' } }), 409);
    assertSeedError(
      await ms('POST', '/register-device', { body: { device_id: 'raspi-001', claim_token: 'fhc_wrong' } }),
      401,
    );
    const again = await ms('POST', '/register-device', {
      body: { device_id: 'raspi-001', claim_token: reg.body.claim_token },
    });
    assert.equal(again.status, 202);
    assert.equal(again.body.claim_token, undefined);
    // The operator approves through REST; the device collects its token once with its claim.
    const pending = await server.call<{ items: Array<{ device_id: string }> }>(
      'GET',
      '/api/v1/main-server/devices?approval=pending',
    );
    assert.deepEqual(
      pending.items.map((d) => d.device_id),
      ['raspi-001'],
    );
    await server.call('POST', '/api/v1/main-server/devices/raspi-001/approve');
    const claimed = await ms('POST', '/register-device', {
      body: { device_id: 'raspi-001', claim_token: reg.body.claim_token },
    });
    assert.equal(claimed.status, 200);
    assert.match(claimed.body.device_token, /^fhd_/);
    token = claimed.body.device_token;
    assertSeedError(
      await ms('POST', '/register-device', { body: { device_id: 'raspi-001', claim_token: reg.body.claim_token } }),
      409,
    );
    const stored = await server.database.db
      .selectFrom('main_server_devices')
      .select(['token_hash', 'claim_hash'])
      .executeTakeFirstOrThrow();
    assert.equal(stored.token_hash, createHash('sha256').update(token).digest('hex'));
    assert.equal(stored.claim_hash, null);
  });

  test('heartbeat with the seed example body marks the device online; 180 s without one marks it offline', async () => {
    const beat = await ms('POST', '/heartbeat', {
      token,
      body: { device_id: 'raspi-001', status: 'online', timestamp: '2023-12-22T10:30:00Z' },
    });
    assert.equal(beat.status, 200);
    const devices = await ms('GET', '/devices', { token: server.adminToken });
    assert.equal(devices.status, 200);
    assert.deepEqual(
      devices.body.devices.map((d) => ({ id: d.id, name: d.name, ip: d.ip, status: d.status })),
      [{ id: 'raspi-001', name: 'Living Room Display', ip: '192.168.1.100', status: 'online' }],
    );
    assert.equal(await sweepOfflineDevices(server.fleet, 180_000), 0);
    await server.database.db
      .updateTable('devices')
      .set({ last_seen_at: new Date(Date.now() - 181_000) })
      .where('identifier', '=', 'raspi-001')
      .execute();
    assert.equal(await sweepOfflineDevices(server.fleet, 180_000), 1);
    assert.equal((await ms('GET', '/devices', { token: server.adminToken })).body.devices[0].status, 'offline');
    // Scalars fall back to the query string.
    assert.equal((await ms('POST', '/heartbeat?device_id=raspi-001', { token })).status, 200);
    assert.equal((await ms('GET', '/devices', { token: server.adminToken })).body.devices[0].status, 'online');
  });

  test('package upload validates device_update.json and answers the extension_id', async () => {
    const notZip = await uploadPackage({}, [], Buffer.from('this is not a zip'));
    assert.equal(notZip.status, 400);
    assert.equal(notZip.body.error.code, 'not_a_zip');
    const noManifest = await uploadPackage({}, [], createZip([{ name: 'app.py', data: 'print(1)' }]));
    assert.equal(noManifest.body.error.code, 'manifest_missing');
    const badVersion = await uploadPackage({ extension: 'ExtensionName', version: 'one' });
    assert.equal(badVersion.body.error.code, 'manifest_invalid');
    const badRange = await uploadPackage({
      extension: 'ExtensionName',
      version: '1.1.0',
      compatible_with: 'not a range',
    });
    assert.equal(badRange.body.error.code, 'manifest_invalid');
    const ok = await uploadPackage(
      { extension: 'ExtensionName', version: '1.1.0', compatible_with: '>=1.0.0 <2.0.0' },
      [{ name: 'app/main.py', data: 'print("1.1.0")\n' }],
    );
    assert.equal(ok.status, 201, JSON.stringify(ok.body));
    assert.equal(ok.body.format, 'main-server-zip');
    assert.match(ok.body.sha256, /^[0-9a-f]{64}$/);
    extensionId = ok.body.extension_id;
    packageId = ok.body.package_id;
    const ext = await server.call<{ items: Array<{ id: number; name: string }> }>(
      'GET',
      '/api/v1/main-server/extensions',
    );
    assert.deepEqual(ext.items, [{ id: extensionId, name: 'ExtensionName' }]);
  });

  test('schedule-update with the seed example body targets every device with the extension; GET /updates reports current vs available', async () => {
    const scheduled = await ms('POST', '/schedule-update', {
      token: server.adminToken,
      body: { extension_id: extensionId, new_version: '1.1.0' },
    });
    assert.equal(scheduled.status, 200, JSON.stringify(scheduled.body));
    assert.equal(scheduled.body.message, 'Update scheduled');
    assert.equal(scheduled.body.extension_id, extensionId);
    const updates = await ms('GET', '/updates', { token: server.adminToken });
    assert.equal(updates.status, 200);
    assert.deepEqual(
      updates.body.updates.map((u) => ({
        device_id: u.device_id,
        extension_id: u.extension_id,
        name: u.name,
        current_version: u.current_version,
        available_version: u.available_version,
        is_compatible: u.is_compatible,
      })),
      [
        {
          device_id: 'raspi-001',
          extension_id: extensionId,
          name: 'ExtensionName',
          current_version: '1.0.0',
          available_version: '1.1.0',
          is_compatible: true,
        },
      ],
    );
    // The device sees its own row, with the package id, its sha256 and a download URL; polling marks the attempt sent.
    const own = await ms('GET', '/updates', { token });
    assert.equal(own.body.updates[0].package_id, packageId);
    assert.match(own.body.updates[0].download_url, /\/api\/main-server\/download-update\?package_id=/);
    assert.deepEqual(await attemptStates('raspi-001'), ['sent']);
  });

  test('is_compatible follows the compatible_with range declared in the package', async () => {
    const t = await approvedDevice('raspi-old', [{ name: 'Legacy', version: '0.9.0' }]);
    const up = await uploadPackage({ extension: 'Legacy', version: '2.0.0', compatible_with: '>=1.0.0' });
    const deployed = await ms('POST', '/deploy-update', {
      token: server.adminToken,
      body: { device_id: 'raspi-old', extension_id: up.body.extension_id, version: '2.0.0' },
    });
    assert.equal(deployed.status, 200);
    const row = (await ms('GET', '/updates', { token: t })).body.updates[0];
    assert.equal(row.available_version, '2.0.0');
    assert.equal(row.is_compatible, false);
    // An incompatible offer is not sent: the attempt waits.
    assert.deepEqual(await attemptStates('raspi-old'), ['sent']);
  });

  test('deploy-update with the seed example body answers package_path as a download URL; the download carries the sha256 and supports Range', async () => {
    const deployed = await ms('POST', '/deploy-update', {
      token: server.adminToken,
      body: { device_id: 'raspi-001', extension_id: extensionId, version: '1.1.0' },
    });
    assert.equal(deployed.status, 200, JSON.stringify(deployed.body));
    assert.equal(deployed.body.status, 'queued');
    assert.equal(deployed.body.message, 'Update deployment queued for device raspi-001');
    assert.equal(deployed.body.device_id, 'raspi-001');
    assert.equal(deployed.body.version, '1.1.0');
    const url = new URL(deployed.body.package_path);
    assert.equal(url.pathname, '/api/main-server/download-update');
    const full = await fetch(deployed.body.package_path, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(full.status, 200);
    const bytes = Buffer.from(await full.arrayBuffer());
    const sha = createHash('sha256').update(bytes).digest('hex');
    assert.equal(full.headers.get('x-checksum-sha256'), sha);
    assert.equal(deployed.body.sha256, sha);
    const part = await fetch(deployed.body.package_path, {
      headers: { authorization: `Bearer ${token}`, range: 'bytes=10-19' },
    });
    assert.equal(part.status, 206);
    assert.equal(part.headers.get('content-range'), `bytes 10-19/${bytes.length}`);
    assert.deepEqual(Buffer.from(await part.arrayBuffer()), bytes.subarray(10, 20));
    assertSeedError(
      await ms('GET', '/download-update?package_id=00000000-0000-4000-8000-000000000000', { token }),
      404,
    );
    assertSeedError(await ms('GET', '/download-update?package_id=nope', { token }), 400);
  });

  test('update-status in_progress then the seed example body (success) drives the attempt to succeeded', async () => {
    const progress = await ms('POST', '/update-status', {
      token,
      body: {
        device_id: 'raspi-001',
        extension_id: extensionId,
        version: '1.1.0',
        status: 'in_progress',
        timestamp: '2023-12-22T10:29:00Z',
      },
    });
    assert.equal(progress.status, 200, JSON.stringify(progress.body));
    assert.equal(progress.body.update_state, 'begun');
    // The seed's example body, with this server's extension_id.
    const done = await ms('POST', '/update-status', {
      token,
      body: {
        device_id: 'raspi-001',
        extension_id: extensionId,
        version: '1.1.0',
        status: 'success',
        timestamp: '2023-12-22T10:30:00Z',
      },
    });
    assert.equal(done.status, 200, JSON.stringify(done.body));
    assert.equal(done.body.update_state, 'succeeded');
    assert.ok((await attemptStates('raspi-001')).includes('succeeded'));
    const row = (await ms('GET', '/updates', { token })).body.updates[0];
    assert.deepEqual([row.current_version, row.available_version, row.update_available], ['1.1.0', '1.1.0', false]);
    assertSeedError(
      await ms('POST', '/update-status', {
        token,
        body: { device_id: 'raspi-001', extension_id: extensionId, version: '9.9.9', status: 'failed' },
      }),
      404,
    );
    assertSeedError(
      await ms('POST', '/update-status', {
        token,
        body: { device_id: 'raspi-001', extension_id: extensionId, version: '1.1.0', status: 'exploded' },
      }),
      400,
    );
  });

  test('authorisation matrix: no token 401, operator token on device routes 403, another device 403, unapproved device 401, device token on operator routes 403, viewer cannot schedule', async () => {
    const other = await approvedDevice('raspi-002', [{ name: 'ExtensionName', version: '1.0.0' }]);
    const pending = await ms('POST', '/register-device', { body: { device_id: 'raspi-pending' } });
    assert.equal(pending.status, 202);
    const status = { device_id: 'raspi-001', extension_id: extensionId, version: '1.1.0', status: 'in_progress' };
    const heartbeat = { device_id: 'raspi-001', status: 'online', timestamp: '2023-12-22T10:30:00Z' };
    for (const [route, body] of [
      ['/heartbeat', heartbeat],
      ['/update-status', status],
    ] as const) {
      assertSeedError(await ms('POST', route, { body }), 401);
      assertSeedError(await ms('POST', route, { body, token: server.adminToken }), 403);
      assertSeedError(await ms('POST', route, { body, token: other }), 403);
      assertSeedError(
        await ms('POST', route, { body: { ...body, device_id: 'raspi-pending' }, token: pending.body.claim_token }),
        401,
      );
      assertSeedError(await ms('POST', route, { body, token: 'fhd_not-a-token' }), 401);
    }
    assertSeedError(await ms('GET', `/download-update?package_id=${packageId}`), 401);
    assert.equal((await ms('GET', `/download-update?package_id=${packageId}`, { token: viewerToken })).status, 200);
    for (const [method, route, body] of [
      ['GET', '/devices', undefined],
      ['POST', '/schedule-update', { extension_id: extensionId, new_version: '1.1.0' }],
      ['POST', '/deploy-update', { device_id: 'raspi-001', extension_id: extensionId, version: '1.1.0' }],
    ] as const) {
      assertSeedError(await ms(method, route, { body }), 401);
      assertSeedError(await ms(method, route, { body, token }), 403);
    }
    assertSeedError(await ms('GET', '/updates'), 401);
    assertSeedError(
      await ms('POST', '/schedule-update', {
        body: { extension_id: extensionId, new_version: '1.1.0' },
        token: viewerToken,
      }),
      403,
    );
    assert.equal((await ms('GET', '/devices', { token: viewerToken })).status, 200);
    assertSeedError(
      await ms('POST', '/schedule-update', {
        body: { extension_id: 999, new_version: '1.1.0' },
        token: server.adminToken,
      }),
      404,
    );
    assertSeedError(
      await ms('POST', '/schedule-update', {
        body: { extension_id: extensionId, new_version: '7.0.0' },
        token: server.adminToken,
      }),
      404,
    );
    assertSeedError(await ms('GET', '/nothing-here', { token: server.adminToken }), 404);
  });

  test('rotation replaces the token, revocation stops it, and an operator can pre-provision a device with a token', async () => {
    const old = await approvedDevice('raspi-rotate', []);
    const rotated = await server.call<{ device_token: string }>(
      'POST',
      '/api/v1/main-server/devices/raspi-rotate/token',
    );
    assertSeedError(await ms('POST', '/heartbeat', { token: old, body: { device_id: 'raspi-rotate' } }), 401);
    assert.equal(
      (await ms('POST', '/heartbeat', { token: rotated.device_token, body: { device_id: 'raspi-rotate' } })).status,
      200,
    );
    await server.call('POST', '/api/v1/main-server/devices/raspi-rotate/revoke');
    assertSeedError(
      await ms('POST', '/heartbeat', { token: rotated.device_token, body: { device_id: 'raspi-rotate' } }),
      401,
    );
    assertSeedError(await ms('POST', '/register-device', { body: { device_id: 'raspi-rotate' } }), 403);
    const added = await server.call<{ device_token: string; device: { approval: string } }>(
      'POST',
      '/api/v1/main-server/devices',
      { device_id: 'raspi-provisioned', name: 'Kitchen' },
    );
    assert.equal(added.device.approval, 'approved');
    assert.equal(
      (await ms('POST', '/heartbeat', { token: added.device_token, body: { device_id: 'raspi-provisioned' } })).status,
      200,
    );
  });

  test('the CLI lists the approval queue, approves and prints a rotated token once', async () => {
    await ms('POST', '/register-device', { body: { device_id: 'raspi-cli' } });
    const out: string[] = [];
    const io = {
      out: (t: string) => void out.push(t),
      err: (t: string) => void out.push(t),
      env: { FLEETHUB_URL: server.apiUrl, FLEETHUB_TOKEN: server.adminToken, HOME: tmp },
    };
    assert.equal(await runMainServerCommand(['devices', '--pending'], io), 0);
    assert.match(out.join(''), /raspi-cli\s.*pending/);
    assert.equal(await runMainServerCommand(['approve', 'raspi-cli'], io), 0);
    assert.equal(await runMainServerCommand(['rotate-token', 'raspi-cli'], io), 0);
    assert.match(out.join(''), /fhd_[A-Za-z0-9_-]{20,}/);
    assert.equal(await runMainServerCommand(['schedule', '999', '1.0.0'], io), 1);
    assert.match(out.join(''), /Not found/);
  });

  test('a simulated Pi that receives a corrupted package reports failed and keeps its version; a failing install is rolled back from its backup', async () => {
    const up = await uploadPackage({ extension: 'HomeApp', version: '2.0.0' }, [{ name: 'bin/app', data: 'v2' }]);
    assert.equal(up.status, 201);
    for (const [id, faults, expected] of [
      ['raspi-corrupt', { corrupt: true }, 'failed'],
      ['raspi-badinstall', { rejectInstall: true }, 'rolled_back'],
    ] as const) {
      const pi = new MainServerDevice({
        url: server.apiUrl,
        deviceId: id,
        stateDir: path.join(tmp, id),
        extensions: [{ name: 'HomeApp', version: '1.0.0' }],
        pollIntervalMs: 60_000,
        faults: () => faults,
      });
      const outcome = new Promise<{ status: string; error: string }>((resolve) => pi.once('update_failed', resolve));
      await pi.start();
      assert.equal(pi.state.token, undefined);
      await server.call('POST', `/api/v1/main-server/devices/${id}/approve`);
      // The device's timers would do this within a poll interval; drive them now.
      await pi.register();
      assert.match(pi.state.token ?? '', /^fhd_/);
      await ms('POST', '/deploy-update', {
        token: server.adminToken,
        body: { device_id: id, extension_id: up.body.extension_id, version: '2.0.0' },
      });
      await pi.checkForUpdates();
      const result = await outcome;
      assert.equal(result.status, expected, result.error);
      assert.deepEqual(await attemptStates(id), [expected]);
      assert.equal(pi.state.versions.HomeApp, '1.0.0');
      await pi.stop();
    }
  });
});
