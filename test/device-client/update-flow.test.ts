import assert from 'node:assert/strict';
import { once, type EventEmitter } from 'node:events';
import { mkdtempSync, openSync, readSync, rmSync, writeSync, closeSync, existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { DeviceClient, SlotInstaller, type DeviceClientOptions } from '../../device-client/index.ts';
import { generateSigningKeyPair, signDownloadUrl, signFirmwareDigest } from '../../server/firmware/signing.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';
import { imageChunks } from '../firmware/harness.ts';
import { uploadFirmwareStream } from '../../server/cli/firmware.ts';

const MiB = 1024 * 1024;

/** The next emission of `event` (its arguments). */
function next(emitter: DeviceClient, event: string): Promise<unknown[]> {
  return once(emitter as unknown as EventEmitter, event);
}

describe(`device client update flow against the real server (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let base: { id: string; version: string };
  const clients: DeviceClient[] = [];
  let versionCounter = 0;

  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-device-'));
    base = await upload('1.0.0', 64 * 1024, 1);
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.stop()));
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  /** Streams a generated image through the CLI's upload path (node:http, backpressure). */
  async function upload(
    version: string,
    size: number,
    seed: number,
    query: Record<string, string> = {},
  ): Promise<{ id: string; version: string; sha256: string; size: number }> {
    const body = await uploadFirmwareStream({
      client: { url: server.apiUrl, token: server.adminToken },
      query: { product: server.productId, version, ...query },
      source: Readable.from(imageChunks(size, seed)),
    });
    return body as { id: string; version: string; sha256: string; size: number };
  }

  /** The operator API as the admin; throws on a non-2xx answer. */
  async function call(method: string, url: string, body?: unknown): Promise<unknown> {
    const res = await fetch(`${server.apiUrl}${url}`, {
      method,
      headers: {
        authorization: `Bearer ${server.adminToken}`,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${url} → ${res.status} ${text}`);
    return text ? JSON.parse(text) : undefined;
  }

  function nextVersion(): string {
    versionCounter++;
    return `2.${versionCounter}.0`;
  }

  async function device(serial: string, extra: Partial<DeviceClientOptions> = {}): Promise<DeviceClient> {
    const cred = await deviceCert(serial);
    const pki = await getTestPki();
    const client = new DeviceClient({
      url: `${server.deviceUrl.replace(/^https/, 'wss')}/socket`,
      tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
      stateDir: path.join(tmp, serial),
      firmware: { uuid: base.id, version: base.version },
      downloadRetryDelayMs: () => 50,
      ...extra,
    });
    clients.push(client);
    const joined = next(client, 'joined');
    await client.start();
    await joined;
    return client;
  }

  async function target(serial: string, firmwareId: string): Promise<void> {
    await call('PUT', `/api/v1/orgs/${server.orgId}/devices/${serial}/target`, { firmware_id: firmwareId });
  }

  async function attempts(serial: string): Promise<Array<{ state: string; to_version: string; errors: string[] }>> {
    return server.database.db
      .selectFrom('update_attempts')
      .innerJoin('devices', 'devices.id', 'update_attempts.device_id')
      .select(['update_attempts.state', 'update_attempts.to_version', 'update_attempts.errors'])
      .where('devices.identifier', '=', serial)
      .orderBy('update_attempts.created_at')
      .execute();
  }

  async function deviceRow(serial: string) {
    return server.database.db
      .selectFrom('devices')
      .selectAll()
      .where('identifier', '=', serial)
      .executeTakeFirstOrThrow();
  }

  /** Resolves when the server marks the attempt to `version` finished one way or another. */
  async function settled(serial: string, version: string, timeoutMs = 30_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const a = (await attempts(serial)).filter((x) => x.to_version === version).at(-1);
      if (a && ['succeeded', 'failed', 'rolled_back'].includes(a.state)) return a.state;
      if (Date.now() > deadline) throw new Error(`attempt of ${serial} to ${version} still ${a?.state ?? 'absent'}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  test('a retargeted group of devices downloads, verifies, installs and reconnects on the new firmware uuid', async () => {
    const fw = await upload(nextVersion(), 512 * 1024, 2);
    const serials = ['group-0', 'group-1', 'group-2', 'group-3', 'group-4'];
    const devices = await Promise.all(serials.map((s) => device(s)));
    await call('POST', `/api/v1/orgs/${server.orgId}/groups`, { product: server.productId, name: 'canary' });
    await call('POST', `/api/v1/orgs/${server.orgId}/groups/canary/devices`, { devices: serials });
    const rebooted = devices.map((d) => next(d, 'rebooted'));
    const rejoined = devices.map(
      (d) => new Promise<void>((resolve) => d.on('joined', ({ topic }) => topic === `device:${fw.id}` && resolve())),
    );
    await call('PUT', `/api/v1/orgs/${server.orgId}/groups/canary/target`, { firmware_id: fw.id });
    await Promise.all(rebooted);
    await Promise.all(rejoined);
    for (const [i, serial] of serials.entries()) {
      assert.deepEqual(devices[i]!.running, { uuid: fw.id, version: fw.version });
      assert.equal(await settled(serial, fw.version), 'succeeded');
      const row = await deviceRow(serial);
      assert.equal(row.firmware_uuid, fw.id);
      assert.equal(row.firmware_version, fw.version);
    }
    // The image really sits in the new slot and the old one is still there.
    const slots = new SlotInstaller(path.join(tmp, 'group-0'));
    assert.ok(existsSync(slots.slotPath('b')));
  });

  test('progress is reported to the server at most about once a second', async () => {
    const fw = await upload(nextVersion(), 384 * 1024, 3);
    // ~3 s at 1 Mbit/s: enough time for several progress reports.
    const client = await device('progress-0', { faults: () => ({ kbps: 1024 }) });
    const times: number[] = [];
    client.on('reported', ({ event }) => {
      if (event === 'firmware_update_progress') times.push(Date.now());
    });
    const done = next(client, 'rebooted');
    await target('progress-0', fw.id);
    await done;
    assert.ok(times.length >= 2, `only ${times.length} progress reports`);
    for (let i = 1; i < times.length; i++)
      assert.ok(times[i]! - times[i - 1]! >= 990, `two reports ${times[i]! - times[i - 1]!} ms apart`);
    assert.equal(await settled('progress-0', fw.version), 'succeeded');
  });

  test('a download cut mid-stream resumes with Range and fetches less than 1.5 times the image', async () => {
    const size = 4 * MiB;
    const fw = await upload(nextVersion(), size, 4);
    const client = await device('resume-0', { faults: () => ({ dropAfterBytes: Math.floor(size * 0.6) }) });
    const finished = next(client, 'update_finished');
    await target('resume-0', fw.id);
    const [info] = (await finished) as [{ bytesFetched: number; attempts: number }];
    assert.ok(info.attempts >= 2, `attempts ${info.attempts}`);
    assert.ok(info.bytesFetched < 1.5 * size, `fetched ${info.bytesFetched} of ${size}`);
    assert.equal(await settled('resume-0', fw.version), 'succeeded');
  });

  test('a blob corrupted on disk fails the sha256 check, is reported, and the device keeps its version', async () => {
    const fw = await upload(nextVersion(), 300 * 1024, 5);
    const file = server.blobs.pathOf(fw.sha256);
    const fd = openSync(file, 'r+');
    const byte = Buffer.alloc(1);
    readSync(fd, byte, 0, 1, 1000);
    writeSync(fd, Buffer.from([byte[0]! ^ 0xff]), 0, 1, 1000);
    closeSync(fd);
    const client = await device('corrupt-0');
    const failed = next(client, 'update_error');
    await target('corrupt-0', fw.id);
    const [report] = (await failed) as [{ errors: string[] }];
    assert.match(report.errors[0]!, /sha256 mismatch/);
    assert.equal(await settled('corrupt-0', fw.version), 'failed');
    const attempt = (await attempts('corrupt-0')).at(-1)!;
    assert.match(attempt.errors[0]!, /sha256 mismatch/);
    assert.deepEqual(client.running, { uuid: base.id, version: base.version });
    assert.equal((await deviceRow('corrupt-0')).firmware_version, base.version);
  });

  test('a signature from a key the device does not trust is refused by the device', async () => {
    const signer = generateSigningKeyPair();
    await call('POST', `/api/v1/products/${server.productId}/signing-keys`, {
      name: 'ci',
      public_key_pem: signer.publicKeyPem,
    });
    const size = 100 * 1024;
    const { createHash } = await import('node:crypto');
    const hash = createHash('sha256');
    for await (const c of imageChunks(size, 6)) hash.update(c);
    const fw = await upload(nextVersion(), size, 6, {
      signature: signFirmwareDigest(hash.digest('hex'), signer.privateKeyPem),
    });
    const trusted = generateSigningKeyPair();
    const client = await device('sig-0', { signingKeys: [trusted.publicKeyPem] });
    const failed = next(client, 'update_error');
    await target('sig-0', fw.id);
    const [report] = (await failed) as [{ errors: string[] }];
    assert.match(report.errors[0]!, /signature/);
    assert.equal(await settled('sig-0', fw.version), 'failed');
    assert.deepEqual(client.running, { uuid: base.id, version: base.version });
  });

  test('an expired download URL is refused with 403 and the device rejoins for a fresh one', async () => {
    const fw = await upload(nextVersion(), 128 * 1024, 7);
    const original = server.fleet.firmwareUrl;
    let handedOutExpired = 0;
    server.fleet.firmwareUrl = (f) => {
      if (f.id === fw.id && handedOutExpired === 0) {
        handedOutExpired++;
        return signDownloadUrl({
          baseUrl: server.deviceUrl,
          secret: server.secret,
          grant: { route: 'firmware', firmwareId: f.id },
          expiresAt: new Date(Date.now() - 60_000),
        });
      }
      return original(f);
    };
    try {
      const client = await device('expired-0');
      const refused = next(client, 'url_refused');
      const done = next(client, 'rebooted');
      await target('expired-0', fw.id);
      await refused;
      await done;
      assert.equal(handedOutExpired, 1);
      assert.equal(await settled('expired-0', fw.version), 'succeeded');
    } finally {
      server.fleet.firmwareUrl = original;
    }
  });

  test('a device ignores a firmware_update for the version it already runs', async () => {
    const client = await device('same-0');
    const row = await deviceRow('same-0');
    const ignored = next(client, 'update_ignored');
    await server.fleet.bus.publish(`device_id:${row.id}`, 'firmware_update', {
      url: `${server.deviceUrl}/firmware/${base.id}`,
      version: base.version,
      sha256: 'f'.repeat(64),
      size: 1,
      firmware_uuid: base.id,
    });
    const [info] = (await ignored) as [{ reason: string }];
    assert.equal(info.reason, 'running');
    assert.equal(client.updating, null);
  });

  test('a 100 MiB image streams through upload and download with bounded memory', async () => {
    const size = 100 * MiB;
    global.gc?.();
    const rss0 = process.memoryUsage().rss;
    let peak = rss0;
    const sampler = setInterval(() => {
      peak = Math.max(peak, process.memoryUsage().rss);
    }, 20);
    try {
      const t0 = Date.now();
      const fw = await upload(nextVersion(), size, 8);
      const uploadSeconds = (Date.now() - t0) / 1000;
      const client = await device('big-0');
      const finished = next(client, 'update_finished');
      const t1 = Date.now();
      await target('big-0', fw.id);
      await finished;
      const downloadSeconds = (Date.now() - t1) / 1000;
      assert.equal(await settled('big-0', fw.version, 120_000), 'succeeded');
      const growth = peak - rss0;
      process.stdout.write(
        `# 100 MiB: upload ${(100 / uploadSeconds).toFixed(1)} MiB/s, update (download+verify+install) ${(100 / downloadSeconds).toFixed(1)} MiB/s over mTLS loopback; peak RSS growth ${(growth / MiB).toFixed(1)} MiB\n`,
      );
      assert.ok(growth < 40 * MiB, `RSS grew by ${(growth / MiB).toFixed(1)} MiB while moving a 100 MiB image twice`);
    } finally {
      clearInterval(sampler);
    }
  });

  test('the device client does a full handshake after a 403 on a resumed session', async () => {
    const serial = 'stale-session-0';
    const sessions = new Map<string, Buffer>();
    // Whether each TLS connection of this device resumed a session, in order (server side).
    const resumed: boolean[] = [];
    const onSecure = (socket: TLSSocket) => {
      const peer = socket.getPeerCertificate();
      if (peer?.subject?.CN === serial) resumed.push(socket.isSessionReused());
    };
    server.deviceListener.app.server.on('secureConnection', onSecure);
    try {
      await device(serial, { sessionCache: sessions, sessionKey: serial, reconnectAfterMs: () => 100 });
      await until(() => sessions.has(serial), 'a TLS session ticket cached');
      const row = await server.database.db
        .selectFrom('device_certificates')
        .innerJoin('devices', 'devices.id', 'device_certificates.device_id')
        .select(['devices.id as device_id', 'device_certificates.id as certificate_id'])
        .where('devices.identifier', '=', serial)
        .executeTakeFirstOrThrow();
      const before = resumed.length;
      await call(
        'POST',
        `/api/v1/orgs/${server.orgId}/devices/${row.device_id}/certificates/${row.certificate_id}/revoke`,
      );
      await until(() => resumed.length >= before + 2, `two reconnect attempts (${JSON.stringify(resumed)})`);
      const [first, second] = resumed.slice(before);
      assert.equal(first, true, 'the first reconnect resumed the cached session (and was refused with 403)');
      assert.equal(second, false, 'after the 403 the client dropped the session: a full handshake');
      assert.equal(sessions.has(serial), false);
    } finally {
      server.deviceListener.app.server.off('secureConnection', onSecure);
    }
  });
});
