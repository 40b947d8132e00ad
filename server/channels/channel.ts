/**
 * One joined (or joining) channel on one socket: runs the definition's callbacks one at a time,
 * stores the returned session and applies the returned effects (thin channels: callbacks
 * return data, the engine acts). A callback that throws crashes this channel only (`phx_error`).
 */
import type {
  ChannelContext,
  ChannelDefinition,
  Effect,
  HandleResult,
  JoinResult,
  Message,
  Payload,
  Reply,
  TerminateReason,
} from './types.ts';
import type { Logger } from 'pino';
import type { Subscriber } from './registry.ts';
import { isPlainObject, type OutFrame, type Serializer } from './serializers.ts';

/**
 * What a channel process needs of the connection it runs on. `PhoenixSocket` is one; the edge
 * runtime (server/edges/runtime.ts) provides another for links that speak other protocols.
 */
export interface ChannelHost<A> {
  readonly id: string;
  readonly assigns: A;
  readonly log: Logger;
  readonly serializer: Serializer;
  readonly engine: {
    readonly stats: { channelCrashes: number; unknownEvents: number };
    readonly registry: {
      addFastlane(channel: Subscriber): void;
      removeFastlane(channel: Subscriber): void;
      addInfo(topic: string, channel: Subscriber): void;
      removeInfo(topic: string, channel: Subscriber): void;
    };
  };
  write(frame: OutFrame): void;
  reply(joinRef: string | null, ref: string | null, topic: string, reply: Reply): void;
  push(joinRef: string | null, topic: string, event: string, payload: Payload): void;
  lifecycle(joinRef: string | null, topic: string, event: string, payload: Payload): void;
  forget(channel: ChannelProcess<A>): void;
  trackTermination(done: Promise<void>): void;
  /** Closes the connection with `code` and `reason` (the `close_socket` effect). */
  close(code: number, reason: string): void;
}

export function assertNever(value: never): never {
  throw new Error(`unexpected value: ${JSON.stringify(value)}`);
}

/** Thrown when a callback returns something that is not a `HandleResult`/`JoinResult`. */
export class ChannelResultError extends Error {
  readonly code = 'CHANNEL_BAD_RESULT';
  constructor(callback: string, expected: string, got: unknown) {
    let shown: string;
    try {
      shown = JSON.stringify(got) ?? String(got);
    } catch {
      shown = String(got);
    }
    super(`${callback} must return ${expected}; got ${shown.slice(0, 200)}`);
  }
}

const HANDLE_SHAPE = '{ session?, reply?: { status: "ok"|"error", response: object }, effects?: Effect[] }';
const JOIN_SHAPE = '{ status: "ok", session, response?, effects? } or { status: "error", response: { reason } }';

function checkReply(reply: unknown): reply is Reply | undefined {
  if (reply === undefined) return true;
  return isPlainObject(reply) && (reply.status === 'ok' || reply.status === 'error') && isPlainObject(reply.response);
}

function checkHandleResult<S>(callback: string, result: unknown): HandleResult<S> {
  if (
    !isPlainObject(result) ||
    !checkReply(result.reply) ||
    !(result.effects === undefined || Array.isArray(result.effects))
  ) {
    throw new ChannelResultError(callback, HANDLE_SHAPE, result);
  }
  return result as HandleResult<S>;
}

function checkJoinResult<S>(result: unknown): JoinResult<S> {
  if (isPlainObject(result)) {
    if (
      result.status === 'ok' &&
      (result.response === undefined || isPlainObject(result.response)) &&
      (result.effects === undefined || Array.isArray(result.effects))
    ) {
      return result as JoinResult<S>;
    }
    if (result.status === 'error' && isPlainObject(result.response) && typeof result.response.reason === 'string') {
      return result as JoinResult<S>;
    }
  }
  throw new ChannelResultError('join', JOIN_SHAPE, result);
}

type ChannelState = 'joining' | 'joined' | 'closed';

/** One settled promise every channel's callback queue starts from (not one per channel). */
const SETTLED: Promise<void> = Promise.resolve();

/** What callbacks see; `log` is a prototype getter so the socket's logger is created only when used. */
class Context<A> implements ChannelContext<A> {
  readonly socketId: string;
  readonly assigns: A;
  readonly #socket: ChannelHost<A>;

