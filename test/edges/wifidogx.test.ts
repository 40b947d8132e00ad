/**
 * The WiFiDogX edge against the real server: real sockets, the simulated gateway with the real
 * client's 1024-byte reader (device-client/simulators/wifidogx.ts), the real firmware store.
 * Every server frame each gateway read is checked: under 1000 bytes, one per read.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { wifidogxEdgeOf } from '../../server/edges/wifidogx/index.ts';
import { sweepStaleUpdates } from '../../server/fleet/index.ts';
import {
  gatewayReplies,
  gatewayVersion,
  isSafeFirmwareUrl,
  MAX_FRAME_BYTES,
} from '../../server/edges/wifidogx/frames.ts';
import { simulatorImage, WifidogxGateway } from '../../device-client/simulators/wifidogx.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { type LogLine, startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';
import { createLogger } from '../../server/log.ts';
import WebSocket from 'ws';

let server: TestServer;
/** The server's log lines (debug and up: request lines are at debug). */
const logs: LogLine[] = [];
const gateways: WifidogxGateway[] = [];

function gateway(o: Partial<ConstructorParameters<typeof WifidogxGateway>[0]> = {}): WifidogxGateway {
  const g = new WifidogxGateway({
    url: `${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`,
    deviceId: `gw-${randomBytes(4).toString('hex')}`,
    version: '1.0.0',
    reconnectMs: 100,
    ...o,
  });
  gateways.push(g);
  return g;
}

const deviceOf = (g: WifidogxGateway) =>
  server.database.db.selectFrom('devices').selectAll().where('identifier', '=', g.o.deviceId).executeTakeFirst();
const base = (g: WifidogxGateway) => `/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}`;
const types = (g: WifidogxGateway) => g.received.map((m) => m.type);

async function approved(o: Partial<ConstructorParameters<typeof WifidogxGateway>[0]> = {}): Promise<WifidogxGateway> {
  const g = gateway(o);
  await g.start();
  await until(async () => (await deviceOf(g))?.approval === 'pending', 'registered pending');
  // Approval issues the gateway its credential; it is served once it connects with it.
  const { credential } = await server.call<{ credential: { token: string } }>('POST', `${base(g)}/approve`);
  g.useCredential(credential.token);
  await until(async () => (await deviceOf(g))?.firmware_version === g.version, 'version recorded');
  return g;
}

async function uploadImage(version: string, image = simulatorImage(version)) {
  const res = await fetch(
    `${server.apiUrl}/api/v1/firmware?product=${server.productId}&org=${server.orgId}&version=${version}`,
    {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
      body: new Uint8Array(image),
    },
  );
  assert.equal(res.status, 201, await res.clone().text());
  return (await res.json()) as { id: string };
}

/** Waits until the device's update attempt is in `state`. */
async function untilAttemptState(deviceId: string, state: string, what: string): Promise<void> {
  await until(
    async () =>
      (
        await server.database.db
          .selectFrom('update_attempts')
          .select('state')
          .where('device_id', '=', deviceId)
          .executeTakeFirst()
      )?.state === state,
    what,
  );
}

/** A gateway command as the API shows it. */
interface Command {
  id: string;
  status: string;
  error?: string;
  response: { message?: string; data?: Record<string, string> };
}

