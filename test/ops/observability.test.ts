/**
 * What an on-call engineer sees, against the whole server: `/metrics` scraped and parsed, the
 * log lines of a device's story (connect, update transition, firmware download, disconnect) and
 * of refusals (TLS handshake, upgrade) on a captured pino stream, request lines at debug only,
 * no duplicate keys in a line, liveness and readiness (503 while draining).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import https from 'node:https';
import { Writable } from 'node:stream';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import type { Channel, Socket } from 'phoenix';
import { createLogger, rateLimitedWarning } from '../../server/log.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, nextEvent, openSocket, pushAndWait } from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { parseMetrics } from '../helpers/prometheus.ts';
import { until } from '../helpers/until.ts';

type Line = Record<string, unknown> & { msg?: string; level: number };

/** A pino destination that keeps every line (raw text and parsed). */
function capture(): { stream: Writable; raw: string[]; lines: Line[] } {
  const raw: string[] = [];
  const lines: Line[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const text of String(chunk).split('\n').filter(Boolean)) {
        raw.push(text);
        lines.push(JSON.parse(text) as Line);
      }
      done();
    },
  });
  return { stream, raw, lines };
}

/** The keys of a JSON object's top level, in order, duplicates included (JSON.parse keeps only the last). */
function topLevelKeys(json: string): string[] {
  const keys: string[] = [];
  let depth = 0;
  for (let i = 0; i < json.length; i++) {
    const c = json[i];
    if (c === '"') {
      let j = i + 1;
      while (json[j] !== '"') j += json[j] === '\\' ? 2 : 1;
      if (depth === 1 && json[j + 1] === ':') keys.push(json.slice(i + 1, j));
      i = j;
    } else if (c === '{' || c === '[') depth++;
    else if (c === '}' || c === ']') depth--;
  }
  return keys;
}

