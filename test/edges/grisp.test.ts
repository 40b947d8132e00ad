/**
 * The GRiSP edge against the real server: mutual TLS, real WebSockets, the simulated board
 * (device-client/simulators/grisp.ts) as the device, the real firmware store and fleet.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import https from 'node:https';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';
import { createLinkToken } from '../../server/edges/grisp/store.ts';
import { grispEdgeOf } from '../../server/edges/grisp/index.ts';
import { GrispBoard } from '../../device-client/simulators/grisp.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { attemptsOf, uploadGrispPackage } from '../helpers/grisp.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { createLogger } from '../../server/log.ts';
import { type LogLine, startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';

let server: TestServer;
const boards: GrispBoard[] = [];
/** Every line the server logged (info and up), parsed. */
const logLines: LogLine[] = [];
let serialN = 0;

async function tlsFor(serial: string) {
  const cred = await deviceCert(serial);
  const tls = await deviceTlsOptions(cred);
  return { cert: tls.cert!, key: tls.key!, ca: tls.ca };
}

async function board(
  o: { version?: string; faults?: { startUpdate?: number; validate?: number } } = {},
): Promise<GrispBoard> {
  const serial = `GRiSP2 device g${process.pid}-${++serialN}-${randomBytes(2).toString('hex')}`;
  const b = new GrispBoard({
    url: `${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`,
    tls: await tlsFor(serial),
    serial,
    version: o.version ?? '1.0.0',
    pingTimeoutMs: 1500,
    reconnectMs: 100,
    progressThrottleMs: 0,
    faults: o.faults,
  });
  boards.push(b);
  await b.start();
  return b;
}

async function deviceOf(b: GrispBoard) {
  return server.database.db
    .selectFrom('devices')
    .selectAll()
    .where('identifier', '=', `GRiSP2 device ${b.o.serial.split(' ').pop()}`)
    .executeTakeFirst();
}

/** A JSON-RPC reply as the board reads it. */
interface RpcReply {
  id: string | number;
  result?: unknown;
  error: { code: number; message: string };
}

function uploadPackage(version: string, blocks = [randomBytes(3000), randomBytes(5000)]) {
  return uploadGrispPackage(server, version, blocks);
}

async function targetDevice(deviceId: string, firmwareId: string) {
  await server.call('PUT', `/api/v1/orgs/${server.orgId}/devices/${deviceId}/target`, { firmware_id: firmwareId });
}

function attempts(deviceId: string) {
  return attemptsOf(server, deviceId);
}

