/**
 * The socket state machine, transport independent: topic ↔ channel map, join refs, the
 * channel limit, heartbeat, duplicate join, stale join_ref, unmatched topic and leave.
 * Each protocol edge case is its own small branch.
 */
import type { Logger } from 'pino';
import { describeBadString, findBadString } from '../input-gate.ts';
import { ChannelProcess } from './channel.ts';
import type { OutFrame, Serializer, InboundMessage } from './serializers.ts';
import type { TopicRegistry } from './registry.ts';
import type { ChannelRoute, EndpointStats, Payload, Reply, SocketDefinition } from './types.ts';

/** What a transport offers the socket: write an encoded frame, close. */
export interface Connection {
  readonly transport: 'websocket' | 'longpoll';
  write(frame: OutFrame): void;
  /** Ends the connection; the transport then calls `socket.transportClosed()`. */
  close(code: number, reason: string): void;
  /** Ends the connection at once, without a closing handshake. */
  destroy(): void;
}

/** What every socket of one endpoint shares. */
export interface Engine<A> {
  readonly definition: SocketDefinition<A>;
  readonly log: Logger;
  readonly stats: EndpointStats;
  readonly registry: TopicRegistry;
  readonly maxChannels: number;
  socketClosed(socket: PhoenixSocket<A>): void;
}

function routeFor<A>(routes: readonly ChannelRoute<A>[], topic: string): ChannelRoute<A> | undefined {
  for (const route of routes) {
    const p = route.pattern;
    if (p.endsWith('*') ? topic.startsWith(p.slice(0, -1)) : topic === p) return route;
  }
  return undefined;
}

const EMPTY: Payload = Object.freeze({}) as Payload;

export class PhoenixSocket<A> {
  readonly channels = new Map<string, ChannelProcess<A>>();
  /** Date.now() of the last frame received; the endpoint's sweep closes idle sockets. */
  lastSeen = Date.now();
  closed = false;
  /** Settles once terminate and disconnected callbacks ran (set when the transport closes). */
  finished: Promise<void> | undefined;
  #terminations: Promise<void>[] = [];
  #log: Logger | undefined;

  constructor(
    readonly engine: Engine<A>,
    readonly id: string,
    readonly assigns: A,
    readonly serializer: Serializer,
    readonly connection: Connection,
    readonly parentLog: Logger,
  ) {}

  /** This socket's logger (bound to its id), created on first use: most sockets never log. */
  get log(): Logger {
    this.#log ??= this.parentLog.child({ socket_id: this.id });
    return this.#log;
  }

  /** A frame from the client (text or binary). Never throws. */
  handleFrame(data: Buffer, isBinary: boolean): void {
    if (this.closed) return;
    this.lastSeen = Date.now();
    this.engine.stats.framesIn++;
    const decoded = this.serializer.decode(data, isBinary);
    if (!decoded.ok) {
      this.engine.stats.invalidFrames++;
      this.log.warn({ error: decoded.error, topic: decoded.topic }, 'invalid frame');
      // Answer where the protocol has a place for it (a ref to reply to); otherwise ignore.
      if (decoded.ref !== null && decoded.topic !== null) {
        this.reply(decoded.joinRef, decoded.ref, decoded.topic, {
          status: 'error',
          response: { reason: `invalid message: ${decoded.error}` },
        });
      }
      return;
    }
    this.dispatch(decoded.message);
  }

  dispatch(msg: InboundMessage): void {
    const { topic, event } = msg;

    // Invalid string: NUL or a lone surrogate in the topic, event or payload never reaches a channel.
    const bad = findBadString(topic, 'topic') ?? findBadString(event, 'event') ?? findBadString(msg.payload, 'payload');
    if (bad) {
      this.engine.stats.invalidFrames++;
      this.log.warn({ field: bad.path, problem: bad.problem, event }, 'message refused: invalid string');
      this.reply(msg.joinRef, msg.ref, topic, {
        status: 'error',
        response: { reason: describeBadString(bad), details: { code: 'invalid', field: bad.path } },
      });
      return;
    }

    // Heartbeat: always ok, whatever is joined.
    if (topic === 'phoenix' && event === 'heartbeat') {
      this.reply(msg.joinRef, msg.ref, topic, { status: 'ok', response: EMPTY });
      return;
    }

    if (event === 'phx_join') {
      this.#join(msg);
      return;
    }

    const channel = this.channels.get(topic);

    if (!channel) {
      // Leave of a topic not joined (e.g. the server closed it meanwhile): ok, nothing to do.
      if (event === 'phx_leave') {
        this.reply(msg.joinRef, msg.ref, topic, { status: 'ok', response: EMPTY });
        return;
      }
      // Event on a topic not joined.
      this.engine.stats.unknownEvents++;
      this.reply(null, msg.ref, topic, { status: 'error', response: { reason: 'unmatched topic' } });
      return;
    }

    // Stale join_ref: a message for an earlier incarnation of this topic. V1 clients send none.
    if (msg.joinRef !== null && msg.joinRef !== channel.joinRef) {
      this.engine.stats.staleFrames++;
      this.log.debug({ topic, event }, 'ignoring message with stale join_ref');
      return;
    }

    if (event === 'phx_leave') {
      channel.leave(msg.ref);
      return;
    }
    channel.handleIn(event, msg.payload, msg.ref);
  }

