import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { Simulation, summaryTable } from '../../device-client/simulator.ts';
import { uploadFirmwareStream } from '../../server/cli/firmware.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { imageChunks } from '../firmware/harness.ts';

const COUNT = 200;

describe(`fleet simulator with fault injection (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let sim: Simulation | undefined;

  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-sim-'));
  });
  after(async () => {
    await sim?.stop();
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  async function upload(version: string, size: number, seed: number): Promise<{ id: string; version: string }> {
    return (await uploadFirmwareStream({
      client: { url: server.apiUrl, token: server.adminToken },
      query: { product: server.productId, version },
      source: Readable.from(imageChunks(size, seed)),
    })) as { id: string; version: string };
  }

  async function call(method: string, url: string, body?: unknown): Promise<unknown> {
    const res = await fetch(`${server.apiUrl}${url}`, {
      method,
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    if (!res.ok) throw new Error(`${method} ${url} → ${res.status} ${await res.text()}`);
    return res.json();
  }

  test(`${COUNT} simulated devices with injected faults end with the same succeeded and failed counts as the server's update attempts`, {
    timeout: 600_000,
  }, async () => {
    const base = await upload('1.0.0', 32 * 1024, 1);
    const next = await upload('1.1.0', 96 * 1024, 2);
    const pki = await getTestPki();
    sim = new Simulation({
      count: COUNT,
      url: `${server.deviceUrl.replace(/^https/, 'wss')}/socket`,
      certsDir: path.join(tmp, 'certs'),
      pkiDir: pki.dir,
      slotsDir: path.join(tmp, 'slots'),
      firmware: { uuid: base.id, version: base.version },
      faults: { failDownload: 0.1, corrupt: 0.1, dropConnection: 0.2, rejectInstall: 0.1 },
      staggerMs: 5,
      seed: 42,
    });
    await sim.start();
    await sim.waitFor((s) => s.joined === COUNT, 180_000);

    const serials = sim.tallies.map((t) => t.serial);
    await call('POST', `/api/v1/orgs/${server.orgId}/groups`, { product: server.productId, name: 'fleet' });
    await call('POST', `/api/v1/orgs/${server.orgId}/groups/fleet/devices`, { devices: serials });
    await call('PUT', `/api/v1/orgs/${server.orgId}/groups/fleet/target`, { firmware_id: next.id });

    const summary = await sim.waitFor((s) => s.succeeded + s.failed === COUNT && s.updating === 0, 300_000);
    process.stdout.write(summaryTable(summary).replace(/^/gm, '# '));
    assert.ok(summary.failed > 0, 'the injected faults failed some updates');
    assert.ok(summary.succeeded > 0, 'some updates succeeded');
    assert.ok(summary.resumedDownloads > 0, 'some downloads were cut and resumed');

    // The server's view, once every success has rejoined on the new firmware.
    const deadline = Date.now() + 60_000;
    let counts: Record<string, number> = {};
    for (;;) {
      const rows = await server.database.db
        .selectFrom('update_attempts')
        .select(['state', (eb) => eb.fn.countAll<number>().as('n')])
        .where('firmware_id', '=', next.id)
        .groupBy('state')
        .execute();
      counts = Object.fromEntries(rows.map((r) => [r.state, Number(r.n)]));
      if ((counts.succeeded ?? 0) + (counts.failed ?? 0) === COUNT || Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.deepEqual(counts, { succeeded: summary.succeeded, failed: summary.failed });
    const onNew = await server.database.db
      .selectFrom('devices')
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .where('firmware_uuid', '=', next.id)
      .executeTakeFirstOrThrow();
    assert.equal(Number(onNew.n), summary.succeeded);
  });
});