describe(`GRiSP edge (${DATABASE_KIND})`, () => {
  before(async () => {
    const log = createLogger({
      level: 'info',
      destination: { write: (line: string) => void logLines.push(JSON.parse(line)) },
    });
    server = await startTestServer({}, { log });
    grispEdgeOf(server.deviceListener.app)!.configure({ timings: { pingIntervalMs: 300, logIntervalMs: 400 } });
  });
  after(async () => {
    for (const b of boards) await b.stop();
    await server.close();
  });

  it('refuses the upgrade with 400 when the board does not offer grisp-io-v1', async () => {
    const serial = 'GRiSP2 device nosub';
    const b = new GrispBoard({
      url: `${server.deviceUrl}/grisp-connect/ws`,
      tls: await tlsFor(serial),
      serial,
      version: '1.0.0',
      noSubprotocol: true,
    });
    await assert.rejects(b.start(), (err: Error & { statusCode?: number }) => err.statusCode === 400);
    await b.stop();
  });

  it('echoes the subprotocol, reads system_info and records the board online with its release version', async () => {
    const b = await board({ version: '1.2.3' });
    assert.equal(b.ws!.protocol, 'grisp-io-v1');
    const device = await until(async () => {
      const d = await deviceOf(b);
      return d?.connection_status === 'online' && d.firmware_version === '1.2.3' ? d : undefined;
    }, 'the board online');
    assert.equal(device.protocol, 'grisp');
    const state = await server.call<Record<string, unknown>>(
      'GET',
      `/api/v1/orgs/${server.orgId}/devices/${device.id}/grisp`,
    );
    assert.equal(state.relvsn, '1.2.3');
    assert.equal(state.relname, 'fleethub_sim');
    assert.equal(state.serial, b.o.serial.split(' ').pop());
    assert.equal(state.hardware_serial, b.o.serial);
    assert.equal(state.update_status, 'ready');
  });

  it("revoking the board's certificate closes its link, and its reconnects are refused", async () => {
    const b = await board();
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    const certificate = await server.database.db
      .selectFrom('device_certificates')
      .select('id')
      .where('device_id', '=', device.id)
      .executeTakeFirstOrThrow();
    const disconnected = new Promise<number>((r) => b.once('disconnected', r));
    await server.call(
      'POST',
      `/api/v1/orgs/${server.orgId}/devices/${device.id}/certificates/${certificate.id}/revoke`,
    );
    const code = await Promise.race([
      disconnected,
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error('the link stayed open')), 5000).unref()),
    ]);
    // The link's close effect, with the protocol's code: not cut by the listener before it.
    assert.equal(code, 4003);
    // The board keeps retrying every 100-200 ms; none of its attempts may get a link.
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(grispEdgeOf(server.deviceListener.app)!.connections.has(device.id), false);
    await b.stop();
  });

  it('pings often enough that the board never drops the link for lack of pings', async () => {
    const b = await board();
    let timedOut = false;
    b.on('ping_timeout', () => (timedOut = true));
    // The board's watchdog is 1.5 s here (60 s in the field); the server pings every 300 ms.
    await new Promise((r) => setTimeout(r, 2500));
    assert.equal(timedOut, false);
    assert.ok(b.pings >= 4, `only ${b.pings} pings`);
  });

  it('refuses a package without MANIFEST.sealed at upload', async () => {
    const { pack } = await import('tar-stream');
    const p = pack();
    const chunks: Buffer[] = [];
    p.on('data', (c: unknown) => void chunks.push(c as Buffer));
    const done = new Promise<void>((r) => p.on('end', () => r()));
    p.entry({ name: 'blocks/0.bin' }, Buffer.from('x'));
    p.finalize();
    await done;
    const res = await fetch(
      `${server.apiUrl}/api/v1/grisp/firmware?product=${server.productId}&org=${server.orgId}&version=9.9.9`,
      {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
        body: new Uint8Array(Buffer.concat(chunks)),
      },
    );
    assert.equal(res.status, 400);
    const body = (await res.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, 'invalid_package');
    assert.match(body.error.message, /MANIFEST\.sealed/);
    const fw = await server.database.db
      .selectFrom('firmware')
      .select('id')
      .where('version', '=', '9.9.9')
      .executeTakeFirst();
    assert.equal(fw, undefined);
  });

  it('updates a board: start_update, progress, done, reboot, health check, validate, succeeded', async () => {
    const pkg = await uploadPackage('2.0.0');
    assert.equal(pkg.status, 201);
    assert.equal(pkg.body.format, 'grisp');
    assert.equal(pkg.body.members, 3);
    const b = await board({ version: '1.0.0' });
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    const validated = new Promise((r) => b.once('validated', r));
    await targetDevice(device.id, pkg.body.id);
    await validated;
    const attempt = await until(async () => {
      const [a] = await attempts(device.id);
      return a?.state === 'succeeded' ? a : undefined;
    }, 'attempt succeeded');
    assert.equal(attempt.to_version, '2.0.0');
    assert.equal(attempt.from_version, '1.0.0');
    assert.equal(b.running, '2.0.0');
    const methods = b.received.map((r) => `${r.method}:${r.params.type ?? ''}`);
    for (const m of ['get:system_info', 'post:start_update', 'post:reboot', 'post:validate'])
      assert.ok(methods.includes(m), `${m} in ${methods.join(',')}`);
    assert.ok(methods.indexOf('post:reboot') < methods.indexOf('post:validate'));
    const start = b.received.find((r) => r.params.type === 'start_update')!;
    assert.match(String(start.params.url), /^https:\/\/localhost:\d+\/grisp\/fw\/[0-9a-f-]{36}\/\d+\/[0-9a-f]{64}$/);
    assert.ok(b.updateEvents.some((e) => e.event === 'progress'));
    assert.equal((await deviceOf(b))!.firmware_version, '2.0.0');
  });

  it('never logs a package URL’s signature, also when it refuses the request (revoked board)', async () => {
    const pkg = await uploadPackage('2.0.5');
    const b = await board({ version: '1.0.0' });
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    const validated = new Promise((r) => b.once('validated', r));
    await targetDevice(device.id, pkg.body.id);
    await validated;
    const url = String(b.received.find((r) => r.params.type === 'start_update')!.params.url);
    const sig = url.split('/').pop()!;
    await b.stop();
    await server.call('POST', `/api/v1/orgs/${server.orgId}/devices/${device.id}/revoke`);
    const fetchManifest = () =>
      new Promise<number>((resolve, reject) => {
        const req = https.get(
          `${url}/MANIFEST.sealed`,
          { ...b.o.tls, servername: 'localhost', agent: false },
          (res) => {
            res.resume();
            resolve(res.statusCode!);
          },
        );
        req.on('error', reject);
      });
    // A connection open when the revocation reaches the listener is closed without an answer: ask again.
    await until(async () => (await fetchManifest().catch(() => undefined)) === 403, 'the request refused with 403');
    const refused = await until(
      () => logLines.find((l) => l.msg === 'device connection refused' && String(l.url).includes(pkg.body.id)),
      'the refusal logged',
    );
    assert.equal(refused.url, `${new URL(url).pathname.replace(sig, '[redacted]')}/MANIFEST.sealed`);
    for (const line of logLines)
      assert.ok(!JSON.stringify(line).includes(sig), `a log line carries the signature: ${JSON.stringify(line)}`);
  });

  it('does not validate an unhealthy image: the board reboots back and the attempt failed', async () => {
    const pkg = await uploadPackage('2.1.0');
    const edge = grispEdgeOf(server.deviceListener.app)!;
    edge.configure({ healthCheck: async () => 'the application did not start' });
    try {
      const b = await board({ version: '1.0.0' });
      const device = await until(
        async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
        'online',
      );
      await targetDevice(device.id, pkg.body.id);
      const attempt = await until(async () => {
        const [a] = await attempts(device.id);
        return a?.state === 'failed' ? a : undefined;
      }, 'attempt failed');
      assert.deepEqual(attempt.errors, ['health check: the application did not start']);
      await until(
        async () => b.running === '1.0.0' && b.received.filter((r) => r.params.type === 'reboot').length === 2,
        'reboot back to 1.0.0',
      );
      assert.equal(
        b.received.some((r) => r.params.type === 'validate'),
        false,
      );
    } finally {
      edge.configure({ healthCheck: (await import('../../server/edges/grisp/index.ts')).defaultHealthCheck });
    }
  });

  it('fails the attempt when the board answers start_update with -10 (updater unavailable)', async () => {
    const pkg = await uploadPackage('2.2.0');
    const b = await board({ version: '1.0.0', faults: { startUpdate: -10 } });
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    await targetDevice(device.id, pkg.body.id);
    const attempt = await until(async () => {
      const [a] = await attempts(device.id);
      return a?.state === 'failed' ? a : undefined;
    }, 'attempt failed');
    assert.match(attempt.errors[0]!, /\(-10\)/);
  });

  it('keeps waiting for update events when the board answers -11 (already updating)', async () => {
    const pkg = await uploadPackage('2.3.0');
    const b = await board({ version: '1.0.0', faults: { startUpdate: -11 } });
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    await targetDevice(device.id, pkg.body.id);
    await until(async () => b.received.some((r) => r.params.type === 'start_update'), 'start_update');
    await new Promise((r) => setTimeout(r, 300));
    const [a] = await attempts(device.id);
    assert.equal(a!.state, 'sent');
  });

  it('validates first and retries once when the board answers -12 (boot system not validated)', async () => {
    const pkg = await uploadPackage('2.4.0');
    const b = await board({ version: '1.0.0', faults: { startUpdate: -12 } });
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    await targetDevice(device.id, pkg.body.id);
    await until(async () => {
      const [a] = await attempts(device.id);
      return a?.state === 'succeeded';
    }, 'attempt succeeded after the retry');
    const types = b.received.map((r) => r.params.type).filter((t) => t === 'start_update' || t === 'validate');
    assert.deepEqual(types.slice(0, 3), ['start_update', 'validate', 'start_update']);
  });

  it('fails the attempt when validate answers -13 (validate from unbooted)', async () => {
    const pkg = await uploadPackage('2.5.0');
    const b = await board({ version: '1.0.0', faults: { validate: -13 } });
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    await targetDevice(device.id, pkg.body.id);
    const attempt = await until(async () => {
      const [a] = await attempts(device.id);
      return a?.state === 'failed' ? a : undefined;
    }, 'attempt failed');
    assert.match(attempt.errors[0]!, /validate_from_unbooted \(-13\)/);
  });

  it('fetches log batches, stores them, acknowledges with log.sync and serves them over REST', async () => {
    const b = await board();
    for (let i = 0; i < 5; i++) b.log('info', `hello ${i}`);
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    const logs = await until(async () => {
      const r = await server.call<{ items: Array<{ seq: number; msg: string; level: string }> }>(
        'GET',
        `/api/v1/orgs/${server.orgId}/devices/${device.id}/logs`,
      );
      return r.items.length === 5 ? r.items : undefined;
    }, 'logs stored');
    assert.deepEqual(
      logs.map((l) => l.msg),
      ['hello 4', 'hello 3', 'hello 2', 'hello 1', 'hello 0'],
    );
    assert.equal(logs[0]!.level, 'info');
    // log.sync removed them from the board's buffer.
    await until(async () => b.received.filter((r) => r.method === 'log.get').length >= 2, 'a second log.get');
    const again = await server.call<{ items: unknown[] }>(
      'GET',
      `/api/v1/orgs/${server.orgId}/devices/${device.id}/logs`,
    );
    assert.equal(again.items.length, 5);
  });

  it('answers post ping with pang before linking and pong after a valid linking token', async () => {
    const b = await board();
    const device = await until(
      async () => ((await deviceOf(b))?.connection_status === 'online' ? deviceOf(b) : undefined),
      'online',
    );
    assert.equal(await b.call('post', { type: 'ping' }), 'pang');
    const created = await server.call<{ token: string }>('POST', `/api/v1/orgs/${server.orgId}/grisp/link-tokens`, {});
    assert.equal(await b.call('post', { type: 'device_linking_token', token: created.token }), 'ok');
    assert.equal(await b.call('post', { type: 'ping' }), 'pong');
    // -3: already linked (with a fresh token).
    const second = await server.call<{ token: string }>('POST', `/api/v1/orgs/${server.orgId}/grisp/link-tokens`, {});
    await assert.rejects(
      b.call('post', { type: 'device_linking_token', token: second.token }),
      (e: Error & { code?: number }) => e.code === -3,
    );
    // -4: a used token, a malformed one, an unknown one.
    const other = await board();
    await until(async () => (await deviceOf(other))?.connection_status === 'online', 'online');
    await assert.rejects(
      other.call('post', { type: 'device_linking_token', token: created.token }),
      (e: Error & { code?: number }) => e.code === -4,
    );
    await assert.rejects(
      other.call('post', { type: 'device_linking_token', token: 'nope' }),
      (e: Error & { code?: number }) => e.code === -4,
    );
    await assert.rejects(
      other.call('post', { type: 'device_linking_token', token: `glt_${'A'.repeat(43)}` }),
      (e: Error & { code?: number }) => e.code === -4,
    );
    // -2: expired.
    const expired = await createLinkToken(server.database.db, { type: 'system', id: null }, server.orgId, -10);
    await assert.rejects(
      other.call('post', { type: 'device_linking_token', token: expired.token }),
      (e: Error & { code?: number }) => e.code === -2,
    );
    // -1: a board that is not approved cannot be linked.
    const otherDevice = (await deviceOf(other))!;
    await server.database.db
      .updateTable('devices')
      .set({ approval: 'pending' })
      .where('id', '=', otherDevice.id)
      .execute();
    const third = await server.call<{ token: string }>('POST', `/api/v1/orgs/${server.orgId}/grisp/link-tokens`, {});
    await assert.rejects(
      other.call('post', { type: 'device_linking_token', token: third.token }),
      (e: Error & { code?: number }) => e.code === -1,
    );
    await server.database.db
      .updateTable('devices')
      .set({ approval: 'approved' })
      .where('id', '=', otherDevice.id)
      .execute();
    assert.ok(device.id);
  });

  describe('JSON-RPC correctness', () => {
    let raw: WebSocket;
    const replies: unknown[] = [];
    before(async () => {
      const tls = await tlsFor('GRiSP2 device rpc-raw');
      raw = new WebSocket(`${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`, ['grisp-io-v1'], {
        cert: tls.cert,
        key: tls.key,
        ca: tls.ca,
      });
      raw.on('message', (d) => {
        const v = JSON.parse(d.toString()) as Record<string, unknown>;
        // Server-initiated requests (system_info, log.get) are not what these tests look at.
        if (!Array.isArray(v) && typeof v.method === 'string') return;
        replies.push(v);
      });
      await new Promise((r) => raw.once('open', r));
    });
    after(() => raw.terminate());

    async function exchange(text: string, expectReply = true): Promise<unknown> {
      replies.length = 0;
      raw.send(text);
      if (!expectReply) {
        await new Promise((r) => setTimeout(r, 300));
        return replies.shift();
      }
      await until(async () => replies.length > 0, 'a reply', 3000);
      return replies.shift();
    }

    it('answers unparsable JSON with -32700 and id null', async () => {
      assert.deepEqual(await exchange('{"jsonrpc":'), {
        jsonrpc: '2.0',
        id: null,
        error: { code: -32700, message: 'Parse error' },
      });
    });
    it('answers a message that is not a request with -32600', async () => {
      assert.deepEqual(await exchange('{"foo":1}'), {
        jsonrpc: '2.0',
        id: null,
        error: { code: -32600, message: 'Invalid Request' },
      });
      assert.deepEqual(await exchange('{"jsonrpc":"1.0","id":"a","method":"post"}'), {
        jsonrpc: '2.0',
        id: 'a',
        error: { code: -32600, message: 'Invalid Request' },
      });
    });
    it('answers an empty batch with a single -32600', async () => {
      assert.deepEqual(await exchange('[]'), {
        jsonrpc: '2.0',
        id: null,
        error: { code: -32600, message: 'Invalid Request' },
      });
    });
    it('answers an unknown method with -32601, echoing a string id unchanged', async () => {
      const r = (await exchange(
        '{"jsonrpc":"2.0","id":"-576460752303423487","method":"frobnicate","params":{}}',
      )) as RpcReply;
      assert.equal(r.id, '-576460752303423487');
      assert.equal(r.error.code, -32601);
    });
    it('answers post without a params.type with -32602', async () => {
      const r = (await exchange('{"jsonrpc":"2.0","id":7,"method":"post","params":{}}')) as RpcReply;
      assert.equal(r.id, 7);
      assert.equal(r.error.code, -32602);
    });
    it('never answers a notification, even for an unknown method', async () => {
      assert.equal(await exchange('{"jsonrpc":"2.0","method":"frobnicate","params":{}}', false), undefined);
    });
    it('answers a batch with one array of replies for its requests only', async () => {
      const r = (await exchange(
        JSON.stringify([
          { jsonrpc: '2.0', id: 'p1', method: 'post', params: { type: 'ping' } },
          { jsonrpc: '2.0', method: 'frobnicate', params: {} },
          { foo: 1 },
          { jsonrpc: '2.0', id: 'p2', method: 'get', params: { type: 'nothing' } },
        ]),
      )) as RpcReply[];
      assert.ok(Array.isArray(r));
      assert.equal(r.length, 3);
      assert.deepEqual(r[0], { jsonrpc: '2.0', id: 'p1', result: 'pang' });
      assert.equal(r[1]!.error.code, -32600);
      assert.equal(r[2]!.id, 'p2');
      assert.equal(r[2]!.error.code, -32601);
    });
  });
});
