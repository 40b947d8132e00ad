/**
 * The input gate against the whole server: a NUL (U+0000) or a lone surrogate in any string a
 * client sends — REST bodies, path and query parameters, the Main Server's and the edges' JSON,
 * Phoenix join and event params — is refused with an error naming the field, writes nothing,
 * never becomes a 500, and is never logged at error level.
 */
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync } from 'node:crypto';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import pino from 'pino';
import WebSocket from 'ws';
import type { Channel, Socket } from 'phoenix';
import { findBadString } from '../../server/input-gate.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, openSocket, pushAndWait } from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import type { ErrorAnswer } from './harness.ts';

let server: TestServer;
const logLines: Array<{ level: number; msg: string }> = [];
const sockets: Socket[] = [];

/** A Main Server route's error answer, in the shape the original server used. */
interface MainServerError {
  error: string;
  details: string;
}

/** A Phoenix error reply from the device channels. */
interface JoinRefusal {
  reason: string;
  details: { code?: string; field?: string };
}

/** A raw request: `body` is sent as written, so `\u0000` and `\ud800` escapes reach the server's JSON parser. */
async function raw<T = ErrorAnswer>(
  method: string,
  url: string,
  body?: string,
  o: { token?: string | null; type?: string } = {},
): Promise<{ status: number; body: T }> {
  const token = o.token === undefined ? server.adminToken : o.token;
  const res = await fetch(`${server.apiUrl}${url}`, {
    method,
    headers: {
      ...(token ? { authorization: `Bearer ${token}` } : {}),
      ...(body !== undefined ? { 'content-type': o.type ?? 'application/json' } : {}),
    },
    body,
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : undefined };
}

function assertRefused(
  res: { status: number; body: ErrorAnswer },
  field: string,
  problem: 'nul' | 'lone_surrogate' = 'nul',
): void {
  assert.equal(res.status, 400, JSON.stringify(res.body));
  assert.equal(res.body.error.code, 'invalid');
  assert.deepEqual(res.body.error.details, { field, problem });
  assert.ok(res.body.error.message.startsWith(field), res.body.error.message);
}

const count = async (table: 'orgs' | 'devices' | 'audit_log') =>
  Number(
    (
      await server.database.db
        .selectFrom(table)
        .select((eb) => eb.fn.countAll().as('n'))
        .executeTakeFirstOrThrow()
    ).n,
  );

describe(`the input gate (${DATABASE_KIND})`, () => {
  before(async () => {
    const log = pino({ level: 'info' }, { write: (line: string) => void logLines.push(JSON.parse(line)) });
    server = await startTestServer({}, { log });
  });
  after(async () => {
    for (const s of sockets) await disconnectSocket(s);
    await server.close();
  });

  describe('findBadString', () => {
    test('names the first bad value by its path, array indexes and odd keys included', () => {
      assert.deepEqual(findBadString({ a: [{ b: 'ok' }, { 'c d': 'x\u0000' }] }, 'body'), {
        path: 'body.a[1]["c d"]',
        problem: 'nul',
        key: false,
      });
      assert.deepEqual(findBadString({ gateway: [{ gw_id: '\udc00' }] }, ''), {
        path: 'gateway[0].gw_id',
        problem: 'lone_surrogate',
        key: false,
      });
    });
    test('checks object keys, and escapes them in the path', () => {
      assert.deepEqual(findBadString({ 'k\u0000': 1 }, 'body'), {
        path: 'body["k\\u0000"]',
        problem: 'nul',
        key: true,
      });
    });
    test('accepts surrogate pairs, other control characters and non-text values', () => {
      assert.equal(
        findBadString(
          { emoji: '\ud83d\ude00', tab: '\t\u0001', n: 1, b: Buffer.from([0]), bytes: new Uint8Array([0]) },
          'body',
        ),
        undefined,
      );
    });
    test('walks nesting deeper than the call stack without throwing', () => {
      const deep = JSON.parse(`${'['.repeat(200_000)}"\\u0000"${']'.repeat(200_000)}`);
      assert.equal(findBadString(deep, 'body')?.problem, 'nul');
    });
  });

  describe('REST', () => {
    test('a NUL in a JSON body is 400 naming body.name, and no org is created', async () => {
      const orgs = await count('orgs');
      assertRefused(await raw('POST', '/api/v1/orgs', '{"name":"evil\\u0000org"}'), 'body.name');
      assert.equal(await count('orgs'), orgs);
    });

    test('a lone surrogate in a JSON body is 400 naming the field; a surrogate pair is accepted', async () => {
      const orgs = await count('orgs');
      assertRefused(await raw('POST', '/api/v1/orgs', '{"name":"evil\\ud800"}'), 'body.name', 'lone_surrogate');
      assert.equal(await count('orgs'), orgs);
      const res = await raw(
        'POST',
        '/api/v1/orgs/default/groups',
        '{"product":"default","name":"ok-group","description":"\\ud83d\\ude00"}',
      );
      assert.equal(res.status, 201, JSON.stringify(res.body));
    });

    test('%00 in a path parameter is 400 naming params.org', async () => {
      assertRefused(await raw('GET', '/api/v1/orgs/%00/devices'), 'params.org');
    });

    test('%00 in a query parameter is 400 naming query.action', async () => {
      assertRefused(await raw('GET', '/api/v1/orgs/default/audit?action=%00'), 'query.action');
    });

    test('a NUL in the login email is 400 for an anonymous caller', async () => {
      assertRefused(
        await raw('POST', '/api/v1/auth/login', '{"email":"a\\u0000@example.com","password":"x"}', { token: null }),
        'body.email',
      );
    });

    test('a NUL in an authenticated route body from an anonymous caller is 401: authentication comes first', async () => {
      const res = await raw('POST', '/api/v1/orgs', '{"name":"evil\\u0000org"}', { token: null });
      assert.equal(res.status, 401);
    });

    test('a NUL in the Main Server register-device name is 400 in the seed shape, and no device is registered', async () => {
      const devices = await count('devices');
      const res = await raw<MainServerError>(
        'POST',
        '/api/main-server/register-device',
        '{"device_id":"pi-nul","name":"kiosk\\u0000"}',
        { token: null },
      );
      assert.equal(res.status, 400, JSON.stringify(res.body));
      assert.equal(res.body.error, 'Bad request');
      assert.match(res.body.details, /^body\.name contains a NUL character/);
      assert.equal(await count('devices'), devices);
    });

    test('a NUL in the Main Server query-string fallback is 400 naming query.name', async () => {
      const res = await raw<MainServerError>(
        'POST',
        '/api/main-server/register-device?device_id=pi-q&name=%00',
        undefined,
        {
          token: null,
        },
      );
      assert.equal(res.status, 400, JSON.stringify(res.body));
      assert.match(res.body.details, /^query\.name contains a NUL character/);
    });
  });

  describe('content types', () => {
    test('POST /api/v1/grisp/firmware with a JSON body is 415, not 500', async () => {
      const res = await raw('POST', `/api/v1/grisp/firmware?product=default&org=default&version=9.9.9`, '{"a":1}');
      assert.equal(res.status, 415, JSON.stringify(res.body));
      assert.equal(res.body.error.code, 'unsupported_media_type');
    });

    test('POST /api/v1/grisp/firmware without a body is 415', async () => {
      const res = await raw('POST', `/api/v1/grisp/firmware?product=default&org=default&version=9.9.9`);
      assert.equal(res.status, 415, JSON.stringify(res.body));
    });

    test('POST /api/v1/firmware with text/plain is 415', async () => {
      const res = await raw('POST', `/api/v1/firmware?product=default&org=default&version=9.9.9`, 'hello', {
        type: 'text/plain',
      });
      assert.equal(res.status, 415, JSON.stringify(res.body));
    });

    test('POST /api/v1/main-server/packages with a JSON body is 415', async () => {
      const res = await raw('POST', '/api/v1/main-server/packages', '{"a":1}');
      assert.equal(res.status, 415, JSON.stringify(res.body));
    });
  });

  describe('Phoenix', () => {
    let firmwareId: string;
    before(async () => {
      const res = await fetch(`${server.apiUrl}/api/v1/firmware`, {
        method: 'POST',
        headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
        body: JSON.stringify({
          product: server.productId,
          org: server.orgId,
          version: '1.0.0',
          sha256: 'a'.repeat(64),
          size: 10,
        }),
      });
      assert.equal(res.status, 201, await res.clone().text());
      firmwareId = ((await res.json()) as { id: string }).id;
    });

    async function deviceSocket(serial: string): Promise<Socket> {
      const socket = await openSocket(`${server.deviceUrl.replace(/^https/, 'wss')}/socket`, {
        tls: await deviceTlsOptions(await deviceCert(serial)),
      });
      sockets.push(socket);
      return socket;
    }

    function joinOutcome(channel: Channel): Promise<{ status: string; response: JoinRefusal }> {
      return new Promise((resolve) => {
        channel
          .join(5000)
          .receive('ok', (response: JoinRefusal) => resolve({ status: 'ok', response }))
          .receive('error', (response: JoinRefusal) => resolve({ status: 'error', response }))
          .receive('timeout', () => resolve({ status: 'timeout', response: { reason: 'timeout', details: {} } }));
      });
    }

    test('a NUL in phx_join params is an error reply naming payload.version, and nothing is recorded', async () => {
      const socket = await deviceSocket('SN-GATE-JOIN');
      const channel = socket.channel(`device:${firmwareId}`, { version: '1.0.0\u0000', platform: 'x86' });
      const outcome = await joinOutcome(channel);
      channel.leave();
      assert.equal(outcome.status, 'error');
      assert.match(outcome.response.reason, /^payload\.version contains a NUL character/);
      assert.deepEqual(outcome.response.details, { code: 'invalid', field: 'payload.version' });
      const device = await server.database.db
        .selectFrom('devices')
        .select(['firmware_version', 'connection_status'])
        .where('identifier', '=', 'SN-GATE-JOIN')
        .executeTakeFirst();
      assert.notEqual(device?.connection_status, 'online');
      assert.equal(device?.firmware_version ?? null, null);
    });

    test('a lone surrogate in a group join topic is an error reply naming the topic', async () => {
      const socket = await deviceSocket('SN-GATE-GROUP');
      const outcome = await joinOutcome(socket.channel('group:default:default:\ud800', {}));
      assert.equal(outcome.status, 'error');
      assert.equal(outcome.response.details.field, 'topic');
    });

    test('a NUL in an event payload is an error reply naming the field', async () => {
      const socket = await deviceSocket('SN-GATE-EVENT');
      const channel = socket.channel(`device:${firmwareId}`, { version: '1.0.0' });
      assert.equal((await joinOutcome(channel)).status, 'ok');
      const reply = await pushAndWait(channel, 'firmware_update_error', {
        version: '1.0.0',
        errors: ['disk\u0000full'],
      });
      assert.equal(reply.status, 'error');
      assert.equal((reply.response.details as JoinRefusal['details']).field, 'payload.errors[0]');
    });
  });

  describe('edges', () => {
    test('WiFiDogX: a NUL in connect fields closes the link with 4000 naming the field, and registers nothing', async () => {
      const ws = new WebSocket(`${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`);
      await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
      const closed = new Promise<{ code: number; reason: string }>((resolve) =>
        ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })),
      );
      ws.send('{"type":"connect","device_id":"gw-gate","device_info":{"ap_device_id":"ap\\u0000"},"gateway":[]}');
      assert.deepEqual(await closed, { code: 4000, reason: 'invalid string in device_info.ap_device_id' });
      assert.equal(
        await server.database.db
          .selectFrom('devices')
          .select('id')
          .where('identifier', '=', 'gw-gate')
          .executeTakeFirst(),
        undefined,
      );
    });

    test('GRiSP: a NUL in JSON-RPC params is an invalid-params error naming params.token', async () => {
      const cred = await deviceCert('GRiSP2 device gate-1');
      const tls = await deviceTlsOptions(cred);
      const ws = new WebSocket(`${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`, ['grisp-io-v1'], {
        cert: tls.cert,
        key: tls.key,
        ca: tls.ca,
      });
      const reply = new Promise<{ error: { code: number; data: string } }>((resolve) =>
        ws.on('message', (data) => {
          const m = JSON.parse(data.toString());
          if (m.id === 'gate-1') resolve(m);
        }),
      );
      await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
      ws.send(
        '{"jsonrpc":"2.0","id":"gate-1","method":"post","params":{"type":"device_linking_token","token":"tok\\u0000"}}',
      );
      const m = await reply;
      ws.terminate();
      assert.equal(m.error.code, -32602);
      assert.match(m.error.data, /^params\.token contains a NUL character/);
    });

    test('keyauth: a NUL in the 101 line is a 400 InvalidString naming data.name, and no client is recorded', async () => {
      const { publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
      const pem = publicKey.export({ type: 'spki', format: 'pem' }).toString();
      const fingerprint = createHash('sha256')
        .update(publicKey.export({ type: 'spki', format: 'der' }))
        .digest('hex');
      const socket = net.connect({ host: '127.0.0.1', port: server.keyauth!.port });
      let buffer = '';
      const line = new Promise<{ code: number; error: { type: string; msg: string } }>((resolve) =>
        socket.on('data', (chunk) => {
          buffer += chunk.toString();
          const nl = buffer.indexOf('\n');
          if (nl >= 0) resolve(JSON.parse(buffer.slice(0, nl)));
        }),
      );
      socket.write(`${JSON.stringify({ code: 101, data: { key: pem } }).slice(0, -2)},"name":"lamp\\u0000"}}\n`);
      const answer = await line;
      socket.destroy();
      assert.equal(answer.code, 400);
      assert.equal(answer.error.type, 'InvalidString');
      assert.match(answer.error.msg, /^data\.name contains a NUL character/);
      const recorded = await server.database.db
        .selectFrom('devices')
        .select('id')
        .where('identifier', 'like', `%${fingerprint.slice(0, 16)}%`)
        .executeTakeFirst();
      assert.equal(recorded, undefined);
    });
  });

  test('nothing in this file produced an error-level log line', () => {
    const errors = logLines.filter((l) => l.level >= 50);
    assert.deepEqual(
      errors.map((l) => l.msg),
      [],
    );
  });
});
