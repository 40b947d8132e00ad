/**
 * The one runtime every edge link runs on (GRiSP, WiFiDogX, keyauth): a `ChannelProcess` per
 * device connection, hosted here instead of on a Phoenix socket. It gives each link
 *
 * - an ordered step queue: frames, PubSub messages and timers are handled one at a time;
 * - timers by key: scheduling a key again replaces its timer, closing clears them all;
 * - the device-topic subscription, with the device's group topics: revocation and deletion close
 *   the link (the device link's `close` effect, `linkNotice`), approval, a new attempt (`firmware_update` on the device's or a group's topic) and
 *   membership changes (`join`/`leave`) reach the edge's handlers on whichever node it is;
 * - close with a code and a reason, and `drain(1012)` at shutdown, as Phoenix sockets get.
 *
 * Edges translate: frames into fleet calls, these handlers into frames. The runtime knows
 * nothing of any protocol's frames.
 */
import type { Logger } from 'pino';
import { assertNever, ChannelProcess, type ChannelHost } from '../channels/channel.ts';
import { TopicRegistry } from '../channels/registry.ts';
import type { OutFrame, Serializer } from '../channels/serializers.ts';
import { emptyStats } from '../channels/socket-registry.ts';
import type { ChannelDefinition, Effect, Message, PubSub } from '../channels/types.ts';
import { linkNotice, type LinkEffect } from '../fleet/device-link.ts';
import { deviceLinkState, Topics, type FleetContext } from '../fleet/index.ts';

/** How the runtime closes the connection a link runs on. */
export interface EdgeTransport {
  /** Ends the device's connection (a WebSocket close frame, or the end of a TCP stream). */
  close(code: number, reason: string): void;
}

/** The device a link speaks for, once it is known. */
export interface LinkDevice {
  deviceId: string;
  orgId: string;
  /** The certificate that authenticated the link: only its revocation closes the link. */
  certificateId?: string;
}

/** What the edge does with the device link's effects the runtime cannot carry out itself (frames). */
export interface EffectHandlers {
  /** Send the update command for `firmware` (the attempt is recorded `sent` when the edge feeds `update_sent`). */
  pushUpdate?(effect: Extract<LinkEffect, { type: 'push_update' }>): Promise<void>;
  cancelUpdate?(effect: Extract<LinkEffect, { type: 'cancel_update' }>): Promise<void>;
  sendCommand?(effect: Extract<LinkEffect, { type: 'send_command' }>): Promise<void>;
}

/** What the edge does when the runtime delivers something; each runs as one step of the link. */
export interface EdgeLinkHandlers {
  /** A new attempt or target concerns the device (its own or a group's `firmware_update`): resolve and send. */
  retarget?(): Promise<void>;
  /** An operator approved the (pending) device. */
  approved?(): Promise<void>;
  /** A timer scheduled with `schedule(key)` fired. */
  timer?(key: string): Promise<void>;
  /** Any other event on the device's topic (edge commands, credential changes). */
  info?(message: Message): Promise<void>;
  /** The link closed; runs after every step queued before (e.g. marks the device offline). */
  closed?(reason: string): Promise<void>;
}

export interface EdgeLinkOptions {
  /** Edge name for logs and stats (`grisp`, `wifidogx`, `keyauth`). */
  edge: string;
  log: Logger;
  transport: EdgeTransport;
  handlers: EdgeLinkHandlers;
  /** Close code for a revoked or deleted device (the protocol's own; default 4003). */
  revokedCode?: number;
  /** Close code of the device link's `close` effect (default 1000). */
  closeCode?: number;
  /** Whether a failed step is the device's doing (logged at warn) rather than the server's (error). */
  devicesFault?(err: unknown): boolean;
}

/** A step that failed is logged; the link stays up. */
type Step = () => Promise<void>;

const TIMER_TOPIC = 'edge-link:timer';
/** The serializer slot of a host: edge links never join a fastlane, so nothing is ever encoded for them. */
const NO_SERIALIZER = { name: 'edge-link' } as unknown as Serializer;

interface LinkSession {
  device?: LinkDevice;
}

/** Counters over every link of a runtime (tests, metrics). */
export interface EdgeRuntimeStats {
  links: number;
  steps: number;
  failedSteps: number;
  channelCrashes: number;
  unknownEvents: number;
}

/** One runtime per node: the links of every edge, one PubSub subscription per topic among them. */
export class EdgeRuntime {
  readonly stats: EdgeRuntimeStats = { links: 0, steps: 0, failedSteps: 0, channelCrashes: 0, unknownEvents: 0 };
  readonly #links = new Set<EdgeLink>();
  readonly #registry: TopicRegistry;
  readonly #fleet: FleetContext;
  #draining = false;