describe(`WiFiDogX edge (${DATABASE_KIND})`, () => {
  before(async () => {
    server = await startTestServer(
      {},
      {
        log: createLogger({
          level: 'debug',
          destination: { write: (line: string) => void logs.push(JSON.parse(line)) },
        }),
      },
    );
  });
  after(async () => {
    for (const g of gateways) {
      await g.stop();
      // Whatever each gateway read over the whole file: never oversize, never two per read.
      assert.deepEqual(g.violations, [], `gateway ${g.o.deviceId}`);
      for (const size of g.frameSizes) assert.ok(size < MAX_FRAME_BYTES, `a ${size}-byte frame`);
    }
    await server.close();
  });

  it('answers the upgrade with a 101 under 1000 bytes, without compression', async () => {
    const g = gateway();
    await g.start();
    assert.ok(
      g.upgradeResponseBytes > 0 && g.upgradeResponseBytes < MAX_FRAME_BYTES,
      `${g.upgradeResponseBytes} bytes`,
    );
  });

  it('records an unknown device_id as pending and sends it nothing at all', async () => {
    const g = gateway();
    await g.start();
    const device = await until(async () => deviceOf(g), 'registered');
    assert.equal(device.approval, 'pending');
    assert.equal(device.protocol, 'wifidogx');
    await until(async () => (await deviceOf(g))?.connection_status === 'online', 'online');
    await new Promise((r) => setTimeout(r, 400));
    assert.deepEqual(g.received, []);
    // Commands to a pending device are refused.
    const res = await fetch(`${server.apiUrl}${base(g)}/commands`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ type: 'get_firmware_info' }),
    });
    assert.equal(res.status, 409);
    assert.deepEqual(g.received, []);
  });

  it('after approval replies with the gateways and integer auth modes, then learns the firmware version', async () => {
    const g = await approved({
      gateways: [
        { gw_id: 'gw-a', auth_mode: 2 },
        { gw_id: 'gw-b', auth_mode: 0 },
      ],
    });
    const reply = g.received.find((m) => m.type === 'connect')!;
    assert.deepEqual(reply.gateway, [
      { gw_id: 'gw-a', auth_mode: 2 },
      { gw_id: 'gw-b', auth_mode: 0 },
    ]);
    assert.equal(reply.op, 'connect');
    assert.equal(typeof reply.req_id, 'string');
    assert.ok(types(g).includes('get_firmware_info'));
    const state = await server.call<{
      gateway: { firmware_info: Record<string, string>; device_info: Record<string, string> };
    }>('GET', base(g));
    assert.equal(state.gateway.firmware_info.DISTRIB_RELEASE, '1.0.0');
    assert.equal(state.gateway.device_info.location_id, 'lab');
  });

  it('answers every heartbeat with the operator auth-mode settings, and pushes a change at once', async () => {
    const g = await approved({ heartbeatMs: 300 });
    await server.call('PUT', `${base(g)}/gateways/gw-1/auth-mode`, { auth_mode: 3 });
    await until(() => g.authModes.get('gw-1') === 3, 'auth mode applied');
    const before = g.received.filter((m) => m.type === 'heartbeat').length;
    await until(() => g.received.filter((m) => m.type === 'heartbeat').length >= before + 2, 'heartbeat replies');
    const last = g.received.filter((m) => m.type === 'heartbeat').pop()!;
    assert.deepEqual(last.gateway, [{ gw_id: 'gw-1', auth_mode: 3 }]);
  });

  it('splits a gateway reply that cannot fit one frame into several frames', () => {
    const many = Array.from({ length: 40 }, (_, i) => ({ gw_id: `gateway-with-a-long-identifier-${i}`, auth_mode: i }));
    const { frames, dropped } = gatewayReplies('heartbeat', 'r1', many);
    assert.ok(frames.length > 1);
    assert.deepEqual(dropped, []);
    const all = frames.flatMap((f) => {
      assert.ok(f.length + 4 < MAX_FRAME_BYTES);
      return (JSON.parse(f.toString()) as { gateway: unknown[] }).gateway;
    });
    assert.deepEqual(all, many);
  });

  it('refuses, with a logged error, a message that cannot fit in a frame, sending nothing', async () => {
    const g = await approved();
    const device = (await deviceOf(g))!;
    const conn = wifidogxEdgeOf(server.api)!.connections.get(device.id)!;
    const count = g.received.length;
    assert.equal(conn.send({ type: 'auth', token: 'x'.repeat(1200) }), false);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(g.received.length, count);
  });

  it('sends operator commands and records the responses and errors', async () => {
    const g = await approved();
    g.addClient('aa:bb:cc:dd:ee:01');
    const auth = await server.call<Command>('POST', `${base(g)}/commands`, {
      type: 'auth',
      token: 'tok123',
      client_ip: '10.0.0.5',
      client_mac: 'aa:bb:cc:dd:ee:02',
      gw_id: 'gw-1',
      once_auth: false,
    });
    const kick = await server.call<Command>('POST', `${base(g)}/commands`, {
      type: 'kickoff',
      client_ip: '10.0.0.4',
      client_mac: 'aa:bb:cc:dd:ee:01',
      gw_id: 'gw-1',
    });
    const kickMissing = await server.call<Command>('POST', `${base(g)}/commands`, {
      type: 'kickoff',
      client_ip: '10.0.0.9',
      client_mac: 'aa:bb:cc:dd:ee:09',
      gw_id: 'gw-1',
    });
    const tmp = await server.call<Command>('POST', `${base(g)}/commands`, {
      type: 'tmp_pass',
      client_mac: 'aa:bb:cc:dd:ee:03',
    });
    const info = await server.call<Command>('POST', `${base(g)}/commands`, { type: 'get_firmware_info' });
    const byId = async () =>
      new Map((await server.call<{ items: Command[] }>('GET', `${base(g)}/commands`)).items.map((c) => [c.id, c]));
    const done = await until(async () => {
      const m = await byId();
      return [auth, kick, kickMissing, tmp, info].every(
        (c) => !['queued', 'sent'].includes(m.get(c.id)?.status ?? 'queued'),
      )
        ? m
        : undefined;
    }, 'commands settled');
    assert.equal(done.get(auth.id)!.status, 'delivered');
    assert.equal(done.get(tmp.id)!.status, 'delivered');
    assert.equal(done.get(kick.id)!.status, 'succeeded');
    assert.equal(done.get(kick.id)!.response.message, 'Client kicked off successfully');
    assert.equal(done.get(kickMissing.id)!.status, 'failed');
    assert.equal(done.get(kickMissing.id)!.error, 'Client not found');
    assert.equal(done.get(info.id)!.status, 'succeeded');
    assert.equal(done.get(info.id)!.response.data!.DISTRIB_RELEASE, '1.0.0');
    const sentTmp = g.received.find((m) => m.type === 'tmp_pass')!;
    assert.equal(sentTmp.timeout, 300);
    assert.equal(sentTmp.op, 'tmp_pass');
    assert.equal(typeof sentTmp.req_id, 'string');
  });

  it('refuses a shell-unsafe firmware_upgrade URL before sending anything', async () => {
    const g = await approved();
    const count = g.received.length;
    for (const url of [
      'http://x/a;reboot',
      'http://x/$(id)',
      'http://x/a?b=c',
      'http://x/a b',
      `http://x/${'a'.repeat(500)}`,
      'ftp://x/a',
      "http://x/a'b",
    ]) {
      const res = await fetch(`${server.apiUrl}${base(g)}/commands`, {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
        body: JSON.stringify({ type: 'firmware_upgrade', url }),
      });
      assert.equal(res.status, 400, url);
    }
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(g.received.length, count);
    assert.equal(isSafeFirmwareUrl('http://127.0.0.1:4000/fw/0b6c/1700000000/abcdef'), true);
  });

  it('upgrades on a target change and marks success when the gateway returns on the target version', async () => {
    const g = await approved();
    const device = (await deviceOf(g))!;
    const fw = await uploadImage('2.0.0');
    await server.call('PUT', `/api/v1/orgs/${server.orgId}/devices/${device.id}/target`, { firmware_id: fw.id });
    await until(async () => (await deviceOf(g))?.firmware_version === '2.0.0', 'back on 2.0.0');
    const upgrade = g.received.find((m) => m.type === 'firmware_upgrade')!;
    assert.equal(String(upgrade.url).split('/')[5], device.id, 'the URL names the gateway');
    assert.match(
      String(upgrade.url),
      /^http:\/\/127\.0\.0\.1:\d+\/fw\/[0-9a-f-]{36}\/[0-9a-f-]{36}\/\d+\/[0-9a-f]{64}$/,
    );
    assert.equal(upgrade.force, false);
    const attempt = await until(async () => {
      const a = await server.database.db
        .selectFrom('update_attempts')
        .selectAll()
        .where('device_id', '=', device.id)
        .executeTakeFirst();
      return a?.state === 'succeeded' ? a : undefined;
    }, 'succeeded');
    assert.equal(attempt.via, 'edge:wifidogx');
  });

  it('sends firmware_upgrade once while the gateway works on it, whatever it reports meanwhile', async () => {
    // The gateway fetches the image and then says nothing (a slow sysupgrade); an operator's
    // get_firmware_info answer in between reports the old version again: before, that answer
    // started a second firmware_upgrade on the same connection.
    const g = await approved({ bad: { version: '2.5.0', mode: 'hang' } });
    const device = (await deviceOf(g))!;
    const fw = await uploadImage('2.5.0');
    await server.call('PUT', `/api/v1/orgs/${server.orgId}/devices/${device.id}/target`, { firmware_id: fw.id });
    await until(async () => types(g).includes('firmware_upgrade'), 'firmware_upgrade sent');
    // Two answers, one after the other: each is handled in the link's order, so once the second
    // is recorded, whatever the first one started has been sent.
    for (let i = 0; i < 2; i++) {
      const info = await server.call<Command>('POST', `${base(g)}/commands`, { type: 'get_firmware_info' });
      await until(async () => {
        const { items } = await server.call<{ items: Command[] }>('GET', `${base(g)}/commands`);
        return items.find((c) => c.id === info.id)?.status === 'succeeded';
      }, 'get_firmware_info answered');
    }
    assert.equal(types(g).filter((t) => t === 'firmware_upgrade').length, 1, JSON.stringify(types(g)));
    // Leave no open attempt behind for the timeout sweep of later tests.
    await server.call('DELETE', `/api/v1/orgs/${server.orgId}/devices/${device.id}/target`);
    await untilAttemptState(device.id, 'cancelled', 'the hung attempt cancelled');
    await g.stop();
  });

  describe('firmware URLs are bound to their gateway and its approval', () => {
    const download = (url: string, init: RequestInit = {}) => fetch(url, init);
    const error = async (res: Response) => ((await res.json()) as { error: { code: string; message: string } }).error;
    /** An approved gateway, an image uploaded as `version`, and the gateway's signed URL for it. */
    async function gatewayWithUrl(version: string, image = simulatorImage(version)) {
      const g = await approved();
      const device = (await deviceOf(g))!;
      const fw = await uploadImage(version, image);
      const url = wifidogxEdgeOf(server.api)!.firmwareUrl(fw, device.id);
      return { g, device, fw, url, sig: url.split('/').pop()! };
    }

    it('serves an approved gateway its URL with Range, HEAD and ETag as before', async () => {
      const image = simulatorImage('3.0.0');
      const { url } = await gatewayWithUrl('3.0.0', image);
      assert.ok(isSafeFirmwareUrl(url), url);
      const part = await download(url, { headers: { range: 'bytes=10-19' } });
      assert.equal(part.status, 206);
      assert.equal(part.headers.get('content-range'), `bytes 10-19/${image.length}`);
      assert.deepEqual(Buffer.from(await part.arrayBuffer()), image.subarray(10, 20));
      const head = await download(url, { method: 'HEAD' });
      assert.equal(head.status, 200);
      assert.equal(head.headers.get('content-length'), String(image.length));
      assert.match(head.headers.get('etag') ?? '', /^"[0-9a-f]{64}"$/);
      assert.equal((await download(url, { headers: { range: `bytes=${image.length}-` } })).status, 416);
    });

    it('refuses a URL signed for gateway A with A’s id swapped for B’s (403)', async () => {
      const [a, b] = [await approved(), await approved()];
      const [devA, devB] = [(await deviceOf(a))!, (await deviceOf(b))!];
      const fw = await uploadImage('3.0.1');
      const urlA = wifidogxEdgeOf(server.api)!.firmwareUrl(fw, devA.id);
      assert.equal((await download(urlA, { method: 'HEAD' })).status, 200);
      const swapped = urlA.replace(`/${devA.id}/`, `/${devB.id}/`);
      assert.notEqual(swapped, urlA, 'the URL names gateway A');
      const res = await download(swapped);
      assert.equal(res.status, 403);
      assert.deepEqual(await error(res), { code: 'forbidden', message: 'the firmware URL signature is invalid' });
    });

    it('refuses a revoked gateway’s previously issued URL (403) although it has not expired', async () => {
      const { device, url } = await gatewayWithUrl('3.0.2');
      assert.equal((await download(url, { headers: { range: 'bytes=0-9' } })).status, 206);
      await server.call('POST', `/api/v1/orgs/${server.orgId}/devices/${device.id}/revoke`);
      const res = await download(url, { headers: { range: 'bytes=0-9' } });
      assert.equal(res.status, 403);
      assert.deepEqual(await error(res), {
        code: 'forbidden',
        message: 'the gateway is revoked: it may not download firmware',
      });
      assert.equal((await download(url, { method: 'HEAD' })).status, 403);
    });

    it('logs a download request without the URL’s signature', async () => {
      const { device, fw, url, sig } = await gatewayWithUrl('3.0.3');
      const from = logs.length;
      assert.equal((await download(url, { method: 'HEAD' })).status, 200);
      const lines = await until(() => {
        const mine = logs
          .slice(from)
          .filter((l) => l.reqId !== undefined && JSON.stringify(l).includes(`/fw/${fw.id}/`));
        return mine.length ? mine : undefined;
      }, 'the request logged');
      assert.equal(lines[0]!.req!.url, `/fw/${fw.id}/${device.id}/${url.split('/').at(-2)}/[redacted]`);
      for (const line of logs)
        assert.ok(!JSON.stringify(line).includes(sig), `a log line carries the signature: ${JSON.stringify(line)}`);
    });

    it('logs a mistyped path (404) without its credential query or path signature', async () => {
      const { g, url, sig } = await gatewayWithUrl('3.0.4');
      const from = logs.length;
      // A trailing slash in WSServerPath, an extra segment after a download path.
      assert.equal((await fetch(`${server.apiUrl}/ws/wifidogx/?credential=${g.o.credential}`)).status, 404);
      assert.equal((await download(`${url}/extra`)).status, 404);
      const notFound = await until(() => {
        const lines = logs.slice(from).filter((l) => /^Route GET:.* not found$/.test(l.msg));
        return lines.length === 2 ? lines : undefined;
      }, 'both 404s logged');
      assert.deepEqual(
        notFound.map((l) => l.msg),
        [
          'Route GET:/ws/wifidogx/ not found',
          `Route GET:${new URL(url).pathname.replace(sig, '[redacted]')}/extra not found`,
        ],
      );
      for (const line of logs.slice(from)) {
        const text = JSON.stringify(line);
        assert.ok(!text.includes(sig) && !text.includes(g.o.credential!), `a log line carries a secret: ${text}`);
      }
    });
  });

  it('times out an upgrade when the gateway does not come back reporting the target version', async () => {
    const g = await approved();
    const device = (await deviceOf(g))!;
    const fw = await uploadImage('2.1.0');
    g.once('upgrading', () => void g.stop());
    await server.call('PUT', `/api/v1/orgs/${server.orgId}/devices/${device.id}/target`, { firmware_id: fw.id });
    await untilAttemptState(device.id, 'finished', 'finished');
    // The one sweep, with the product's own in-flight timeout (60 s) and a clock two minutes ahead.
    const product = await server.call<{ update_timeout_seconds: number }>(
      'PATCH',
      `/api/v1/orgs/${server.orgId}/products/${server.productId}`,
      { update_timeout_seconds: 60 },
    );
    assert.equal(product.update_timeout_seconds, 60);
    try {
      assert.equal(await sweepStaleUpdates(server.fleet, { now: new Date(Date.now() + 30_000) }), 0);
      assert.equal(await sweepStaleUpdates(server.fleet, { now: new Date(Date.now() + 120_000) }), 1);
    } finally {
      await server.call('PATCH', `/api/v1/orgs/${server.orgId}/products/${server.productId}`, {
        update_timeout_seconds: null,
      });
    }
    const a = await server.database.db
      .selectFrom('update_attempts')
      .selectAll()
      .where('device_id', '=', device.id)
      .executeTakeFirstOrThrow();
    assert.equal(a.state, 'timed_out');
  });

  it('does not let a second claim of a connected, approved device_id take over until an operator releases it', async () => {
    const g = await approved();
    const impostor = gateway({ deviceId: g.o.deviceId, reconnectMs: 60_000 });
    await impostor.start();
    await until(() => impostor.socket?.destroyed, 'impostor closed');
    assert.equal(impostor.received.length, 0);
    assert.equal(g.socket?.destroyed, false);
    await server.call('POST', `${base(g)}/release`);
    await until(() => g.socket?.destroyed, 'original released');
    await g.stop();
    const again = gateway({ deviceId: g.o.deviceId, credential: g.o.credential });
    await again.start();
    await until(() => again.received.some((m) => m.type === 'connect'), 'the new link served');
  });

  it('lets a newer link on the gateway’s own credential replace its stale one', async () => {
    const g = await approved();
    const fresh = gateway({ deviceId: g.o.deviceId, credential: g.o.credential });
    await fresh.start();
    await until(() => fresh.received.some((m) => m.type === 'connect'), 'the newer link served');
    await until(() => g.lastClose?.code === 4009, 'the stale link closed');
    await g.stop();
  });

  it('marks a gateway offline when heartbeats stop', async () => {
    wifidogxEdgeOf(server.api)!.configure({ timings: { livenessMs: 500 } });
    try {
      const g = gateway({ heartbeatMs: 60_000, reconnectMs: 60_000 });
      await g.start();
      await until(async () => (await deviceOf(g))?.connection_status === 'online', 'online');
      await until(async () => (await deviceOf(g))?.connection_status === 'offline', 'offline');
    } finally {
      wifidogxEdgeOf(server.api)!.configure({ timings: { livenessMs: 150_000 } });
    }
  });

  it('arms no liveness timer for a link that closed while its first report was handled', async () => {
    wifidogxEdgeOf(server.api)!.configure({ timings: { livenessMs: 300 } });
    try {
      const deviceId = `gw-gone-${randomBytes(4).toString('hex')}`;
      const ws = new WebSocket(`${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`);
      await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
      // Gone before the server has looked the device up: the step finishes after the close.
      ws.send(JSON.stringify({ type: 'connect', device_id: deviceId, gateway: [] }));
      ws.terminate();
      await until(
        async () =>
          (await server.database.db
            .selectFrom('devices')
            .select('id')
            .where('identifier', '=', deviceId)
            .executeTakeFirst()) !== undefined,
        'the report handled',
      );
      await new Promise((r) => setTimeout(r, 700));
      assert.deepEqual(
        logs.filter((l) => l.identifier === deviceId && /no heartbeat/.test(l.msg ?? '')),
        [],
        'a timer outlived its link',
      );
    } finally {
      wifidogxEdgeOf(server.api)!.configure({ timings: { livenessMs: 150_000 } });
    }
  });

  it('serves older firmware that only reads and writes type', async () => {
    const g = await approved({ legacy: true });
    assert.ok(types(g).includes('connect'));
  });

  it('derives fleet versions from openwrt_release', () => {
    assert.equal(gatewayVersion({ DISTRIB_RELEASE: '1.2.3' }), '1.2.3');
    assert.equal(
      gatewayVersion({ DISTRIB_RELEASE: '24.10-SNAPSHOT', DISTRIB_REVISION: 'r28790-abc123' }),
      '24.10.0-SNAPSHOT+r28790-abc123',
    );
    assert.equal(gatewayVersion({}), undefined);
  });
});
