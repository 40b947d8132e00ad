/**
 * A real mutual-TLS Fastify server with a small `room:*` test channel on the channel engine.
 * No fleet code: only what the conformance suite needs to exercise every protocol edge.
 */
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import Fastify, { type FastifyInstance } from 'fastify';
import pino from 'pino';
import {
  binaryPayload,
  createEndpoint,
  createPresence,
  createPubSub,
  isBinaryPayload,
  type ChannelDefinition,
  type Effect,
  type Endpoint,
  type EndpointOptions,
  type Presence,
  type PubSubWithStats,
  type SocketDefinition,
  type TerminateReason,
} from '../../server/channels/index.ts';
import { deviceCert, getTestPki } from '../helpers/pki.ts';
import type { TlsClientOptions } from '../helpers/phoenix.ts';

export interface Assigns {
  cn: string;
  token?: string;
}

export interface RoomSession {
  count: number;
}

export interface Fixture {
  app: FastifyInstance;
  endpoint: Endpoint;
  pubsub: PubSubWithStats;
  presence: Presence;
  /** `wss://127.0.0.1:<port>/socket` */
  url: string;
  /** `wss://127.0.0.1:<port>/socket/websocket` */
  wsUrl: string;
  tls: TlsClientOptions;
  terminations: { topic: string; reason: TerminateReason }[];
  connects: { params: Record<string, string>; token?: string; cn: string; transport: string }[];
  disconnects: string[];
  close(): Promise<void>;
}

export async function startFixture(options: Partial<EndpointOptions> = {}): Promise<Fixture> {
  const pki = await getTestPki();
  const cred = await deviceCert('room-tester');
  const log = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });
  const pubsub = createPubSub({ log });
  const presence = createPresence(pubsub, { nodeName: 'test-node' });
  const terminations: Fixture['terminations'] = [];
  const connects: Fixture['connects'] = [];
  const disconnects: string[] = [];

  const room: ChannelDefinition<Assigns, RoomSession> = {
    intercept: ['filtered'],
    async join(topic, params, ctx) {
      if (params.crash) throw new Error('join exploded on purpose');
      if (params.refuse) return { status: 'error', response: { reason: 'refused by test' } };
      const effects: Effect[] = [];
      if (params.welcome) effects.push({ type: 'push', event: 'welcome', payload: { topic } });
      if (typeof params.presence_key === 'string') {
        await presence.track(topic, params.presence_key, { cn: ctx.assigns.cn });
        effects.push(presence.stateEffect(topic));
      }
      if (typeof params.subscribe === 'string') effects.push({ type: 'subscribe', topic: params.subscribe });
      return { status: 'ok', response: { joined: topic, cn: ctx.assigns.cn }, session: { count: 0 }, effects };
    },
    async handleIn(event, payload, session, ctx) {
      switch (event) {
        case 'ping':
          return { reply: { status: 'ok', response: { pong: payload } } };
        case 'count':
          return {
            session: { count: session.count + 1 },
            reply: { status: 'ok', response: { count: session.count + 1 } },
          };
        case 'crash':
          throw new Error('handleIn exploded on purpose');
        case 'stop':
          return { reply: { status: 'ok', response: {} }, effects: [{ type: 'stop' }] };
        case 'shout':
          await pubsub.broadcast(ctx.topic, 'shout', payload);
          return { reply: { status: 'ok', response: {} } };
        case 'timer':
          return {
            reply: { status: 'ok', response: {} },
            effects: [
              {
                type: 'timer',
                key: 'k',
                afterMs: Number(payload.after_ms ?? 10),
                message: { topic: ctx.topic, event: 'tick', payload: { n: payload.n ?? 1 } },
              },
            ],
          };
        case 'echo_binary':
          if (!isBinaryPayload(payload)) return { reply: { status: 'error', response: { reason: 'expected binary' } } };
          return {
            reply: { status: 'ok', response: { bytes: payload.binary.length } },
            effects: [{ type: 'push', event: 'bin', payload: binaryPayload(Buffer.from(payload.binary).reverse()) }],
          };
        case 'bad_shape':
          return 'not a result' as never;
        case 'silent':
          return {};
        default:
          return { reply: { status: 'error', response: { reason: `unknown event ${event}` } } };
      }
    },
    async handleInfo(message) {
      return { effects: [{ type: 'push', event: 'info', payload: { event: message.event, ...message.payload } }] };
    },
    async handleOut(message) {
      return { effects: [{ type: 'push', event: message.event, payload: { ...message.payload, intercepted: true } }] };
    },
    async terminate(reason, _session, ctx) {
      terminations.push({ topic: ctx.topic, reason });
    },
  };

  const definition: SocketDefinition<Assigns> = {
    async connect(info) {
      const cn = String((info.request.socket as TLSSocket).getPeerCertificate().subject?.CN ?? '');
      connects.push({ params: info.params, token: info.token, cn, transport: info.transport });
      if (info.params.reject) return { ok: false, status: 403, reason: 'rejected by test' };
      return { ok: true, assigns: { cn, token: info.token }, id: info.params.id };
    },
    channels: [{ pattern: 'room:*', channel: room }],
    async disconnected(assigns) {
      disconnects.push(assigns.cn);
    },
  };

  const endpoint = createEndpoint(definition, { pubsub, log, ...options });
  const app = Fastify({
    https: {
      key: pki.server.keyPem,
      cert: pki.server.certPem,
      ca: [pki.rootCa.certPem, pki.signerCa.certPem],
      requestCert: true,
      rejectUnauthorized: true,
    },
  }) as unknown as FastifyInstance;
  await endpoint.register(app, { path: '/socket' });
  await app.listen({ port: 0, host: '127.0.0.1' });
  const port = (app.server.address() as AddressInfo).port;

  return {
    app,
    endpoint,
    pubsub,
    presence,
    url: `wss://127.0.0.1:${port}/socket`,
    wsUrl: `wss://127.0.0.1:${port}/socket/websocket`,
    tls: { ca: pki.rootCa.certPem, cert: cred.certPem, key: cred.keyPem },
    terminations,
    connects,
    disconnects,
    async close() {
      await endpoint.drain(1001).catch(() => undefined);
      await app.close();
      await presence.close();
      await pubsub.close();
    },
  };
}
