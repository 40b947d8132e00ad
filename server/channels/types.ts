/**
 * The contract between the generic Phoenix Channels engine and the code that defines sockets
 * and channels on it (device-socket/, the operator socket, tests). The engine knows nothing of
 * fleets; channel definitions know nothing of frames, serializers or transports.
 *
 * Channels are thin: every callback returns `{ session, reply?, effects? }` and the engine
 * stores the session and applies the effects.
 */
import type { IncomingMessage } from 'node:http';
import type { Logger } from 'pino';

export type Payload = Record<string, unknown>;

/** What a socket's `connect` sees: query params, bearer token from the subprotocol, the HTTP request (TLS socket inside). */
export interface ConnectInfo {
  params: Record<string, string>;
  /** Token from `Sec-WebSocket-Protocol: base64url.bearer.phx.<token>` (decoded), if offered. */
  token?: string;
  request: IncomingMessage;
  transport: 'websocket' | 'longpoll';
}

export type ConnectResult<A> =
  | {
      ok: true;
      assigns: A;
      /** Socket id: used to disconnect every socket of one identity. */
      id?: string;
      /** When the credential expires (epoch ms): the socket is closed then, within the endpoint's sweep interval. */
      expiresAt?: number;
    }
  | {
      ok: false /** 409: the credential belongs to another kind of client. */;
      status: 401 | 403 | 409;
      reason: string;
    };

/** A message delivered through PubSub. */
export interface Message {
  topic: string;
  event: string;
  payload: Payload;
}

export type Effect =
  /** Push `[join_ref, null, topic, event, payload]` on this channel. */
  | { type: 'push'; event: string; payload: Payload }
  /** Receive PubSub messages on another topic through `handleInfo`. */
  | { type: 'subscribe'; topic: string }
  | { type: 'unsubscribe'; topic: string }
  /** Stop the channel normally: the client gets `phx_close` and does not rejoin. */
  | { type: 'stop'; reason?: string }
  /** Close the whole socket this channel runs on (every channel of it terminates), with a close code. */
  | { type: 'close_socket'; code: number; reason: string }
  /** Deliver `message` to `handleInfo` after `afterMs`; scheduling a key again replaces the old timer. */
  | { type: 'timer'; key: string; afterMs: number; message: Message }
  | { type: 'cancel_timer'; key: string };

export interface Reply {
  status: 'ok' | 'error';
  response: Payload;
}

export interface HandleResult<S> {
  session?: S;
  reply?: Reply;
  effects?: Effect[];
}

export type JoinResult<S> =
  | { status: 'ok'; response?: Payload; session: S /** Applied after the join reply is written. */; effects?: Effect[] }
  | { status: 'error'; response: { reason: string } & Payload };

export interface ChannelContext<A> {
  socketId: string;
  assigns: A;
  topic: string;
  joinRef: string;
  log: Logger;
}

export type TerminateReason = 'leave' | 'stop' | 'crash' | 'disconnect' | 'duplicate_join';

export interface ChannelDefinition<A, S> {
  join(topic: string, params: Payload, ctx: ChannelContext<A>): Promise<JoinResult<S>>;
  /** An event from the client; no `reply` in the result means the engine answers nothing. */
  handleIn?(event: string, payload: Payload, session: S, ctx: ChannelContext<A>): Promise<HandleResult<S>>;
  /** A message on a topic this channel subscribed to by effect, or a timer firing. */
  handleInfo?(message: Message, session: S, ctx: ChannelContext<A>): Promise<HandleResult<S>>;
  /** Broadcast events on the channel's own topic that go through `handleOut` instead of the fastlane. */
  intercept?: readonly string[];
  handleOut?(message: Message, session: S, ctx: ChannelContext<A>): Promise<HandleResult<S>>;
  terminate?(reason: TerminateReason, session: S, ctx: ChannelContext<A>): Promise<void>;
}

export interface ChannelRoute<A> {
  /** A topic or a prefix pattern ending in `*`, e.g. `device:*`. */
  pattern: string;
  channel: ChannelDefinition<A, unknown>;
}

export interface SocketDefinition<A> {
  connect(info: ConnectInfo): Promise<ConnectResult<A>>;
  channels: ChannelRoute<A>[];
  /** Called once when the socket is gone (after every channel's terminate). */
  disconnected?(assigns: A, reason: string): Promise<void>;
}

/** Cross-node publish/subscribe. Channels subscribe to their topic; broadcasts are encoded once per serializer. */
export interface PubSub {
  /** Delivers to every subscriber on every node. */
  broadcast(topic: string, event: string, payload: Payload): Promise<void>;
  /** Delivers to subscribers on this node only. */
  localBroadcast(topic: string, event: string, payload: Payload): void;
  subscribe(topic: string, listener: (message: Message) => void): () => void;
  /**
   * Every message on every topic that starts with `prefix`, after the topic's own subscribers:
   * for a node-wide reader of one kind of topic (the device listener reads the device topics).
   */
  subscribePrefix(prefix: string, listener: (message: Message) => void): () => void;
  close(): Promise<void>;
}

/** How a PubSub reaches other nodes (local: nothing; PostgreSQL: LISTEN/NOTIFY). */
export interface PubSubAdapter {
  publish(message: Message): Promise<void>;
  /** Registers the callback for messages published by other nodes. */
  start(deliver: (message: Message) => void): Promise<void>;
  stop(): Promise<void>;
}

/** Counters an endpoint exposes; `sockets` and `channels` are live gauges. */
export interface EndpointStats {
  sockets: number;
  channels: number;
  framesIn: number;
  framesOut: number;
  /** Broadcast encodings performed (at most one per serializer per broadcast). */
  broadcastEncodes: number;
  /** Broadcast frames written to sockets. */
  broadcastsDelivered: number;
  invalidFrames: number;
  staleFrames: number;
  unknownEvents: number;
  channelCrashes: number;
  oversizedFrames: number;
  idleTimeouts: number;
  slowConsumers: number;
  connectsRefused: number;
  longpollSessions: number;
}
