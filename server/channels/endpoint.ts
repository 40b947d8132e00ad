/**
 * A Phoenix socket endpoint, split as Phoenix splits it: the endpoint runs the handshake (a
 * chain of early-return checks, each with its status) and mounts its transports, WebSocket
 * (`<path>/websocket`, websocket.ts) and LongPoll (`<path>/longpoll`, longpoll.ts); the socket
 * registry (socket-registry.ts) owns the sockets, ONE shared sweep, drain and disconnect.
 */
import { randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyRegister } from 'fastify';
import fastifyPlugin from 'fastify-plugin';
import type { Logger } from 'pino';
import { type LongPollTimings, LongPollTransport } from './longpoll.ts';
import { serializerFor } from './serializers.ts';
import { type Handshake, type Handshaker, type Refused, SocketRegistry } from './socket-registry.ts';
import type { EndpointStats, PubSub, SocketDefinition } from './types.ts';
import { WebSocketTransport } from './websocket.ts';

/** A Fastify instance over any server (the device listener is HTTPS, the API plain HTTP). */
export interface PluginHost {
  register: FastifyRegister<PromiseLike<unknown>>;
}

export interface EndpointOptions {
  pubsub: PubSub;
  log: Logger;
  /** Close a WebSocket that sent nothing (not even a heartbeat) for this long. Default 60 s. */
  idleTimeoutMs?: number;
  /** Allowed `Origin` values, or '*'. Default: the origin's host must equal the Host header. */
  checkOrigin?: '*' | readonly string[];
  /** Larger frames close the socket with 1009. Default 1 MiB. */
  maxFrameBytes?: number;
  /** Channels one socket may join. Default 100. */
  maxChannels?: number;
  /** A socket whose unsent output exceeds this is disconnected. Default 8 MiB. */
  maxBufferedBytes?: number;
  longpoll?: Partial<LongPollTimings>;
  /** How long drain() waits for closing handshakes before cutting sockets. Default 10 s. */
  drainTimeoutMs?: number;
}

export interface Endpoint<A = unknown> {
  /** Mounts `<path>/websocket` and `<path>/longpoll`; registers @fastify/websocket only if absent. */
  register(app: PluginHost, opts: { path: string }): Promise<void>;
  /** Closes every socket with `code` (1012 by default; never 1000, clients must reconnect) and refuses new ones until `resume()`. */
  drain(code?: number): Promise<void>;
  /** Accepts connections again after `drain()`. */
  resume(): void;
  /**
   * Closes every socket whose connect returned this id, on every node (through PubSub), with
   * 1008 and `reason` (default 'disconnected'; at most 123 bytes) in the close frame.
   */
  disconnect(socketId: string, reason?: string): Promise<void>;
  /**
   * Closes this node's sockets with this id (those whose assigns `match`, when given) with 1008
   * and `reason`, at once on every transport (a LongPoll session too); returns how many.
   */
  closeSockets(socketId: string, reason: string, match?: (assigns: A) => boolean): number;
  readonly stats: Readonly<EndpointStats>;
  /** Topics this node listens on for its channels. */
  readonly topicCount: number;
  /** Stops the sweep and the PubSub subscriptions (sockets should be drained first). */
  close(): Promise<void>;
}

function firstValues(query: unknown, omit: readonly string[]): Record<string, string> {
  const params: Record<string, string> = {};
  if (typeof query !== 'object' || query === null) return params;
  for (const [key, value] of Object.entries(query)) {
    if (omit.includes(key)) continue;
    const first = Array.isArray(value) ? value[0] : value;
    if (typeof first === 'string') params[key] = first;
  }
  return params;
}

function originAllowed(allow: EndpointOptions['checkOrigin'], origin: string, host: string | undefined): boolean {
  if (allow === '*') return true;
  if (allow) return allow.some((o) => o.toLowerCase() === origin.toLowerCase());
  try {
    return host !== undefined && new URL(origin).host.toLowerCase() === host.toLowerCase();
  } catch {
    return false;
  }
}

