/**
 * The endpoint's registry of sockets, whatever their transport: it admits a socket once its
 * handshake passed, finds sockets by id (disconnect, on this node or through PubSub), closes
 * those whose credential expired, runs ONE sweep for every transport, and drains.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import { TopicRegistry } from './registry.ts';
import type { Serializer } from './serializers.ts';
import { type Connection, type Engine, PhoenixSocket } from './socket.ts';
import type { ConnectInfo, EndpointStats, PubSub, SocketDefinition } from './types.ts';

/** A handshake that passed: what the new socket is made of. */
export interface Accepted<A> {
  ok: true;
  serializer: Serializer;
  assigns: A;
  id: string;
  expiresAt?: number;
}

/** A refused handshake: the status and reason the transport answers with. */
export interface Refused {
  ok: false;
  status: number;
  code: string;
  reason: string;
}

export type Handshake<A> = Accepted<A> | Refused;

/**
 * Runs the endpoint's checks and the socket's `connect` for one transport's request; a refusal
 * is counted and logged before it is returned.
 */
export type Handshaker<A> = (
  request: FastifyRequest,
  transport: ConnectInfo['transport'],
  token: string | undefined,
) => Promise<Handshake<A>>;

export interface SocketRegistryOptions {
  pubsub: PubSub;
  log: Logger;
  maxChannels: number;
  /** How long `drain()` waits for closing handshakes before cutting sockets. */
  drainTimeoutMs: number;
  /** How often the one sweep runs. */
  sweepEveryMs: number;
  /** Told how long each broadcast took to reach this node's subscribed sockets. */
  onFanout?: (seconds: number, sockets: number) => void;
}

/** A transport's part of the sweep, called with the time and every socket of the endpoint. */
export type Sweeper<A> = (now: number, sockets: ReadonlySet<PhoenixSocket<A>>) => void;

/**
 * A transport of the endpoint: it runs the endpoint's handshake for its requests, admits the
 * sockets that pass to the registry, and adds its own check to the registry's one sweep.
 */
export abstract class Transport<A, O> {
  constructor(
    protected readonly registry: SocketRegistry<A>,
    protected readonly handshake: Handshaker<A>,
    protected readonly options: O,
    protected readonly log: Logger,
  ) {
    registry.onSweep((now, sockets) => this.sweep(now, sockets));
  }

  /** Adds the transport's routes under `base` to `scope`. */
  abstract route(scope: FastifyInstance, base: string): void;

  /** The transport's part of the registry's sweep. */
  protected abstract sweep(now: number, sockets: ReadonlySet<PhoenixSocket<A>>): void;
}

const DISCONNECT_TOPIC = 'phx:disconnect';

export function emptyStats(): EndpointStats {
  return {
    sockets: 0,
    channels: 0,
    framesIn: 0,
    framesOut: 0,
    broadcastEncodes: 0,
    broadcastsDelivered: 0,
    invalidFrames: 0,
    staleFrames: 0,
    unknownEvents: 0,
    channelCrashes: 0,
    oversizedFrames: 0,
    idleTimeouts: 0,
    slowConsumers: 0,
    connectsRefused: 0,
    longpollSessions: 0,
  };
}

export class SocketRegistry<A> {
  readonly stats = emptyStats();
  readonly topics: TopicRegistry;
  readonly engine: Engine<A>;
  readonly #options: SocketRegistryOptions;
  readonly #sockets = new Set<PhoenixSocket<A>>();
  readonly #byId = new Map<string, Set<PhoenixSocket<A>>>();
  /** Sockets whose credential expires (connect returned `expiresAt`), and when; the sweep closes them. */
  readonly #expiring = new Map<PhoenixSocket<A>, number>();
  readonly #sweepers: Sweeper<A>[] = [];
  readonly #sweep: NodeJS.Timeout;
  readonly #unsubscribeDisconnect: () => void;
  #draining = false;
  #emptied: (() => void) | undefined;

