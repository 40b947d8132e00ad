/**
 * Protocol edge cases the official client cannot produce, with raw `ws` frames over mutual TLS.
 */
import assert from 'node:assert/strict';
import { request } from 'node:https';
import { after, before, describe, test } from 'node:test';
import { startFixture, type Fixture } from './fixture.ts';
import { RawClient, waitFor } from '../helpers/phoenix.ts';

function binaryPush(joinRef: string, ref: string, topic: string, event: string, data: Buffer): Buffer {
  const strings = [joinRef, ref, topic, event].map((s) => Buffer.from(s));
  return Buffer.concat([Buffer.from([0, ...strings.map((s) => s.length)]), ...strings, data]);
}

/** Parses a server binary frame: push (0), reply (1) or broadcast (2). */
function parseBinary(data: Buffer): { kind: number; fields: string[]; data: Buffer } {
  const kind = data[0]!;
  const count = kind === 0 ? 3 : kind === 1 ? 4 : 2;
  const lens = [...data.subarray(1, 1 + count)];
  let offset = 1 + count;
  const fields = lens.map((len) => {
    const s = data.toString('utf8', offset, offset + len);
    offset += len;
    return s;
  });
  return { kind, fields, data: data.subarray(offset) };
}

function httpsGet(url: string, tls: Fixture['tls']): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { ...tls, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('the channel engine with raw frames', () => {
  let fx: Fixture;
  const clients: RawClient[] = [];

  async function raw(
    query = 'vsn=2.0.0',
    options: { protocols?: string[]; headers?: Record<string, string> } = {},
  ): Promise<RawClient> {
    const client = await RawClient.connect(`${fx.wsUrl}?${query}`, fx.tls, options);
    clients.push(client);
    return client;
  }

  async function rawJoin(client: RawClient, topic: string, joinRef: string, payload: object = {}): Promise<unknown[]> {
    client.send([joinRef, joinRef, topic, 'phx_join', payload]);
    return client.waitArray((f) => f[1] === joinRef && f[3] === 'phx_reply' && f[2] === topic);
  }

  before(async () => {
    fx = await startFixture({ checkOrigin: ['https://dashboard.example'], maxChannels: 100 });
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await fx.close();
  });

  test('V1 clients speak JSON objects', async () => {
    const client = await raw('vsn=1.0.0');
    client.send({ topic: 'room:v1', event: 'phx_join', payload: {}, ref: '1' });
    const joined = await client.waitFrame((f) => !f.binary && (f.json as { ref?: string }).ref === '1');
    assert.deepEqual(joined.binary ? null : joined.json, {
      topic: 'room:v1',
      event: 'phx_reply',
      payload: { status: 'ok', response: { joined: 'room:v1', cn: 'room-tester' } },
      ref: '1',
      join_ref: null,
    });
    client.send({ topic: 'room:v1', event: 'ping', payload: { x: 1 }, ref: '2' });
    const reply = await client.waitFrame((f) => !f.binary && (f.json as { ref?: string }).ref === '2');
    assert.deepEqual(!reply.binary && (reply.json as { payload: unknown }).payload, {
      status: 'ok',
      response: { pong: { x: 1 } },
    });
  });

  test('V2 binary pushes reach the channel as bytes and binary pushes go back as binary frames', async () => {
    const client = await raw();
    await rawJoin(client, 'room:bin', '1');
    client.sendBinary(binaryPush('1', '2', 'room:bin', 'echo_binary', Buffer.from([1, 2, 3])));
    const reply = await client.waitArray((f) => f[1] === '2');
    assert.deepEqual(reply, ['1', '2', 'room:bin', 'phx_reply', { status: 'ok', response: { bytes: 3 } }]);
    const pushed = await client.waitFrame((f) => f.binary);
    assert.ok(pushed.binary);
    const parsed = parseBinary(pushed.data);
    assert.deepEqual(
      { kind: parsed.kind, fields: parsed.fields, data: [...parsed.data] },
      { kind: 0, fields: ['1', 'room:bin', 'bin'], data: [3, 2, 1] },
    );
  });

  test('a message with a stale join_ref is ignored', async () => {
    const client = await raw();
    await rawJoin(client, 'room:stale', '1');
    const staleBefore = fx.endpoint.stats.staleFrames;
    client.send(['0', '2', 'room:stale', 'ping', {}]);
    client.send(['1', '3', 'room:stale', 'ping', {}]);
    await client.waitArray((f) => f[1] === '3');
    assert.equal(client.frames.filter((f) => !f.binary && Array.isArray(f.json) && f.json[1] === '2').length, 0);
    assert.equal(fx.endpoint.stats.staleFrames - staleBefore, 1);
  });

  test('the 101st join on one socket is refused with too many channels joined', async () => {
    const client = await raw();
    for (let i = 0; i < 100; i++) client.send([`j${i}`, `j${i}`, `room:many-${i}`, 'phx_join', {}]);
    await client.waitArray((f) => f[1] === 'j99' && f[3] === 'phx_reply');
    const oks = client.frames.filter(
      (f) => !f.binary && Array.isArray(f.json) && (f.json[4] as { status?: string })?.status === 'ok',
    );
    assert.equal(oks.length, 100);
    const refused = await rawJoin(client, 'room:many-100', 'j100');
    assert.deepEqual(refused[4], { status: 'error', response: { reason: 'too many channels joined' } });
  });

  test('a duplicate join closes the old channel with its join_ref and then joins', async () => {
    const client = await raw();
    await rawJoin(client, 'room:dup', '1');
    client.send(['5', '5', 'room:dup', 'phx_join', {}]);
    const close = await client.waitArray((f) => f[3] === 'phx_close');
    assert.deepEqual(close, ['1', '1', 'room:dup', 'phx_close', {}]);
    const joined = await client.waitArray((f) => f[1] === '5');
    assert.equal((joined[4] as { status: string }).status, 'ok');
    assert.ok(
      client.frames.findIndex((f) => !f.binary && Array.isArray(f.json) && f.json[3] === 'phx_close') <
        client.frames.findIndex((f) => !f.binary && Array.isArray(f.json) && f.json[1] === '5'),
    );
    await waitFor(
      () => fx.terminations.some((t) => t.topic === 'room:dup' && t.reason === 'duplicate_join'),
      2000,
      'terminate duplicate_join',
    );
  });

  test('an event on a topic not joined answers unmatched topic', async () => {
    const client = await raw();
    client.send([null, '7', 'room:nowhere', 'ping', {}]);
    assert.deepEqual(await client.waitArray((f) => f[1] === '7'), [
      null,
      '7',
      'room:nowhere',
      'phx_reply',
      { status: 'error', response: { reason: 'unmatched topic' } },
    ]);
    const noRoute = await rawJoin(client, 'elsewhere:1', '8');
    assert.deepEqual(noRoute[4], { status: 'error', response: { reason: 'unmatched topic' } });
  });

  test('leaving a topic not joined answers ok', async () => {
    const client = await raw();
    client.send(['3', '3', 'room:never', 'phx_leave', {}]);
    assert.deepEqual((await client.waitArray((f) => f[1] === '3'))[4], { status: 'ok', response: {} });
  });

  test('phx_leave replies ok then sends phx_close with the join_ref', async () => {
    const client = await raw();
    await rawJoin(client, 'room:bye', '4');
    client.send(['4', '5', 'room:bye', 'phx_leave', {}]);
    await client.waitArray((f) => f[3] === 'phx_close');
    const frames = client.frames
      .filter((f) => !f.binary && Array.isArray(f.json) && f.json[2] === 'room:bye')
      .map((f) => (f.binary ? null : f.json));
    assert.deepEqual(frames.slice(-2), [
      ['4', '5', 'room:bye', 'phx_reply', { status: 'ok', response: {} }],
      ['4', '4', 'room:bye', 'phx_close', {}],
    ]);
  });

  test('a join handler that throws answers join crashed', async () => {
    const client = await raw();
    const reply = await rawJoin(client, 'room:boom', '1', { crash: true });
    assert.deepEqual(reply[4], { status: 'error', response: { reason: 'join crashed' } });
  });

  test('a crashing handleIn sends phx_error channel_crash for that channel only', async () => {
    const client = await raw();
    await rawJoin(client, 'room:c1', '1');
    await rawJoin(client, 'room:c2', '2');
    client.send(['1', '3', 'room:c1', 'crash', {}]);
    assert.deepEqual(await client.waitArray((f) => f[3] === 'phx_error'), [
      '1',
      '1',
      'room:c1',
      'phx_error',
      { reason: 'channel_crash' },
    ]);
    client.send(['2', '4', 'room:c2', 'ping', {}]);
    assert.equal(((await client.waitArray((f) => f[1] === '4'))[4] as { status: string }).status, 'ok');
  });

  test('a handler returning the wrong shape crashes its channel with a clear log, not the socket', async () => {
    const client = await raw();
    await rawJoin(client, 'room:shape', '1');
    client.send(['1', '2', 'room:shape', 'bad_shape', {}]);
    assert.deepEqual((await client.waitArray((f) => f[3] === 'phx_error'))[4], { reason: 'channel_crash' });
    client.send([null, '3', 'phoenix', 'heartbeat', {}]);
    await client.waitArray((f) => f[1] === '3');
  });

  test('a heartbeat is answered ok with an empty response', async () => {
    const client = await raw();
    client.send([null, '9', 'phoenix', 'heartbeat', {}]);
    assert.deepEqual(await client.waitArray((f) => f[1] === '9'), [
      null,
      '9',
      'phoenix',
      'phx_reply',
      { status: 'ok', response: {} },
    ]);
  });

  test('broadcasts are [null, null, topic, event, payload] and extra trailing elements are ignored', async () => {
    const client = await raw();
    client.send(['1', '1', 'room:cast', 'phx_join', {}, 'extra', 42]);
    await client.waitArray((f) => f[1] === '1');
    await fx.pubsub.broadcast('room:cast', 'news', { a: 1 });
    assert.deepEqual(await client.waitArray((f) => f[3] === 'news'), [null, null, 'room:cast', 'news', { a: 1 }]);
  });

  test('a frame that is not an array is ignored, counted, and the socket lives on', async () => {
    const client = await raw();
    const before = fx.endpoint.stats.invalidFrames;
    client.send('{"not": "an array"}');
    client.send('not json at all');
    client.send([null, '2', 'phoenix', 'heartbeat', {}]);
    await client.waitArray((f) => f[1] === '2');
    assert.equal(fx.endpoint.stats.invalidFrames - before, 2);
    assert.equal(client.frames.length, 1);
  });

  test('a payload that is not an object answers an error reply', async () => {
    const client = await raw();
    await rawJoin(client, 'room:payload', '1');
    client.send(['1', '2', 'room:payload', 'ping', 'a string']);
    const reply = await client.waitArray((f) => f[1] === '2');
    assert.equal((reply[4] as { status: string }).status, 'error');
    assert.match(String((reply[4] as { response: { reason: string } }).response.reason), /payload must be an object/);
  });

  test('a frame over 1 MiB closes that socket with 1009 and the server keeps serving others', async () => {
    const big = await raw();
    const bystander = await raw();
    const oversizedBefore = fx.endpoint.stats.oversizedFrames;
    big.send(['1', '1', 'room:big', 'ping', { blob: 'x'.repeat(1024 * 1024 + 10) }]);
    assert.equal(await big.closed, 1009);
    assert.equal(fx.endpoint.stats.oversizedFrames - oversizedBefore, 1);
    bystander.send([null, '1', 'phoenix', 'heartbeat', {}]);
    await bystander.waitArray((f) => f[1] === '1');
  });

  test('an unknown protocol version is refused with HTTP 403', async () => {
    await assert.rejects(raw('vsn=3.0.0'), (err: { status: number; body: string }) => {
      assert.equal(err.status, 403);
      assert.equal(JSON.parse(err.body).code, 'UNSUPPORTED_VSN');
      return true;
    });
  });

  test('a connect refused by the socket definition answers its status with a JSON reason', async () => {
    await assert.rejects(raw('vsn=2.0.0&reject=1'), (err: { status: number; body: string }) => {
      assert.equal(err.status, 403);
      assert.deepEqual(JSON.parse(err.body), { code: 'CONNECT_REFUSED', reason: 'rejected by test' });
      return true;
    });
  });

  test('an Origin not in the allow list is refused with 403 and an allowed one connects', async () => {
    await assert.rejects(
      raw('vsn=2.0.0', { headers: { Origin: 'https://evil.example' } }),
      (err: { status: number }) => err.status === 403,
    );
    const allowed = await raw('vsn=2.0.0', { headers: { Origin: 'https://dashboard.example' } });
    allowed.send([null, '1', 'phoenix', 'heartbeat', {}]);
    await allowed.waitArray((f) => f[1] === '1');
  });

  test('a token offered as subprotocol reaches connect and the server answers phoenix', async () => {
    const token = 'secret token/with+chars';
    const encoded = Buffer.from(token).toString('base64').replace(/=+$/, '');
    const client = await raw('vsn=2.0.0&probe=token', { protocols: ['phoenix', `base64url.bearer.phx.${encoded}`] });
    assert.equal(client.ws.protocol, 'phoenix');
    assert.equal(fx.connects.find((c) => c.params.probe === 'token')?.token, token);
  });

  test('disconnect(socketId) closes the sockets of that id', async () => {
    const client = await raw('vsn=2.0.0&id=user:42');
    const other = await raw('vsn=2.0.0&id=user:43');
    await fx.endpoint.disconnect('user:42');
    assert.equal(await client.closed, 1008);
    other.send([null, '1', 'phoenix', 'heartbeat', {}]);
    await other.waitArray((f) => f[1] === '1');
  });

  test('a binary broadcast is one binary frame of kind 2 for V2 sockets', async () => {
    const { binaryPayload } = await import('../../server/channels/index.ts');
    const client = await raw();
    await rawJoin(client, 'room:binary-cast', '1');
    await fx.pubsub.broadcast('room:binary-cast', 'blob', binaryPayload(Buffer.from('hi')));
    const frame = await client.waitFrame((f) => f.binary);
    assert.ok(frame.binary);
    const parsed = parseBinary(frame.data);
    assert.deepEqual(
      { kind: parsed.kind, fields: parsed.fields, data: parsed.data.toString() },
      { kind: 2, fields: ['room:binary-cast', 'blob'], data: 'hi' },
    );
  });

  test('an endpoint mounted where @fastify/websocket is already registered keeps the listener setup and its own limits', async () => {
    const Fastify = (await import('fastify')).default;
    const websocket = (await import('@fastify/websocket')).default;
    const pino = (await import('pino')).default;
    const { createEndpoint, createPubSub, phoenixProtocolHandler } = await import('../../server/channels/index.ts');
    const { getTestPki } = await import('../helpers/pki.ts');
    const pki = await getTestPki();
    const log = pino({ level: 'silent' });
    const pubsub = createPubSub({ log });
    const app = Fastify({
      https: {
        key: pki.server.keyPem,
        cert: pki.server.certPem,
        ca: [pki.rootCa.certPem, pki.signerCa.certPem],
        requestCert: true,
      },
    });
    // The listener's own registration: another route needs another subprotocol, and a larger maxPayload.
    await app.register(websocket, {
      options: {
        maxPayload: 8 * 1024 * 1024,
        handleProtocols: (p: Set<string>) => (p.has('grisp-io-v1') ? 'grisp-io-v1' : phoenixProtocolHandler(p)),
      },
    });
    const endpoint = createEndpoint(
      { connect: async () => ({ ok: true, assigns: {} }), channels: [] },
      { pubsub, log },
    );
    await endpoint.register(app, { path: '/socket' });
    await app.listen({ port: 0, host: '127.0.0.1' });
    try {
      const port = (app.server.address() as { port: number }).port;
      const client = await RawClient.connect(`wss://127.0.0.1:${port}/socket/websocket?vsn=2.0.0`, fx.tls, {
        protocols: ['phoenix', 'base64url.bearer.phx.dG9r'],
      });
      assert.equal(client.ws.protocol, 'phoenix');
      client.send([null, '1', 'phoenix', 'heartbeat', { blob: 'x'.repeat(1024 * 1024 + 10) }]);
      assert.equal(await client.closed, 1009);
      assert.equal(endpoint.stats.oversizedFrames, 1);
    } finally {
      await endpoint.drain();
      await app.close();
      await pubsub.close();
    }
  });

  test('a socket that sends nothing is closed after the idle timeout', async () => {
    const quick = await startFixture({ idleTimeoutMs: 300 });
    try {
      const client = await RawClient.connect(`${quick.wsUrl}?vsn=2.0.0`, quick.tls);
      // 1001 and the idle counter: closed for its silence, not for anything else.
      assert.equal(await client.closed, 1001);
      assert.equal(quick.endpoint.stats.idleTimeouts, 1);
    } finally {
      await quick.close();
    }
  });

  test('LongPoll answers 410 with a token first, 204 on an empty poll, 410 for an unknown token and expires silent sessions', async () => {
    const quick = await startFixture({ longpoll: { pollTimeoutMs: 100, sessionTimeoutMs: 300 } });
    try {
      const base = `${quick.url.replace('wss://', 'https://')}/longpoll?vsn=2.0.0`;
      const first = await httpsGet(base, quick.tls);
      assert.equal(first.status, 200);
      const opened = JSON.parse(first.body) as { status: number; token: string };
      assert.equal(opened.status, 410);
      assert.ok(opened.token.length >= 43, 'token carries 32 random bytes');
      const empty = JSON.parse((await httpsGet(`${base}&token=${opened.token}`, quick.tls)).body);
      assert.deepEqual(empty, { status: 204, token: opened.token });
      const unknown = JSON.parse((await httpsGet(`${base}&token=${'A'.repeat(43)}`, quick.tls)).body);
      assert.deepEqual(unknown, { status: 410 });
      await waitFor(() => quick.endpoint.stats.longpollSessions === 0, 3000, 'session expiry');
      const gone = JSON.parse((await httpsGet(`${base}&token=${opened.token}`, quick.tls)).body);
      assert.equal(gone.status, 410);
    } finally {
      await quick.close();
    }
  });
});
