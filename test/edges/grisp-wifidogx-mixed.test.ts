/**
 * One retarget reaches every protocol: a group of a Phoenix device (official device client over
 * mutual TLS), a GRiSP board and a WiFiDogX gateway is retargeted once, and each member ends up
 * running the target version through its own protocol.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { DeviceClient } from '../../device-client/index.ts';
import { buildGrispPackage, GrispBoard } from '../../device-client/simulators/grisp.ts';
import { WifidogxGateway } from '../../device-client/simulators/wifidogx.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, deviceTlsOptions, getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

let server: TestServer;
let tmp: string;
const stops: Array<() => Promise<void>> = [];

async function until(fn: () => Promise<boolean> | boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await fn())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe(`a mixed group retargeted once (${DATABASE_KIND})`, () => {
  before(async () => {
    // Labs: auto-approval trusts the bare device_id claim, which only the open policy allows.
    server = await startTestServer({ wifidogxAutoApprove: true, wifidogxAuth: 'open' });
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-mixed-'));
  });
  after(async () => {
    for (const stop of stops) await stop();
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  it('updates a Phoenix device, a GRiSP board and a WiFiDogX gateway to the target version', async () => {
    const pki = await getTestPki();
    const base = await server.call<{ id: string }>('POST', '/api/v1/firmware', {
      product: server.productId,
      org: server.orgId,
      version: '1.0.0',
      platform: 'sim',
      architecture: 'sim',
    });
    const tag = randomBytes(3).toString('hex');

    const phoenixSerial = `mixed-phoenix-${tag}`;
    const cred = await deviceCert(phoenixSerial);
    const phoenix = new DeviceClient({
      url: `${server.deviceUrl.replace(/^https/, 'wss')}/socket`,
      tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
      stateDir: path.join(tmp, phoenixSerial),
      firmware: { uuid: base.id, version: '1.0.0' },
      downloadRetryDelayMs: () => 50,
    });
    stops.push(() => phoenix.stop());
    await phoenix.start();

    const grispSerial = `GRiSP2 device mixed-${tag}`;
    const gcred = await deviceCert(grispSerial);
    const gtls = await deviceTlsOptions(gcred);
    const board = new GrispBoard({
      url: `${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`,
      tls: { cert: gtls.cert!, key: gtls.key!, ca: gtls.ca },
      serial: grispSerial,
      version: '1.0.0',
      reconnectMs: 100,
      progressThrottleMs: 0,
    });
    stops.push(() => board.stop());
    await board.start();

    const gateway = new WifidogxGateway({
      url: `${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`,
      deviceId: `mixed-gw-${tag}`,
      version: '1.0.0',
      reconnectMs: 100,
    });
    stops.push(() => gateway.stop());
    await gateway.start();

    const ids = async () =>
      server.database.db
        .selectFrom('devices')
        .select(['id', 'identifier', 'protocol', 'firmware_version', 'connection_status'])
        .where('identifier', 'in', [phoenixSerial, grispSerial, gateway.o.deviceId])
        .execute();
    await until(
      async () =>
        (await ids()).filter((d) => d.connection_status === 'online' && d.firmware_version === '1.0.0').length === 3,
      'all three online on 1.0.0',
    );
    const members = await ids();
    assert.deepEqual(members.map((d) => d.protocol).sort(), ['grisp', 'phoenix', 'wifidogx']);

    // One artifact every protocol can take: a GRiSP package (the Phoenix client installs the bytes,
    // the gateway simulator reads the version marker in its first member).
    const pkg = await buildGrispPackage({
      version: '3.0.0',
      blocks: [randomBytes(4000)],
      leading: [{ name: 'VERSION', data: Buffer.from('WIFIDOGX-SIM-FIRMWARE version=3.0.0\n') }],
    });
    const upload = await fetch(
      `${server.apiUrl}/api/v1/grisp/firmware?product=${server.productId}&org=${server.orgId}&version=3.0.0`,
      {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
        body: new Uint8Array(pkg),
      },
    );
    assert.equal(upload.status, 201);
    const target = (await upload.json()) as { id: string };

    const group = await server.call<{ id: string }>('POST', `/api/v1/orgs/${server.orgId}/groups`, {
      product: server.productId,
      name: `mixed-${tag}`,
    });
    await server.call('POST', `/api/v1/orgs/${server.orgId}/groups/${group.id}/devices`, {
      devices: members.map((d) => d.id),
    });
    await server.call('PUT', `/api/v1/orgs/${server.orgId}/groups/${group.id}/target`, { firmware_id: target.id });

    await until(
      async () => (await ids()).every((d) => d.firmware_version === '3.0.0'),
      'every member on 3.0.0',
      30_000,
    );
    await until(async () => {
      const states = await server.database.db
        .selectFrom('update_attempts')
        .select('state')
        .where('firmware_id', '=', target.id)
        .execute();
      return states.length === 3 && states.every((s) => s.state === 'succeeded');
    }, 'three succeeded attempts');
    assert.deepEqual(gateway.violations, []);
  });
});