  constructor(definition: SocketDefinition<A>, options: SocketRegistryOptions) {
    this.#options = options;
    this.topics = new TopicRegistry(options.pubsub, this.stats, options.log, options.onFanout);
    this.engine = {
      definition,
      log: options.log,
      stats: this.stats,
      registry: this.topics,
      maxChannels: options.maxChannels,
      socketClosed: (socket) => this.#remove(socket),
    };
    this.#unsubscribeDisconnect = options.pubsub.subscribe(DISCONNECT_TOPIC, (message) => {
      const { id, reason } = message.payload;
      if (typeof id !== 'string') return;
      for (const socket of this.#byId.get(id) ?? [])
        socket.close(1008, typeof reason === 'string' ? reason : 'disconnected');
    });
    // One sweep for every socket instead of a timer per socket.
    this.#sweep = setInterval(() => this.#sweepOnce(Date.now()), options.sweepEveryMs);
    this.#sweep.unref();
  }

  /** True between `drain()` and `resume()`: handshakes are refused. */
  get draining(): boolean {
    return this.#draining;
  }

  /** Adds a transport's check to the one sweep. */
  onSweep(sweeper: Sweeper<A>): void {
    this.#sweepers.push(sweeper);
  }

  /** A new socket for a passed handshake, writing to `connection`. */
  admit(hs: Accepted<A>, connection: Connection): PhoenixSocket<A> {
    const socket = new PhoenixSocket<A>(this.engine, hs.id, hs.assigns, hs.serializer, connection, this.#options.log);
    this.#sockets.add(socket);
    this.stats.sockets++;
    let same = this.#byId.get(socket.id);
    if (!same) {
      same = new Set();
      this.#byId.set(socket.id, same);
    }
    same.add(socket);
    if (hs.expiresAt !== undefined) this.#expiring.set(socket, hs.expiresAt);
    return socket;
  }

  #remove(socket: PhoenixSocket<A>): void {
    if (!this.#sockets.delete(socket)) return;
    this.stats.sockets--;
    this.#expiring.delete(socket);
    const same = this.#byId.get(socket.id);
    if (same) {
      same.delete(socket);
      if (same.size === 0) this.#byId.delete(socket.id);
    }
    if (this.#sockets.size === 0) this.#emptied?.();
  }

  #sweepOnce(now: number): void {
    for (const sweeper of this.#sweepers) sweeper(now, this.#sockets);
    for (const [socket, expiresAt] of this.#expiring) {
      if (expiresAt > now) continue;
      this.#expiring.delete(socket);
      socket.log.info({ expired_at: new Date(expiresAt).toISOString() }, 'socket closed: its credential expired');
      // 1008: a client that reconnects is refused until it has a current credential.
      socket.close(1008, 'credential expired');
    }
  }

  /** Closes this node's sockets with this id (those whose assigns `match`, when given) with 1008. */
  closeSockets(socketId: string, reason: string, match?: (assigns: A) => boolean): number {
    let closed = 0;
    for (const socket of [...(this.#byId.get(socketId) ?? [])]) {
      if (match && !match(socket.assigns)) continue;
      socket.close(1008, reason);
      closed++;
    }
    return closed;
  }

  /** Closes the sockets with this id on every node, through PubSub. */
  async disconnect(socketId: string, reason?: string): Promise<void> {
    await this.#options.pubsub.broadcast(
      DISCONNECT_TOPIC,
      'disconnect',
      reason === undefined ? { id: socketId } : { id: socketId, reason },
    );
  }

  async drain(code: number): Promise<void> {
    this.#draining = true;
    if (this.#sockets.size === 0) return;
    const all = [...this.#sockets];
    const empty = new Promise<void>((resolve) => {
      this.#emptied = resolve;
    });
    for (const socket of all) socket.close(code, 'server draining');
    const timer = setTimeout(() => {
      for (const socket of this.#sockets) socket.connection.destroy();
    }, this.#options.drainTimeoutMs);
    await empty;
    clearTimeout(timer);
    this.#emptied = undefined;
    await Promise.allSettled(all.map((s) => s.finished));
  }

  resume(): void {
    this.#draining = false;
  }

  /** Stops the sweep and the disconnect subscription. */
  close(): void {
    clearInterval(this.#sweep);
    this.#unsubscribeDisconnect();
  }
}
