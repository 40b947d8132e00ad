/**
 * A Phoenix socket endpoint: mounts `<path>/websocket` and `<path>/longpoll` on a Fastify
 * instance, runs the handshake (a chain of early-return checks, each with its status), owns the
 * sockets, ONE shared sweep for idle sockets and dead LongPoll sessions, drain and disconnect.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { FastifyInstance, FastifyRegister, FastifyReply, FastifyRequest } from 'fastify';
import fastifyPlugin from 'fastify-plugin';
import websocketPlugin from '@fastify/websocket';
import type { RawData, WebSocket } from 'ws';
import type { Logger } from 'pino';
import { LongPollSession, type LongPollBody, type LongPollTimings } from './longpoll.ts';
import { TopicRegistry } from './registry.ts';
import { serializerFor, type Serializer } from './serializers.ts';
import { emptyStats, PhoenixSocket, type Engine, type EndpointStats } from './socket.ts';
import type { ConnectInfo, PubSub, SocketDefinition } from './types.ts';
import { phoenixProtocolHandler, tokenFromProtocolHeader, WsConnection } from './websocket.ts';

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

type Handshake<A> =
  | { ok: true; serializer: Serializer; assigns: A; id: string; expiresAt?: number }
  | { ok: false; status: number; code: string; reason: string };

const DISCONNECT_TOPIC = 'phx:disconnect';

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

function rawToBuffer(data: RawData): Buffer {
  if (Buffer.isBuffer(data)) return data;
  if (Array.isArray(data)) return Buffer.concat(data);
  return Buffer.from(data);
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
  const drainTimeoutMs = options.drainTimeoutMs ?? 10_000;
  const stats = emptyStats();
  const registry = new TopicRegistry(options.pubsub, stats, log);
  const sockets = new Set<PhoenixSocket<A>>();
  const socketsById = new Map<string, Set<PhoenixSocket<A>>>();
  const wsSockets = new WeakMap<WebSocket, PhoenixSocket<A>>();
  /** Sockets whose credential expires (connect returned `expiresAt`), and when; the sweep closes them. */
  const expiring = new Map<PhoenixSocket<A>, number>();
  const accepted = new WeakMap<object, Handshake<A> & { ok: true }>();
  const longpolls = new Map<string, LongPollSession<A>>();
  let draining = false;
  let emptied: (() => void) | undefined;

  const engine: Engine<A> = {
    definition,
    log,
    stats,
    registry,
    maxChannels: options.maxChannels ?? 100,
    socketClosed(socket) {
      if (!sockets.delete(socket)) return;
      stats.sockets--;
      expiring.delete(socket);
      const same = socketsById.get(socket.id);
      if (same) {
        same.delete(socket);
        if (same.size === 0) socketsById.delete(socket.id);
      }
      if (sockets.size === 0) emptied?.();
    },
  };

  function addSocket(socket: PhoenixSocket<A>): void {
    sockets.add(socket);
    stats.sockets++;
    let same = socketsById.get(socket.id);
    if (!same) {
      same = new Set();
      socketsById.set(socket.id, same);
    }
    same.add(socket);
  }

  const unsubscribeDisconnect = options.pubsub.subscribe(DISCONNECT_TOPIC, (message) => {
    const { id, reason } = message.payload;
    if (typeof id !== 'string') return;
    for (const socket of socketsById.get(id) ?? [])
      socket.close(1008, typeof reason === 'string' ? reason : 'disconnected');
  });

  // One sweep for every socket instead of a timer per socket.
  const sweepEveryMs = Math.max(50, Math.min(idleTimeoutMs, timings.sessionTimeoutMs) / 4);
  const sweep = setInterval(() => {
    const now = Date.now();
    for (const socket of sockets) {
      if (socket.connection.transport === 'websocket') {
        if (now - socket.lastSeen > idleTimeoutMs) {
          stats.idleTimeouts++;
          socket.log.info({ idle_ms: now - socket.lastSeen }, 'idle socket closed');
          // 1001: a client that is alive after all reconnects.
          socket.close(1001, 'idle timeout');
        }
      }
    }
    for (const session of longpolls.values()) {
      if (!session.polling && now - session.lastPoll > timings.sessionTimeoutMs)
        session.close(1001, 'longpoll session expired');
    }
    for (const [socket, expiresAt] of expiring) {
      if (expiresAt > now) continue;
      expiring.delete(socket);
      socket.log.info({ expired_at: new Date(expiresAt).toISOString() }, 'socket closed: its credential expired');
      // 1008: a client that reconnects is refused until it has a current credential.
      socket.close(1008, 'credential expired');
    }
  }, sweepEveryMs);
  sweep.unref();

  function originAllowed(origin: string, host: string | undefined): boolean {
    const allow = options.checkOrigin;
    if (allow === '*') return true;
    if (allow) return allow.some((o) => o.toLowerCase() === origin.toLowerCase());
    try {
      return host !== undefined && new URL(origin).host.toLowerCase() === host.toLowerCase();
    } catch {
      return false;
    }
  }

  async function handshake(
    request: FastifyRequest,
    transport: ConnectInfo['transport'],
    token: string | undefined,
  ): Promise<Handshake<A>> {
    if (draining)
      return {
        ok: false,
        status: 503,
        code: 'DRAINING',
        reason: 'server is draining; reconnect to another node or retry later',
      };
    const query = (request.query ?? {}) as Record<string, unknown>;
    const vsn = typeof query.vsn === 'string' ? query.vsn : undefined;
    const serializer = serializerFor(vsn);
    if (!serializer)
      return {
        ok: false,
        status: 403,
        code: 'UNSUPPORTED_VSN',
        reason: `protocol version ${vsn} is not supported; use vsn=2.0.0 or 1.0.0`,
      };
    const origin = request.headers.origin;
    if (origin !== undefined && !originAllowed(origin, request.headers.host)) {
      return { ok: false, status: 403, code: 'ORIGIN_REFUSED', reason: `origin ${origin} is not allowed` };
    }
    const params = firstValues(query, transport === 'longpoll' ? ['vsn', 'token'] : ['vsn']);
    try {
      const result = await definition.connect({ params, token, request: request.raw, transport });
      if (!result.ok) return { ok: false, status: result.status, code: 'CONNECT_REFUSED', reason: result.reason };
      return {
        ok: true,
        serializer,
        assigns: result.assigns,
        id: result.id ?? `anon:${randomUUID()}`,
        ...(result.expiresAt === undefined ? {} : { expiresAt: result.expiresAt }),
      };
    } catch (err) {
      log.error({ err }, 'socket connect crashed');
      return { ok: false, status: 500, code: 'CONNECT_CRASHED', reason: 'connect failed on the server' };
    }
  }

  function refused(hs: Handshake<A> & { ok: false }, transport: string): void {
    stats.connectsRefused++;
    log.info({ status: hs.status, code: hs.code, reason: hs.reason, transport }, 'socket connect refused');
  }

  function newSocket(hs: Handshake<A> & { ok: true }, connection: WsConnection | LongPollSession<A>): PhoenixSocket<A> {
    const socket = new PhoenixSocket<A>(engine, hs.id, hs.assigns, hs.serializer, connection, log);
    addSocket(socket);
    if (hs.expiresAt !== undefined) expiring.set(socket, hs.expiresAt);
    return socket;
  }

  // Shared handlers: `this` is the ws, so no closure per socket.
  function onWsMessage(this: WebSocket, data: RawData, isBinary: boolean): void {
    const socket = wsSockets.get(this);
    if (!socket) return;
    const bytes = rawToBuffer(data);
    if (bytes.length > maxFrameBytes) {
      stats.oversizedFrames++;
      socket.log.warn({ bytes: bytes.length }, 'frame too large; socket closed');
      this.close(1009, 'frame too large');
      return;
    }
    socket.handleFrame(bytes, isBinary);
  }

  function onWsClose(this: WebSocket, code: number): void {
    const socket = wsSockets.get(this);
    if (!socket) return;
    socket.transportClosed(`websocket closed (${code})`);
  }

  function onWsError(this: WebSocket, err: Error & { code?: string }): void {
    // ws enforces its own maxPayload (closing with 1009) before our message handler sees the frame.
    if (err.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') stats.oversizedFrames++;
    wsSockets.get(this)?.log.debug({ err }, 'websocket error');
    // What @fastify/websocket's default error handler did (its listener is removed in releaseUpgrade).
    this.terminate();
  }

  async function wsPreValidation(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    if (!request.ws) {
      await reply.code(400).send({ code: 'UPGRADE_REQUIRED', reason: 'this route expects a WebSocket upgrade' });
      return;
    }
    const token = tokenFromProtocolHeader(request.headers['sec-websocket-protocol']);
    const hs = await handshake(request, 'websocket', token);
    if (!hs.ok) {
      refused(hs, 'websocket');
      await reply.code(hs.status).send({ code: hs.code, reason: hs.reason });
      return;
    }
    accepted.set(request.raw, hs);
  }

  /**
   * After the upgrade nothing needs the HTTP request any more, but @fastify/websocket leaves it
   * reachable for the socket's whole life: a ServerResponse attached to the TLS socket (with
   * Fastify's request, reply and per-request logger behind it) and an error listener closing
   * over request and reply — about 5 KiB per connection. Detach both; onWsError terminates
   * on error as the plugin's default handler did.
   */
  function releaseUpgrade(ws: WebSocket, request: FastifyRequest): void {
    ws.removeAllListeners('error');
    const socket = request.raw.socket as (Socket & { _httpMessage?: ServerResponse | null }) | null;
    const response = socket?._httpMessage;
    if (socket && response) response.detachSocket(socket);
  }

  function wsHandler(ws: WebSocket, request: FastifyRequest): void {
    const hs = accepted.get(request.raw);
    accepted.delete(request.raw);
    if (!hs) {
      ws.close(1011, 'handshake state lost');
      return;
    }
    releaseUpgrade(ws, request);
    const socket = newSocket(hs, new WsConnection(ws, maxBufferedBytes, stats, log));
    wsSockets.set(ws, socket);
    ws.on('message', onWsMessage);
    ws.on('close', onWsClose);
    ws.on('error', onWsError);
  }

  function longpollToken(request: FastifyRequest): string | undefined {
    const query = request.query as Record<string, unknown> | undefined;
    const fromQuery = typeof query?.token === 'string' ? query.token : undefined;
    const header = request.headers['x-phoenix-longpoll-token'];
    return fromQuery ?? (typeof header === 'string' ? header : undefined);
  }

  async function longpollGet(request: FastifyRequest, reply: FastifyReply): Promise<LongPollBody> {
    const token = longpollToken(request);
    if (token !== undefined) {
      const session = longpolls.get(token);
      // Unknown token: the session is gone; the client reconnects and rejoins.
      if (!session) return { status: 410 };
      const answered = session.poll();
      reply.raw.once('close', () => {
        if (!reply.raw.writableFinished) session.abandonPoll();
      });
      return answered;
    }
    const authHeader = request.headers['x-phoenix-authtoken'];
    const hs = await handshake(request, 'longpoll', typeof authHeader === 'string' ? authHeader : undefined);
    if (!hs.ok) {
      refused(hs, 'longpoll');
      return { status: hs.status === 403 || hs.status === 401 || hs.status === 409 ? 403 : 500 };
    }
    // 32 random bytes: unguessable, and the map key binds it to exactly this session.
    const sessionToken = randomBytes(32).toString('base64url');
    const session = new LongPollSession<A>(sessionToken, timings, maxBufferedBytes, stats, log, (closed, reason) => {
      longpolls.delete(closed.token);
      stats.longpollSessions--;
      closed.socket?.transportClosed(reason);
    });
    session.socket = newSocket(hs, session);
    longpolls.set(sessionToken, session);
    stats.longpollSessions++;
    return { status: 410, token: sessionToken };
  }

  async function longpollPost(request: FastifyRequest): Promise<LongPollBody> {
    const token = longpollToken(request);
    const session = token === undefined ? undefined : longpolls.get(token);
    if (!session?.socket) return { status: 410 };
    const body = request.body;
    // Current clients send newline-delimited frames; older ones one JSON frame.
    const lines =
      typeof body === 'string'
        ? body.split(/\r?\n/)
        : body === undefined || body === null
          ? []
          : [JSON.stringify(body)];
    for (const line of lines) {
      if (line.length === 0) continue;
      if (Buffer.byteLength(line) > maxFrameBytes) {
        stats.oversizedFrames++;
        session.close(1009, 'frame too large');
        return { status: 410 };
      }
      session.socket.handleFrame(Buffer.from(line, 'utf8'), false);
    }
    return { status: 200 };
  }

  async function close(): Promise<void> {
    clearInterval(sweep);
    unsubscribeDisconnect();
  }

  return {
    stats,
    close,
    get topicCount() {
      return registry.topicCount;
    },

    async register(host, { path }) {
      const base = path.replace(/\/$/, '');
      // Without encapsulation, so that the websocket plugin and the onClose hook land on `host` itself.
      const mount = fastifyPlugin(async (app: FastifyInstance) => {
        if (!app.hasDecorator('websocketServer')) {
          await app.register(websocketPlugin, {
            options: {
              maxPayload: maxFrameBytes,
              perMessageDeflate: false,
              handleProtocols: (protocols: Set<string>) => phoenixProtocolHandler(protocols),
            },
          });
        }
        await app.register(async (scope) => {
          scope.addContentTypeParser(
            'application/x-ndjson',
            { parseAs: 'string', bodyLimit: maxFrameBytes * 2 },
            (_req, body, done) => done(null, body),
          );
          scope.get(`${base}/websocket`, { websocket: true, preValidation: wsPreValidation }, wsHandler);
          scope.get(`${base}/longpoll`, longpollGet);
          scope.post(`${base}/longpoll`, { bodyLimit: maxFrameBytes * 2 }, longpollPost);
        });
        app.addHook('onClose', async () => {
          for (const session of [...longpolls.values()]) session.close(1001, 'server closing');
          await close();
        });
      });
      await host.register(mount);
    },

    async drain(code = 1012) {
      if (code === 1000) throw new RangeError('drain code 1000 would stop clients from reconnecting; use 1012 or 1001');
      draining = true;
      if (sockets.size === 0) return;
      const all = [...sockets];
      const empty = new Promise<void>((resolve) => (emptied = resolve));
      for (const socket of all) socket.close(code, 'server draining');
      const timer = setTimeout(() => {
        for (const socket of sockets) socket.connection.destroy();
      }, drainTimeoutMs);
      await empty;
      clearTimeout(timer);
      emptied = undefined;
      await Promise.allSettled(all.map((s) => s.finished));
    },

    resume() {
      draining = false;
    },

    async disconnect(socketId, reason) {
      await options.pubsub.broadcast(
        DISCONNECT_TOPIC,
        'disconnect',
        reason === undefined ? { id: socketId } : { id: socketId, reason },
      );
    },

    closeSockets(socketId, reason, match) {
      let closed = 0;
      for (const socket of [...(socketsById.get(socketId) ?? [])]) {
        if (match && !match(socket.assigns)) continue;
        socket.close(1008, reason);
        closed++;
      }
      return closed;
    },
  };
}