  constructor(deps: { pubsub: PubSub; fleet: FleetContext; log: Logger }) {
    this.#registry = new TopicRegistry(deps.pubsub, emptyStats(), deps.log);
    this.#fleet = deps.fleet;
  }

  /** Links open on this node. */
  get size(): number {
    return this.#links.size;
  }

  /** Topics this node's links listen on (device and group topics, each once). */
  get topicCount(): number {
    return this.#registry.topicCount;
  }

  /** True once `drain` started: edges refuse new connections. */
  get draining(): boolean {
    return this.#draining;
  }

  /** A link for one device connection; its steps may run before the device is known (`attach`). */
  open(options: EdgeLinkOptions): EdgeLink {
    const link = new EdgeLink(this, this.#fleet, options);
    this.#links.add(link);
    this.stats.links++;
    link.finished.then(() => {
      this.#links.delete(link);
      this.stats.links--;
    });
    return link;
  }

  /** Closes every link with `code` (1012: the device reconnects, to this node or another) and waits for their last steps. */
  async drain(code = 1012, reason = 'server restarting'): Promise<void> {
    this.#draining = true;
    const all = [...this.#links];
    for (const link of all) link.close(code, reason);
    await Promise.allSettled(all.map((l) => l.finished));
  }

  /** @internal the registry the links' channel processes subscribe through. */
  get registry(): TopicRegistry {
    return this.#registry;
  }
}

/** One device connection on the edge runtime. */
export class EdgeLink {
  readonly #process: ChannelProcess<undefined, LinkSession>;
  readonly #options: EdgeLinkOptions;
  readonly #runtime: EdgeRuntime;
  readonly #fleet: FleetContext;
  #closed = false;
  #device: LinkDevice | undefined;
  #terminated!: () => void;
  /** Settles when the link closed and its `closed` handler ran. */
  readonly finished: Promise<void>;

  constructor(runtime: EdgeRuntime, fleet: FleetContext, options: EdgeLinkOptions) {
    this.#runtime = runtime;
    this.#fleet = fleet;
    this.#options = options;
    this.finished = new Promise((resolve) => (this.#terminated = resolve));
    this.#process = new ChannelProcess(this.#host(), `edge:${options.edge}`, null, this.#definition());
    this.#process.join({}, null);
  }

  /** The link ended (closed by either side); no step runs any more. */
  get closed(): boolean {
    return this.#closed;
  }

  get device(): LinkDevice | undefined {
    return this.#device;
  }

  /** Runs `step` after every step queued before it; a failure is logged and the link stays. */
  step(step: Step): Promise<void> {
    return new Promise((resolve) => {
      this.#process.enqueue(async () => {
        await this.#run(step);
        resolve();
      });
    });
  }

  /**
   * The device is known (certificate, first message, key): subscribe to its topic and its group
   * topics. Call it from a step, so the subscription is in place before the next one runs.
   */
  async attach(device: LinkDevice): Promise<void> {
    if (this.#closed) return;
    this.#device = device;
    this.#process.session = { device };
    // The device's topic before the read: a revocation committed after it is delivered there.
    this.#effects([{ type: 'subscribe', topic: Topics.device(device.deviceId) }]);
    const { groups, usable } = await deviceLinkState(this.#fleet.db, device.deviceId, device.certificateId);
    if (!usable) {
      await this.apply([{ type: 'close', reason: 'device_revoked', cause: 'revoked' }]);
      return;
    }
    this.#effects(groups.map((topic) => ({ type: 'subscribe' as const, topic })));
  }

  /** Runs the `timer` handler with `key` after `afterMs`; scheduling a key again replaces its timer. */
  schedule(key: string, afterMs: number): void {
    this.#effects([{ type: 'timer', key, afterMs, message: { topic: TIMER_TOPIC, event: 'timer', payload: { key } } }]);
  }

  cancel(key: string): void {
    this.#effects([{ type: 'cancel_timer', key }]);
  }

  /** Effects apply once the process runs (its start is the first step of the queue). */
  #effects(effects: Effect[]): void {
    if (this.#process.state === 'joining') this.#process.enqueue(async () => this.#process.applyEffects(effects));
    else this.#process.applyEffects(effects);
  }

  /**
   * Carries out the device link's effects (fleet/device-link.ts) in order: timers and close here,
   * pushes, cancels and commands through the edge's `on` handlers (the frames are the edge's).
   */
  async apply(effects: readonly LinkEffect[] | undefined, on: EffectHandlers = {}): Promise<void> {
    for (const effect of effects ?? []) {
      if (this.#closed) return;
      switch (effect.type) {
        case 'schedule_timer':
          this.schedule(effect.key, effect.ms);
          break;
        case 'cancel_timer':
          this.cancel(effect.key);
          break;
        case 'close':
          this.close(
            effect.cause === 'revoked' ? (this.#options.revokedCode ?? 4003) : (this.#options.closeCode ?? 1000),
            effect.reason,
          );
          break;
        case 'push_update':
          await on.pushUpdate?.(effect);
          break;
        case 'cancel_update':
          await on.cancelUpdate?.(effect);
          break;
        case 'send_command':
          await on.sendCommand?.(effect);
          break;
        default:
          assertNever(effect);
      }
    }
  }

  /** The close effect: ends the connection with `code` and `reason`, clears timers and subscriptions. */
  close(code: number, reason: string): void {
    const first = !this.#closed;
    this.#closed = true;
    if (first) this.#options.transport.close(code, reason);
    this.#process.close('stop');
  }

  /** The transport reports the connection gone (the device closed it, or after `close`). */
  transportClosed(): void {
    this.#closed = true;
    this.#process.close('disconnect');
  }

  async #run(step: Step): Promise<void> {
    if (this.#closed) return;
    this.#runtime.stats.steps++;
    try {
      await step();
    } catch (err) {
      this.#runtime.stats.failedSteps++;
      if (this.#closed) return;
      const devices = this.#options.devicesFault?.(err) ?? false;
      this.#options.log[devices ? 'warn' : 'error']({ err, edge: this.#options.edge }, 'edge link step failed');
    }
  }

  async #onInfo(message: Message): Promise<void> {
    const h = this.#options.handlers;
    if (message.topic === TIMER_TOPIC) {
      const key = String(message.payload.key);
      return this.#run(async () => h.timer?.(key));
    }
    // Revocation and deletion: the device link's close effect (only the certificate this link
    // authenticated with ends it; the device's others do not).
    const closing = linkNotice(message, { certificateId: this.#device?.certificateId });
    if (closing.length) return this.apply(closing);
    if (message.event === 'certificate_revoked') return;
    if ((message.event === 'join' || message.event === 'leave') && typeof message.payload.channel === 'string') {
      const type = message.event === 'join' ? ('subscribe' as const) : ('unsubscribe' as const);
      this.#process.applyEffects([{ type, topic: message.payload.channel }]);
      return;
    }
    if (message.event === 'firmware_update') return this.#run(async () => h.retarget?.());
    if (message.event === 'device_approved') return this.#run(async () => h.approved?.());
    if (message.event === 'group_deleted') return;
    if (h.info) return this.#run(async () => h.info!(message));
    this.#runtime.stats.unknownEvents++;
  }

  #definition(): ChannelDefinition<undefined, LinkSession> {
    return {
      join: async () => ({ status: 'ok', session: {} }),
      handleInfo: async (message) => {
        await this.#onInfo(message);
        return {};
      },
      terminate: async (reason) => {
        // A crash of the process itself (not of a step) ends the connection too.
        if (!this.#closed) {
          this.#closed = true;
          this.#options.transport.close(1011, 'internal error');
        }
        try {
          await this.#options.handlers.closed?.(reason);
        } catch (err) {
          this.#options.log.error({ err, edge: this.#options.edge }, 'edge link close handler failed');
        } finally {
          this.#terminated();
        }
      },
    };
  }

  #host(): ChannelHost<undefined> {
    const runtime = this.#runtime;
    const registry = runtime.registry;
    const link = this;
    return {
      id: `edge:${this.#options.edge}`,
      assigns: undefined,
      get log() {
        return link.#options.log;
      },
      serializer: NO_SERIALIZER,
      engine: {
        stats: runtime.stats,
        registry: {
          // The link's own topic is a name, not a subscription: only effect subscriptions reach it.
          addFastlane: () => undefined,
          removeFastlane: () => undefined,
          addInfo: (topic, channel) => registry.addInfo(topic, channel),
          removeInfo: (topic, channel) => registry.removeInfo(topic, channel),
        },
      },
      write: (_frame: OutFrame) => undefined,
      reply: () => undefined,
      push: () => undefined,
      lifecycle: () => undefined,
      forget: () => undefined,
      trackTermination: () => undefined,
      close: (code, reason) => link.close(code, reason),
    };
  }
}