  constructor(
    socket: ChannelHost<A>,
    readonly topic: string,
    readonly joinRef: string,
  ) {
    this.#socket = socket;
    this.socketId = socket.id;
    this.assigns = socket.assigns;
  }

  get log(): ChannelContext<A>['log'] {
    return this.#socket.log;
  }
}

export class ChannelProcess<A, S = unknown> {
  state: ChannelState = 'joining';
  session: S | undefined;
  readonly ctx: ChannelContext<A>;
  #queue: Promise<void> = SETTLED;
  #timers: Map<string, NodeJS.Timeout> | undefined;
  /** Topics subscribed by effect (delivered to handleInfo). */
  #infoTopics: Set<string> | undefined;
  #hasSession = false;

  constructor(
    readonly socket: ChannelHost<A>,
    readonly topic: string,
    readonly joinRef: string | null,
    readonly definition: ChannelDefinition<A, S>,
  ) {
    this.ctx = new Context(socket, topic, joinRef ?? '');
  }

  intercepts(event: string): boolean {
    return this.definition.intercept?.includes(event) ?? false;
  }

  /** Runs `work` after every earlier callback of this channel; a throw crashes the channel. */
  enqueue(work: () => Promise<void>): void {
    this.#queue = this.#queue.then(work).catch((err: unknown) => this.crash(err));
  }

  join(params: Payload, ref: string | null): void {
    this.enqueue(async () => {
      let result: JoinResult<S>;
      try {
        result = checkJoinResult<S>(await this.definition.join(this.topic, params, this.ctx));
      } catch (err) {
        this.socket.engine.stats.channelCrashes++;
        this.socket.log.error({ err, topic: this.topic }, 'channel join crashed');
        if (this.state === 'closed') return;
        this.socket.reply(this.joinRef, ref, this.topic, { status: 'error', response: { reason: 'join crashed' } });
        this.#close(null);
        return;
      }
      if (result.status === 'error') {
        if (this.state === 'closed') return;
        this.socket.reply(this.joinRef, ref, this.topic, { status: 'error', response: result.response });
        this.#close(null);
        return;
      }
      this.session = result.session;
      this.#hasSession = true;
      // Closed while joining (duplicate join, socket gone): terminate already ran its course.
      if (this.state === 'closed') return this.#terminateLater(this.closedBecause ?? 'disconnect');
      this.state = 'joined';
      this.socket.engine.registry.addFastlane(this);
      this.socket.reply(this.joinRef, ref, this.topic, { status: 'ok', response: result.response ?? {} });
      // Effects after the reply: the client must see the join succeed before any push.
      if (result.effects) this.applyEffects(result.effects);
    });
  }

  handleIn(event: string, payload: Payload, ref: string | null): void {
    this.enqueue(async () => {
      if (this.state !== 'joined') return;
      const handleIn = this.definition.handleIn;
      if (!handleIn) {
        this.socket.engine.stats.unknownEvents++;
        this.socket.reply(this.joinRef, ref, this.topic, { status: 'error', response: { reason: 'unhandled event' } });
        return;
      }
      const result = checkHandleResult<S>(
        'handleIn',
        await handleIn.call(this.definition, event, payload, this.session as S, this.ctx),
      );
      this.#apply(result, ref);
    });
  }

  handleInfo(message: Message): void {
    this.enqueue(async () => {
      if (this.state !== 'joined') return;
      const handleInfo = this.definition.handleInfo;
      if (!handleInfo) {
        this.socket.engine.stats.unknownEvents++;
        return;
      }
      const result = checkHandleResult<S>(
        'handleInfo',
        await handleInfo.call(this.definition, message, this.session as S, this.ctx),
      );
      this.#apply(result, null);
    });
  }

  handleOut(message: Message): void {
    this.enqueue(async () => {
      if (this.state !== 'joined') return;
      const handleOut = this.definition.handleOut;
      if (!handleOut) {
        // Intercepted but no handler: behave like the fastlane.
        this.socket.push(this.joinRef, this.topic, message.event, message.payload);
        return;
      }
      const result = checkHandleResult<S>(
        'handleOut',
        await handleOut.call(this.definition, message, this.session as S, this.ctx),
      );
      this.#apply(result, null);
    });
  }

