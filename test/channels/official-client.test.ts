/**
 * Conformance with the OFFICIAL phoenix client (1.8) over mutual TLS: the engine must behave the
 * way that client expects (the Phoenix Channels protocol).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { Presence, type Socket } from 'phoenix';
import type { Message, PubSubAdapter } from '../../server/channels/index.ts';
import { startFixture, type Fixture } from './fixture.ts';
import { disconnectSocket, joinChannel, nextEvent, openSocket, pushAndWait, waitFor } from '../helpers/phoenix.ts';

describe('the channel engine with the official phoenix client', () => {
  let fx: Fixture;
  const sockets: Socket[] = [];

  async function connect(params: Record<string, string> = {}, extra: { longpoll?: boolean } = {}): Promise<Socket> {
    const socket = await openSocket(fx.url, { tls: fx.tls, params, ...extra });
    sockets.push(socket);
    return socket;
  }

  before(async () => {
    fx = await startFixture({ longpoll: { pollTimeoutMs: 500, sessionTimeoutMs: 2000 } });
  });

  after(async () => {
    await Promise.all(sockets.map((s) => disconnectSocket(s)));
    await fx.close();
  });

  test('a join answers ok with the channel response and the client certificate reaches connect', async () => {
    const socket = await connect();
    const response = await joinChannel(socket.channel('room:join-ok'));
    assert.deepEqual(response, { joined: 'room:join-ok', cn: 'room-tester' });
    assert.equal(fx.connects.at(-1)?.transport, 'websocket');
  });

  test('a refused join answers error with the reason', async () => {
    const socket = await connect();
    await assert.rejects(
      joinChannel(socket.channel('room:refused', { refuse: true })),
      (err: { response: unknown }) => {
        assert.deepEqual(err.response, { reason: 'refused by test' });
        return true;
      },
    );
  });

  test('a push gets the reply the channel returns and the session persists between events', async () => {
    const socket = await connect();
    const channel = socket.channel('room:push');
    await joinChannel(channel);
    assert.deepEqual(await pushAndWait(channel, 'ping', { hello: 'world' }), {
      status: 'ok',
      response: { pong: { hello: 'world' } },
    });
    await pushAndWait(channel, 'count', {});
    assert.deepEqual(await pushAndWait(channel, 'count', {}), { status: 'ok', response: { count: 2 } });
  });

  test('join effects are pushed after the join reply', async () => {
    const socket = await connect();
    const channel = socket.channel('room:welcome', { welcome: true });
    const order: string[] = [];
    channel.on('welcome', () => void order.push('welcome'));
    await joinChannel(channel).then(() => void order.push('join reply'));
    await waitFor(() => order.length === 2, 2000, 'welcome push');
    assert.deepEqual(order, ['join reply', 'welcome']);
  });

  test('a broadcast reaches 50 sockets with one encode', async () => {
    const subscribers = await Promise.all(Array.from({ length: 50 }, () => connect()));
    const channels = subscribers.map((s) => s.channel('room:fanout'));
    await Promise.all(channels.map((c) => joinChannel(c)));
    const received = channels.map((c) => nextEvent(c, 'shout'));
    const encodesBefore = fx.endpoint.stats.broadcastEncodes;
    const deliveredBefore = fx.endpoint.stats.broadcastsDelivered;
    await fx.pubsub.broadcast('room:fanout', 'shout', { n: 1 });
    const payloads = await Promise.all(received);
    assert.ok(payloads.every((p) => p.n === 1));
    assert.equal(fx.endpoint.stats.broadcastEncodes - encodesBefore, 1);
    assert.equal(fx.endpoint.stats.broadcastsDelivered - deliveredBefore, 50);
    await Promise.all(subscribers.map((s) => disconnectSocket(s)));
  });

  test('intercepted broadcast events go through handleOut', async () => {
    const socket = await connect();
    const channel = socket.channel('room:intercept');
    await joinChannel(channel);
    const got = nextEvent(channel, 'filtered');
    await fx.pubsub.broadcast('room:intercept', 'filtered', { a: 1 });
    assert.deepEqual(await got, { a: 1, intercepted: true });
  });

  test('leaving a channel replies ok, closes it and runs terminate with reason leave', async () => {
    const socket = await connect();
    const channel = socket.channel('room:leave');
    await joinChannel(channel);
    let closed = false;
    channel.onClose(() => {
      closed = true;
    });
    await new Promise<void>((resolve) => channel.leave().receive('ok', () => resolve()));
    await waitFor(() => closed, 2000, 'phx_close');
    await waitFor(
      () => fx.terminations.some((t) => t.topic === 'room:leave' && t.reason === 'leave'),
      2000,
      'terminate',
    );
  });

  test('a heartbeat round trip is answered', async () => {
    const socket = await connect();
    const rtt = await new Promise<number>((resolve) => socket.ping((ms: number) => resolve(ms)));
    assert.ok(rtt >= 0);
  });

  test('after a drain closes the socket with 1012 the client reconnects and rejoins', async () => {
    const socket = await connect();
    const channel = socket.channel('room:drain');
    await joinChannel(channel);
    const codes: number[] = [];
    socket.onClose((event) => {
      codes.push(event.code);
    });
    let joins = 0;
    const rejoined = new Promise<void>((resolve) => {
      socket.onOpen(() => {
        joins++;
        const check = setInterval(() => {
          if (channel.state === 'joined') {
            clearInterval(check);
            resolve();
          }
        }, 10);
      });
    });
    await fx.endpoint.drain();
    fx.endpoint.resume();
    await rejoined;
    assert.deepEqual(codes.slice(0, 1), [1012]);
    assert.equal(joins, 1);
    assert.deepEqual(await pushAndWait(channel, 'ping', {}), { status: 'ok', response: { pong: {} } });
  });

  test('a crashing handler errors that channel only and the client rejoins it', async () => {
    const socket = await connect();
    const crashing = socket.channel('room:crash');
    const other = socket.channel('room:bystander');
    await joinChannel(crashing);
    await joinChannel(other);
    let errored = false;
    crashing.onError(() => {
      errored = true;
    });
    await pushAndWait(crashing, 'crash', {}, 300);
    await waitFor(() => errored, 2000, 'phx_error');
    await waitFor(() => crashing.state === 'joined', 3000, 'rejoin');
    assert.ok(fx.terminations.some((t) => t.topic === 'room:crash' && t.reason === 'crash'));
    assert.deepEqual(await pushAndWait(other, 'ping', {}), { status: 'ok', response: { pong: {} } });
    assert.deepEqual(await pushAndWait(crashing, 'ping', {}), { status: 'ok', response: { pong: {} } });
  });

  test('a stop effect closes the channel with phx_close and the client does not rejoin', async () => {
    const socket = await connect();
    const channel = socket.channel('room:stop');
    await joinChannel(channel);
    let closed = false;
    channel.onClose(() => {
      closed = true;
    });
    await pushAndWait(channel, 'stop', {});
    await waitFor(() => closed, 2000, 'phx_close');
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(channel.state, 'closed');
    assert.ok(fx.terminations.some((t) => t.topic === 'room:stop' && t.reason === 'stop'));
  });

  test('a timer effect delivers its message to handleInfo', async () => {
    const socket = await connect();
    const channel = socket.channel('room:timer');
    await joinChannel(channel);
    const info = nextEvent(channel, 'info');
    await pushAndWait(channel, 'timer', { after_ms: 20, n: 7 });
    assert.deepEqual(await info, { event: 'tick', n: 7 });
  });

  test('a subscribe effect delivers broadcasts on another topic to handleInfo', async () => {
    const socket = await connect();
    const channel = socket.channel('room:subscriber', { subscribe: 'news:all' });
    await joinChannel(channel);
    const info = nextEvent(channel, 'info');
    await fx.pubsub.broadcast('news:all', 'headline', { title: 't' });
    assert.deepEqual(await info, { event: 'headline', title: 't' });
  });

  test('the LongPoll transport joins, pushes and receives broadcasts', async () => {
    const socket = await connect({ lp: '1' }, { longpoll: true });
    assert.equal(fx.connects.at(-1)?.transport, 'longpoll');
    const channel = socket.channel('room:longpoll');
    assert.deepEqual(await joinChannel(channel), { joined: 'room:longpoll', cn: 'room-tester' });
    assert.deepEqual(await pushAndWait(channel, 'ping', { via: 'lp' }), {
      status: 'ok',
      response: { pong: { via: 'lp' } },
    });
    const got = nextEvent(channel, 'shout');
    await fx.pubsub.broadcast('room:longpoll', 'shout', { lp: true });
    assert.deepEqual(await got, { lp: true });
    // Idle polls (204) keep the session alive past the session timeout.
    await new Promise((r) => setTimeout(r, 2500));
    assert.deepEqual(await pushAndWait(channel, 'count', {}), { status: 'ok', response: { count: 1 } });
  });

  test('the client falls back to LongPoll when the WebSocket cannot connect', async () => {
    const before = fx.connects.filter((c) => c.transport === 'longpoll').length;
    // A WebSocket transport that always fails forces phoenix's fallback.
    class BrokenWebSocket {
      onerror: ((e: unknown) => void) | null = null;
      onclose: ((e: unknown) => void) | null = null;
      readyState = 0;
      constructor() {
        setTimeout(() => {
          this.readyState = 3;
          this.onerror?.('refused');
          this.onclose?.({ code: 1006, reason: '', wasClean: false });
        }, 5);
      }
      close() {}
      send() {}
    }
    const { Socket } = await import('phoenix');
    const { installTlsXMLHttpRequest } = await import('../../device-client/phoenix-transport.ts');
    installTlsXMLHttpRequest(fx.tls);
    const socket = new Socket(fx.url, {
      transport: BrokenWebSocket as never,
      longPollFallbackMs: 200,
      reconnectAfterMs: () => 50,
    });
    sockets.push(socket);
    socket.connect();
    const channel = socket.channel('room:fallback');
    const joined = joinChannel(channel, 5000);
    assert.equal((await joined).joined, 'room:fallback');
    assert.equal(fx.connects.filter((c) => c.transport === 'longpoll').length, before + 1);
  });

  test('presence sends presence_state on join and presence_diff on changes', async () => {
    const first = await connect();
    const a = first.channel('room:presence', { presence_key: 'alice' });
    const presenceA = new Presence(a);
    await joinChannel(a);
    await waitFor(() => presenceA.list().length === 1, 2000, 'alice in presence_state');

    const second = await connect();
    const b = second.channel('room:presence', { presence_key: 'bob' });
    const presenceB = new Presence(b);
    await joinChannel(b);
    await waitFor(() => presenceB.list().length === 2, 2000, 'both in presence_state');
    await waitFor(() => presenceA.list().length === 2, 2000, 'bob via presence_diff');
    const listed = presenceA.list((key: string, { metas }: { metas: { phx_ref: string; cn: string }[] }) => ({
      key,
      cn: metas[0]!.cn,
      ref: metas[0]!.phx_ref,
    }));
    assert.deepEqual(listed.map((e: { key: string }) => e.key).sort(), ['alice', 'bob']);
    assert.ok(listed.every((e: { ref: string; cn: string }) => typeof e.ref === 'string' && e.cn === 'room-tester'));

    await fx.presence.untrack('room:presence', 'bob');
    await waitFor(() => presenceA.list().length === 1, 2000, 'bob leaves via presence_diff');
  });

  test('presence replicates across nodes through the PubSub adapter', async () => {
    const { createPresence, createPubSub } = await import('../../server/channels/index.ts');
    const pino = (await import('pino')).default;
    // Two nodes joined by an in-memory bus: each adapter delivers what the OTHER node published.
    const nodes: ((m: Message) => void)[] = [];
    const busAdapter = (self: number): PubSubAdapter => ({
      async publish(message) {
        for (const [i, deliver] of nodes.entries()) if (i !== self) deliver(JSON.parse(JSON.stringify(message)));
      },
      async start(deliver) {
        nodes[self] = deliver;
      },
      async stop() {},
    });
    const log = pino({ level: 'silent' });
    const pubsubA = createPubSub({ adapter: busAdapter(0), log });
    const pubsubB = createPubSub({ adapter: busAdapter(1), log });
    const nodeA = createPresence(pubsubA, { nodeName: 'node-a' });
    const nodeB = createPresence(pubsubB, { nodeName: 'node-b' });
    const diffsOnA: unknown[] = [];
    pubsubA.subscribe('room:cluster', (m) => diffsOnA.push(m.payload));
    await nodeA.track('room:cluster', 'device-a', { on: 'a' });
    await nodeB.track('room:cluster', 'device-b', { on: 'b' });
    await waitFor(() => Object.keys(nodeA.list('room:cluster')).length === 2, 2000, 'B replicated to A');
    assert.deepEqual(Object.keys(nodeB.list('room:cluster')).sort(), ['device-a', 'device-b']);
    assert.ok(
      diffsOnA.some((d) => JSON.stringify(d).includes('device-b')),
      'clients on A saw the presence_diff from B',
    );
    await nodeB.close();
    await waitFor(() => !('device-b' in nodeA.list('room:cluster')), 2000, 'node_down removes its entries');
    await nodeA.close();
    await pubsubA.close();
    await pubsubB.close();
  });
});