/** The endpoint's checks, then the socket's `connect`; every refusal is counted and logged. */
function handshaker<A>(
  definition: SocketDefinition<A>,
  registry: SocketRegistry<A>,
  options: EndpointOptions,
): Handshaker<A> {
  const log = options.log;
  const refuse = (refusal: Omit<Refused, 'ok'>, transport: string): Refused => {
    registry.stats.connectsRefused++;
    log.info({ ...refusal, transport }, 'socket connect refused');
    return { ok: false, ...refusal };
  };

  return async (request, transport, token): Promise<Handshake<A>> => {
    if (registry.draining)
      return refuse(
        { status: 503, code: 'DRAINING', reason: 'server is draining; reconnect to another node or retry later' },
        transport,
      );
    const query = (request.query ?? {}) as Record<string, unknown>;
    const vsn = typeof query.vsn === 'string' ? query.vsn : undefined;
    const serializer = serializerFor(vsn);
    if (!serializer)
      return refuse(
        {
          status: 403,
          code: 'UNSUPPORTED_VSN',
          reason: `protocol version ${vsn} is not supported; use vsn=2.0.0 or 1.0.0`,
        },
        transport,
      );
    const origin = request.headers.origin;
    if (origin !== undefined && !originAllowed(options.checkOrigin, origin, request.headers.host))
      return refuse({ status: 403, code: 'ORIGIN_REFUSED', reason: `origin ${origin} is not allowed` }, transport);
    const params = firstValues(query, transport === 'longpoll' ? ['vsn', 'token'] : ['vsn']);
    try {
      const result = await definition.connect({ params, token, request: request.raw, transport });
      if (!result.ok)
        return refuse({ status: result.status, code: 'CONNECT_REFUSED', reason: result.reason }, transport);
      return {
        ok: true,
        serializer,
        assigns: result.assigns,
        id: result.id ?? `anon:${randomUUID()}`,
        ...(result.expiresAt === undefined ? {} : { expiresAt: result.expiresAt }),
      };
    } catch (err) {
      log.error({ err }, 'socket connect crashed');
      return refuse({ status: 500, code: 'CONNECT_CRASHED', reason: 'connect failed on the server' }, transport);
    }
  };
}

/** Creates an endpoint for `definition`; mount it with `endpoint.register(app, { path: '/socket' })`. */
export function createEndpoint<A>(definition: SocketDefinition<A>, options: EndpointOptions): Endpoint<A> {
  const log = options.log;
  const idleTimeoutMs = options.idleTimeoutMs ?? 60_000;
  const maxFrameBytes = options.maxFrameBytes ?? 1024 * 1024;
  const maxBufferedBytes = options.maxBufferedBytes ?? 8 * 1024 * 1024;
  const timings: LongPollTimings = {
    pollTimeoutMs: options.longpoll?.pollTimeoutMs ?? 10_000,
    sessionTimeoutMs: options.longpoll?.sessionTimeoutMs ?? 15_000,
  };
  const registry = new SocketRegistry<A>(definition, {
    pubsub: options.pubsub,
    log,
    maxChannels: options.maxChannels ?? 100,
    drainTimeoutMs: options.drainTimeoutMs ?? 10_000,
    sweepEveryMs: Math.max(50, Math.min(idleTimeoutMs, timings.sessionTimeoutMs) / 4),
  });
  const handshake = handshaker(definition, registry, options);
  const websocket = new WebSocketTransport(
    registry,
    handshake,
    { maxFrameBytes, maxBufferedBytes, idleTimeoutMs },
    log,
  );
  const longpoll = new LongPollTransport(registry, handshake, { timings, maxFrameBytes, maxBufferedBytes }, log);

  async function close(): Promise<void> {
    registry.close();
  }

  return {
    stats: registry.stats,
    close,
    get topicCount() {
      return registry.topics.topicCount;
    },

    async register(host, { path }) {
      const base = path.replace(/\/$/, '');
      // Without encapsulation, so that the websocket plugin and the onClose hook land on `host` itself.
      const mount = fastifyPlugin(async (app: FastifyInstance) => {
        await websocket.install(app);
        await app.register(async (scope) => {
          websocket.route(scope, base);
          longpoll.route(scope, base);
        });
        app.addHook('onClose', async () => {
          longpoll.closeAll();
          await close();
        });
      });
      await host.register(mount);
    },

    async drain(code = 1012) {
      if (code === 1000) throw new RangeError('drain code 1000 would stop clients from reconnecting; use 1012 or 1001');
      await registry.drain(code);
    },

    resume() {
      registry.resume();
    },

    disconnect(socketId, reason) {
      return registry.disconnect(socketId, reason);
    },

    closeSockets(socketId, reason, match) {
      return registry.closeSockets(socketId, reason, match);
    },
  };
}