  /** `phx_leave` from the client: reply ok, then `phx_close`, after pending callbacks. */
  leave(ref: string | null): void {
    this.enqueue(async () => {
      if (this.state === 'closed') return;
      this.socket.reply(this.joinRef, ref, this.topic, { status: 'ok', response: {} });
      this.socket.lifecycle(this.joinRef, this.topic, 'phx_close', {});
      this.close('leave');
    });
  }

  #apply(result: HandleResult<S>, ref: string | null): void {
    if ('session' in result) this.session = result.session;
    if (this.state !== 'joined') return;
    if (result.reply && ref !== null) this.socket.reply(this.joinRef, ref, this.topic, result.reply);
    if (result.effects) this.applyEffects(result.effects);
  }

  applyEffects(effects: readonly Effect[]): void {
    for (const effect of effects) {
      if (this.state !== 'joined') return;
      switch (effect.type) {
        case 'push':
          this.socket.push(this.joinRef, this.topic, effect.event, effect.payload);
          break;
        case 'subscribe':
          this.#infoTopics ??= new Set();
          if (!this.#infoTopics.has(effect.topic)) {
            this.#infoTopics.add(effect.topic);
            this.socket.engine.registry.addInfo(effect.topic, this);
          }
          break;
        case 'unsubscribe':
          if (this.#infoTopics?.delete(effect.topic)) this.socket.engine.registry.removeInfo(effect.topic, this);
          break;
        case 'stop':
          this.socket.lifecycle(this.joinRef, this.topic, 'phx_close', {});
          this.close('stop');
          break;
        case 'close_socket':
          this.socket.close(effect.code, effect.reason);
          return;
        case 'timer': {
          this.#timers ??= new Map();
          const previous = this.#timers.get(effect.key);
          if (previous) clearTimeout(previous);
          const message = effect.message;
          const key = effect.key;
          const handle = setTimeout(() => {
            this.#timers?.delete(key);
            this.handleInfo(message);
          }, effect.afterMs);
          handle.unref();
          this.#timers.set(key, handle);
          break;
        }
        case 'cancel_timer': {
          const handle = this.#timers?.get(effect.key);
          if (handle) {
            clearTimeout(handle);
            this.#timers!.delete(effect.key);
          }
          break;
        }
        default:
          assertNever(effect);
      }
    }
  }

  /** A callback threw: `phx_error` for this channel only; the client rejoins. */
  crash(err: unknown): void {
    this.socket.engine.stats.channelCrashes++;
    this.socket.log.error({ err, topic: this.topic }, 'channel crashed');
    if (this.state === 'closed') return;
    this.socket.lifecycle(this.joinRef, this.topic, 'phx_error', { reason: 'channel_crash' });
    this.close('crash');
  }

  closedBecause: TerminateReason | undefined;

  /** Stops the channel: no more writes, timers and subscriptions cleared, terminate queued. */
  close(reason: TerminateReason): void {
    this.#close(reason);
  }

  #close(reason: TerminateReason | null): void {
    if (this.state === 'closed') return;
    const wasJoined = this.state === 'joined';
    this.state = 'closed';
    this.closedBecause = reason ?? undefined;
    if (this.#timers) {
      for (const handle of this.#timers.values()) clearTimeout(handle);
      this.#timers.clear();
    }
    const registry = this.socket.engine.registry;
    if (wasJoined) registry.removeFastlane(this);
    if (this.#infoTopics) {
      for (const topic of this.#infoTopics) registry.removeInfo(topic, this);
      this.#infoTopics.clear();
    }
    this.socket.forget(this);
    if (reason !== null && this.#hasSession) this.#terminateLater(reason);
  }

  /** `terminate` runs after callbacks already queued, so it sees their session. */
  #terminateLater(reason: TerminateReason): void {
    const terminate = this.definition.terminate;
    if (!terminate) return;
    const done = this.#queue.then(() => terminate.call(this.definition, reason, this.session as S, this.ctx));
    this.#queue = done.catch((err: unknown) => {
      this.socket.log.error({ err, topic: this.topic, reason }, 'channel terminate threw');
    });
    this.socket.trackTermination(this.#queue);
  }
}