describe(`metrics and logs (${DATABASE_KIND})`, () => {
  let server: TestServer;
  const log = capture();
  const sockets: Socket[] = [];
  const serial = `obs-${randomBytes(3).toString('hex')}`;

  before(async () => {
    server = await startTestServer(
      { metricsToken: 'scrape-secret-1234' },
      { log: createLogger({ level: 'info', destination: log.stream }) },
    );
  });
  after(async () => {
    await Promise.allSettled(sockets.map((s) => disconnectSocket(s)));
    await server?.close();
  });

  async function scrape(token = 'scrape-secret-1234') {
    const res = await fetch(`${server.apiUrl}/metrics`, { headers: { authorization: `Bearer ${token}` } });
    return { status: res.status, type: res.headers.get('content-type') ?? '', text: await res.text() };
  }
  const sample = async (name: string, labels: Record<string, string> = {}) =>
    parseMetrics((await scrape()).text).find(
      (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
    )?.value;
  const logged = (msg: string, match: (l: Line) => boolean = () => true) =>
    until(() => log.lines.find((l) => l.msg === msg && match(l)), `a "${msg}" log line`);

  test('/metrics needs the metrics token when one is configured, and serves the Prometheus text format', async () => {
    assert.equal((await fetch(`${server.apiUrl}/metrics`)).status, 401);
    assert.equal((await scrape('wrong')).status, 401);
    const res = await scrape();
    assert.equal(res.status, 200);
    assert.match(res.type, /^text\/plain; version=0\.0\.4/);
    const names = new Set(parseMetrics(res.text).map((s) => s.name));
    for (const name of [
      'process_resident_memory_bytes',
      'nodejs_heap_size_used_bytes',
      'nodejs_eventloop_lag_seconds',
      'fleethub_pubsub_published_total',
      'fleethub_pubsub_received_total',
      'fleethub_db_pool_wait_seconds_count',
      'fleethub_fanout_seconds_count',
    ])
      assert.ok(names.has(name), `${name} is exported`);
    assert.ok(((await sample('fleethub_db_pool_wait_seconds_count')) ?? 0) > 0, 'queries waited for the pool');
  });

  let device: { socket: Socket; channel: Channel };
  let firmware: { id: string; version: string; size: number };

  test('a device joining is one "device connected" line, a join counted, and a connected device by protocol and node', async () => {
    firmware = await uploadFirmware('1.0.0');
    const socket = await openSocket(`${server.deviceUrl.replace(/^https/, 'wss')}/socket`, {
      tls: await deviceTlsOptions(await deviceCert(serial)),
    });
    sockets.push(socket);
    const channel = socket.channel(`device:${firmware.id}`, {});
    await joinChannel(channel);
    device = { socket, channel };
    const line = await logged('device connected', (l) => l.protocol === 'phoenix');
    assert.equal(line.node, server.config.nodeName);
    assert.equal(line.firmware_version, '1.0.0');
    assert.equal(await sample('fleethub_device_joins_total', { protocol: 'phoenix' }), 1);
    assert.equal(await sample('fleethub_connected_devices', { protocol: 'phoenix', node: server.config.nodeName }), 1);
  });

  test('an update is logged per transition (not per progress report), its download with bytes and duration', async () => {
    const v2 = await uploadFirmware('2.0.0');
    const me = (
      await server.call<{ items: { id: string; identifier: string }[] }>('GET', '/api/v1/orgs/default/devices')
    ).items;
    const deviceId = me.find((d) => d.identifier === serial)!.id;
    const update = nextEvent(device.channel, 'firmware_update');
    await server.call('PUT', `/api/v1/orgs/default/devices/${deviceId}/target`, { version: '2.0.0' });
    const payload = (await update) as { url: string; size: number };
    await logged('update sent', (l) => l.device_id === deviceId && l.version === '2.0.0');

    assert.equal((await pushAndWait(device.channel, 'firmware_update_begin', { version: '2.0.0' })).status, 'ok');
    for (const percent of [10, 20, 30])
      await pushAndWait(device.channel, 'firmware_update_progress', {
        version: '2.0.0',
        percent,
        bytes: Math.floor((v2.size * percent) / 100),
        total: v2.size,
      });
    await logged('update transition', (l) => l.device_id === deviceId && l.state === 'downloading');
    const transitions = log.lines.filter((l) => l.msg === 'update transition' && l.device_id === deviceId);
    assert.deepEqual(
      transitions.map((l) => l.state),
      ['begun', 'downloading'],
    );
    assert.ok(
      ((await sample('fleethub_report_ingest_seconds_count', { event: 'firmware_update_progress' })) ?? 0) >= 3,
    );
    assert.equal(await sample('fleethub_update_attempts', { state: 'downloading' }), 1);

    // The download, over the device's own TLS identity.
    const bytes = await new Promise<number>((resolve, reject) => {
      void deviceTlsOptions().then(async (base) => {
        const cred = await deviceCert(serial);
        https
          .get(payload.url, { ...base, cert: cred.certPem, key: cred.keyPem }, (res) => {
            let n = 0;
            res.on('data', (c: Buffer) => (n += c.length));
            res.on('end', () => resolve(n));
          })
          .on('error', reject);
      }, reject);
    });
    assert.equal(bytes, v2.size);
    const line = await logged('firmware download', (l) => l.completed === true);
    assert.equal(line.bytes, v2.size);
    assert.equal(typeof line.duration_ms, 'number');
    assert.equal(line.listener, 'device');
    assert.equal(await sample('fleethub_firmware_downloads_total', { completed: 'true' }), 1);
  });

  test('a refused TLS handshake and a refused upgrade are each logged with the reason and counted', async () => {
    // The device listener speaks TLS 1.3 only.
    const socket = tls.connect({
      host: '127.0.0.1',
      port: Number(new URL(server.deviceUrl).port),
      maxVersion: 'TLSv1.2',
      rejectUnauthorized: false,
    });
    await new Promise((resolve) => socket.on('error', () => undefined).once('close', resolve));
    const line = await logged('TLS handshake refused');
    assert.equal(typeof line.reason, 'string');
    assert.equal(line.occurrences, 1);
    assert.ok(
      parseMetrics((await scrape()).text).some(
        (s) => s.name === 'fleethub_refused_handshakes_total' && s.labels.stage === 'tls',
      ),
    );

    // No client certificate: refused at the upgrade.
    const status = await new Promise<number>((resolve, reject) => {
      void deviceTlsOptions().then((base) =>
        https
          .get(`${server.deviceUrl}/socket/websocket`, base, (res) => {
            res.resume();
            resolve(res.statusCode ?? 0);
          })
          .on('error', reject),
      );
    });
    assert.equal(status, 401);
    await logged('device connection refused', (l) => l.reason === 'no client certificate presented');
    assert.equal(
      await sample('fleethub_refused_handshakes_total', {
        stage: 'upgrade',
        reason: 'no client certificate presented',
      }),
      1,
    );
  });

  test('request lines are at debug, and no line repeats a key', async () => {
    await server.call('GET', '/api/v1/orgs');
    const requestLines = log.lines.filter((l) => l.msg === 'incoming request' || l.msg === 'request completed');
    assert.deepEqual(requestLines, []);
    const repeated = log.raw
      .map((text) => ({ text, keys: topLevelKeys(text) }))
      .filter(({ keys }) => new Set(keys).size !== keys.length);
    assert.deepEqual(
      repeated.map((r) => r.text),
      [],
    );
    assert.ok(
      log.lines.some((l) => l.listener === 'device'),
      'device listener lines were captured',
    );
  });

  test('a device disconnecting is one "device disconnected" line with the reason and how long it was connected', async () => {
    await disconnectSocket(device.socket);
    const line = await logged('device disconnected', (l) => l.protocol === 'phoenix');
    assert.equal(typeof line.reason, 'string');
    assert.ok(typeof line.connected_ms === 'number' && line.connected_ms >= 0);
    assert.equal(await sample('fleethub_device_disconnects_total', { protocol: 'phoenix' }), 1);
  });

  test('liveness stays up while draining; readiness answers 503', async () => {
    for (const path of ['/livez', '/readyz', '/healthz'])
      assert.equal((await fetch(`${server.apiUrl}${path}`)).status, 200, path);
    await server.drain();
    assert.equal((await fetch(`${server.apiUrl}/livez`)).status, 200);
    const ready = await fetch(`${server.apiUrl}/readyz`);
    assert.equal(ready.status, 503);
    assert.deepEqual(await ready.json(), { status: 'unavailable' });
  });

  async function uploadFirmware(version: string): Promise<{ id: string; version: string; size: number }> {
    const qs = new URLSearchParams({ product: server.productId, version });
    const res = await fetch(`${server.apiUrl}/api/v1/firmware?${qs}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
      body: randomBytes(48 * 1024),
    });
    assert.equal(res.status, 201, await res.clone().text());
    return (await res.json()) as { id: string; version: string; size: number };
  }
});

describe('repeated warnings', () => {
  test('are logged once per key and interval, with how often they happened', () => {
    const { stream, lines } = capture();
    const log = createLogger({ level: 'info', destination: stream });
    const warn = rateLimitedWarning(log, 'key pending', 60_000);
    for (let i = 0; i < 5; i++) warn('key-a', { fingerprint: 'a' });
    warn('key-b', { fingerprint: 'b' });
    assert.deepEqual(
      lines.map((l) => [l.msg, l.fingerprint, l.occurrences]),
      [
        ['key pending', 'a', 1],
        ['key pending', 'b', 1],
      ],
    );
    // Once the interval is over, the next line of a key says how often it happened since the last one.
    let now = 0;
    const counted = rateLimitedWarning(log, 'retrying', 60_000, 'warn', () => now);
    for (let i = 0; i < 7; i++) counted('k');
    now = 60_000;
    counted('k');
    assert.deepEqual(
      lines.filter((l) => l.msg === 'retrying').map((l) => l.occurrences),
      [1, 7],
    );
  });
});
