/**
 * The WebSocket transport: subprotocol negotiation, token extraction, the `Connection` a socket
 * writes to (with back-pressure: a consumer that stays too slow is cut) and the route that
 * upgrades, hands the request to the endpoint's handshake and admits the socket.
 */
import type { ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import websocketPlugin from '@fastify/websocket';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { RawData, WebSocket } from 'ws';
import type { OutFrame } from './serializers.ts';
import type { Connection, PhoenixSocket } from './socket.ts';
import type { EndpointStats } from './types.ts';
import { type Accepted, type Handshaker, type SocketRegistry, Transport } from './socket-registry.ts';

export const AUTH_TOKEN_PREFIX = 'base64url.bearer.phx.';

/**
 * `handleProtocols` for the `ws` server: answer `phoenix` when the client offers it (the
 * official client offers `["phoenix", "base64url.bearer.phx.<token>"]`), never echo the token.
 */
export function phoenixProtocolHandler(protocols: Set<string>): string | false {
  return protocols.has('phoenix') ? 'phoenix' : false;
}

/** The bearer token from `Sec-WebSocket-Protocol` (base64 or base64url, padding optional). */
export function tokenFromProtocolHeader(header: string | undefined): string | undefined {
  if (!header) return undefined;
  for (const entry of header.split(',')) {
    const value = entry.trim();
    if (value.startsWith(AUTH_TOKEN_PREFIX)) {
      // Node's base64 decoder accepts both alphabets; the phoenix client uses btoa minus '='.
      return Buffer.from(value.slice(AUTH_TOKEN_PREFIX.length), 'base64').toString('utf8');
    }
  }
  return undefined;
}

const TEXT = { binary: false } as const;
const BINARY = { binary: true } as const;
const OPEN = 1;

export class WsConnection implements Connection {
  readonly transport = 'websocket' as const;

  constructor(
    readonly ws: WebSocket,
    readonly maxBufferedBytes: number,
    readonly stats: EndpointStats,
    readonly log: Logger,
  ) {}

  write(frame: OutFrame): void {
    const ws = this.ws;
    if (ws.readyState !== OPEN) return;
    if (ws.bufferedAmount > this.maxBufferedBytes) {
      // Buffering without bound would let one slow device exhaust memory: cut it; it reconnects.
      this.stats.slowConsumers++;
      this.log.warn({ buffered: ws.bufferedAmount }, 'slow consumer disconnected');
      ws.terminate();
      return;
    }
    // The same Buffer goes to every subscriber; ws writes it without copying.
    ws.send(frame.bytes, frame.binary ? BINARY : TEXT);
  }

  close(code: number, reason: string): void {
    // Already closing or closed: the 'close' event follows on its own.
    if (this.ws.readyState === OPEN) this.ws.close(code, reason);
  }

  destroy(): void {
    this.ws.terminate();
  }
}

export interface WebSocketTransportOptions {
  /** Larger frames close the socket with 1009. */
  maxFrameBytes: number;
  /** A socket whose unsent output exceeds this is disconnected. */
  maxBufferedBytes: number;
  /** Close a socket that sent nothing (not even a heartbeat) for this long. */
  idleTimeoutMs: number;
}

function rawToBuffer(data: RawData): Buffer {
  if (Buffer.isBuffer(data)) return data;
  if (Array.isArray(data)) return Buffer.concat(data);
  return Buffer.from(data);
}

/**
 * The WebSocket transport (`<path>/websocket`): the handshake runs in preValidation, so a
 * refusal is a plain HTTP answer with its status; the upgraded socket is admitted to the
 * registry and its idle time is checked by the registry's sweep.
 */
export class WebSocketTransport<A> extends Transport<A, WebSocketTransportOptions> {
  readonly #sockets = new WeakMap<WebSocket, PhoenixSocket<A>>();
  readonly #accepted = new WeakMap<object, Accepted<A>>();
  readonly #onMessage: (this: WebSocket, data: RawData, isBinary: boolean) => void;
  readonly #onClose: (this: WebSocket, code: number) => void;
  readonly #onError: (this: WebSocket, err: Error & { code?: string }) => void;

  constructor(registry: SocketRegistry<A>, handshake: Handshaker<A>, options: WebSocketTransportOptions, log: Logger) {
    super(registry, handshake, options, log);

    // Shared handlers: `this` is the ws, so no closure per socket.
    const sockets = this.#sockets;
    const stats = registry.stats;
    const { maxFrameBytes } = options;
    this.#onMessage = function onMessage(data, isBinary) {
      const socket = sockets.get(this);
      if (!socket) return;
      const bytes = rawToBuffer(data);
      if (bytes.length > maxFrameBytes) {
        stats.oversizedFrames++;
        socket.log.warn({ bytes: bytes.length }, 'frame too large; socket closed');
        this.close(1009, 'frame too large');
        return;
      }
      socket.handleFrame(bytes, isBinary);
    };
    this.#onClose = function onClose(code) {
      sockets.get(this)?.transportClosed(`websocket closed (${code})`);
    };
    this.#onError = function onError(err) {
      // ws enforces its own maxPayload (closing with 1009) before our message handler sees the frame.
      if (err.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') stats.oversizedFrames++;
      sockets.get(this)?.log.debug({ err }, 'websocket error');
      // What @fastify/websocket's default error handler did (its listener is removed in releaseUpgrade).
      this.terminate();
    };
  }

  /** Registers @fastify/websocket on `app` unless it is there already (then its own options stay). */
  async install(app: FastifyInstance): Promise<void> {
    if (app.hasDecorator('websocketServer')) return;
    await app.register(websocketPlugin, {
      options: {
        maxPayload: this.options.maxFrameBytes,
        perMessageDeflate: false,
        handleProtocols: (protocols: Set<string>) => phoenixProtocolHandler(protocols),
      },
    });
  }

  /** Adds the `<base>/websocket` route. */
  route(scope: FastifyInstance, base: string): void {
    scope.get(
      `${base}/websocket`,
      { websocket: true, preValidation: (request, reply) => this.#preValidation(request, reply) },
      (ws, request) => this.#upgraded(ws, request),
    );
  }

  protected sweep(now: number, sockets: ReadonlySet<PhoenixSocket<A>>): void {
    const { idleTimeoutMs } = this.options;
    for (const socket of sockets) {
      if (socket.connection.transport !== 'websocket' || now - socket.lastSeen <= idleTimeoutMs) continue;
      this.registry.stats.idleTimeouts++;
      socket.log.info({ idle_ms: now - socket.lastSeen }, 'idle socket closed');
      // 1001: a client that is alive after all reconnects.
      socket.close(1001, 'idle timeout');
    }
  }

  async #preValidation(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    if (!request.ws) {
      await reply.code(400).send({ code: 'UPGRADE_REQUIRED', reason: 'this route expects a WebSocket upgrade' });
      return;
    }
    const token = tokenFromProtocolHeader(request.headers['sec-websocket-protocol']);
    const hs = await this.handshake(request, 'websocket', token);
    if (!hs.ok) {
      await reply.code(hs.status).send({ code: hs.code, reason: hs.reason });
      return;
    }
    this.#accepted.set(request.raw, hs);
  }

  #upgraded(ws: WebSocket, request: FastifyRequest): void {
    const hs = this.#accepted.get(request.raw);
    this.#accepted.delete(request.raw);
    if (!hs) {
      ws.close(1011, 'handshake state lost');
      return;
    }
    releaseUpgrade(ws, request);
    const { maxBufferedBytes } = this.options;
    const socket = this.registry.admit(hs, new WsConnection(ws, maxBufferedBytes, this.registry.stats, this.log));
    this.#sockets.set(ws, socket);
    ws.on('message', this.#onMessage);
    ws.on('close', this.#onClose);
    ws.on('error', this.#onError);
  }
}

/**
 * After the upgrade nothing needs the HTTP request any more, but @fastify/websocket leaves it
 * reachable for the socket's whole life: a ServerResponse attached to the TLS socket (with
 * Fastify's request, reply and per-request logger behind it) and an error listener closing
 * over request and reply — about 5 KiB per connection. Detach both; the transport's error
 * handler terminates on error as the plugin's default handler did.
 */
function releaseUpgrade(ws: WebSocket, request: FastifyRequest): void {
  ws.removeAllListeners('error');
  const socket = request.raw.socket as (Socket & { _httpMessage?: ServerResponse | null }) | null;
  const response = socket?._httpMessage;
  if (socket && response) response.detachSocket(socket);
}