  #join(msg: InboundMessage): void {
    const { topic } = msg;
    const existing = this.channels.get(topic);
    // Duplicate join: close the old incarnation with its own join_ref, then join anew.
    if (existing) {
      this.lifecycle(existing.joinRef, topic, 'phx_close', EMPTY);
      existing.close('duplicate_join');
    }
    if (this.channels.size >= this.engine.maxChannels) {
      this.reply(msg.joinRef, msg.ref, topic, { status: 'error', response: { reason: 'too many channels joined' } });
      return;
    }
    const route = routeFor(this.engine.definition.channels, topic);
    if (!route) {
      this.engine.stats.unknownEvents++;
      this.reply(msg.joinRef, msg.ref, topic, { status: 'error', response: { reason: 'unmatched topic' } });
      return;
    }
    const channel = new ChannelProcess<A>(this, topic, msg.joinRef, route.channel);
    this.channels.set(topic, channel);
    this.engine.stats.channels++;
    channel.join(msg.payload, msg.ref);
  }

  reply(joinRef: string | null, ref: string | null, topic: string, reply: Reply): void {
    if (this.closed) return;
    this.#encodeAndWrite(() => this.serializer.reply(joinRef, ref, topic, reply), topic, 'phx_reply');
  }

  /** A push on a joined channel: `[join_ref, null, topic, event, payload]`. */
  push(joinRef: string | null, topic: string, event: string, payload: Payload): void {
    if (this.closed) return;
    this.#encodeAndWrite(() => this.serializer.message(joinRef, null, topic, event, payload), topic, event);
  }

  /** `phx_close` / `phx_error`: `[join_ref, join_ref, topic, event, payload]`. */
  lifecycle(joinRef: string | null, topic: string, event: string, payload: Payload): void {
    if (this.closed) return;
    this.#encodeAndWrite(() => this.serializer.message(joinRef, joinRef, topic, event, payload), topic, event);
  }

  #encodeAndWrite(encode: () => OutFrame, topic: string, event: string): void {
    let frame: OutFrame;
    try {
      frame = encode();
    } catch (err) {
      // A payload JSON cannot carry (BigInt, cycle) or a binary field over 255 bytes.
      this.log.error({ err, topic, event }, 'cannot encode frame; dropped');
      return;
    }
    this.write(frame);
  }

  write(frame: OutFrame): void {
    if (this.closed) return;
    this.engine.stats.framesOut++;
    this.connection.write(frame);
  }

  /** Called by a channel when it closes, to free its topic. */
  forget(channel: ChannelProcess<A>): void {
    if (this.channels.get(channel.topic) === channel) {
      this.channels.delete(channel.topic);
      this.engine.stats.channels--;
    }
  }

  trackTermination(done: Promise<void>): void {
    this.#terminations.push(done);
  }

  /** Asks the transport to close; cleanup happens in `transportClosed`. */
  close(code: number, reason: string): void {
    if (this.closed) return;
    this.connection.close(code, reason);
  }

  /** The transport is gone: every channel terminates, then the definition's `disconnected`. */
  transportClosed(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    for (const channel of [...this.channels.values()]) channel.close('disconnect');
    this.engine.socketClosed(this);
    const terminations = this.#terminations;
    this.#terminations = [];
    const disconnected = this.engine.definition.disconnected;
    this.finished = Promise.allSettled(terminations).then(async () => {
      if (!disconnected) return;
      try {
        await disconnected.call(this.engine.definition, this.assigns, reason);
      } catch (err) {
        this.log.error({ err }, 'socket disconnected callback threw');
      }
    });
  }
}
