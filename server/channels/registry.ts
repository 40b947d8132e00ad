/**
 * Which channels of this node listen on which topic, with ONE PubSub subscription per topic.
 * Fastlane: a broadcast on a channel's own topic is encoded once per serializer, lazily, and
 * the same frame object is written to every subscribed socket (no per-socket JSON.stringify).
 */
import type { Logger } from 'pino';
import type { OutFrame, Serializer } from './serializers.ts';
import type { EndpointStats, Message, PubSub } from './types.ts';

/** What the registry needs of a channel (ChannelProcess implements it). */
export interface Subscriber {
  readonly topic: string;
  readonly state: 'joining' | 'joined' | 'closed';
  readonly socket: { readonly serializer: Serializer; write(frame: OutFrame): void };
  intercepts(event: string): boolean;
  handleOut(message: Message): void;
  handleInfo(message: Message): void;
}

interface TopicEntry {
  /** Channels joined on this topic: broadcasts go to their sockets directly. */
  fastlane: Set<Subscriber>;
  /** Channels that subscribed to this topic by effect: broadcasts go to handleInfo. */
  info: Set<Subscriber>;
  unsubscribe: () => void;
}

export class TopicRegistry {
  readonly #topics = new Map<string, TopicEntry>();

  constructor(
    readonly pubsub: PubSub,
    readonly stats: EndpointStats,
    readonly log: Logger,
  ) {}

  /** Number of topics this node listens on. */
  get topicCount(): number {
    return this.#topics.size;
  }

  addFastlane(channel: Subscriber): void {
    this.#entry(channel.topic).fastlane.add(channel);
  }

  removeFastlane(channel: Subscriber): void {
    const entry = this.#topics.get(channel.topic);
    if (!entry) return;
    entry.fastlane.delete(channel);
    this.#release(channel.topic, entry);
  }

  addInfo(topic: string, channel: Subscriber): void {
    this.#entry(topic).info.add(channel);
  }

  removeInfo(topic: string, channel: Subscriber): void {
    const entry = this.#topics.get(topic);
    if (!entry) return;
    entry.info.delete(channel);
    this.#release(topic, entry);
  }

  #entry(topic: string): TopicEntry {
    let entry = this.#topics.get(topic);
    if (!entry) {
      const created: TopicEntry = { fastlane: new Set(), info: new Set(), unsubscribe: () => undefined };
      created.unsubscribe = this.pubsub.subscribe(topic, (message) => this.#deliver(created, message));
      this.#topics.set(topic, created);
      entry = created;
    }
    return entry;
  }

  #release(topic: string, entry: TopicEntry): void {
    if (entry.fastlane.size > 0 || entry.info.size > 0) return;
    entry.unsubscribe();
    this.#topics.delete(topic);
  }

  #deliver(entry: TopicEntry, message: Message): void {
    // At most three serializers exist; a tiny list beats a Map per broadcast.
    const serializers: Serializer[] = [];
    const frames: (OutFrame | null)[] = [];
    for (const channel of entry.fastlane) {
      if (channel.state !== 'joined') continue;
      if (channel.intercepts(message.event)) {
        channel.handleOut(message);
        continue;
      }
      const serializer = channel.socket.serializer;
      let index = serializers.indexOf(serializer);
      if (index === -1) {
        index = serializers.push(serializer) - 1;
        frames.push(this.#encode(serializer, message));
      }
      const frame = frames[index];
      if (!frame) continue;
      this.stats.broadcastsDelivered++;
      channel.socket.write(frame);
    }
    for (const channel of entry.info) channel.handleInfo(message);
  }

  #encode(serializer: Serializer, message: Message): OutFrame | null {
    try {
      this.stats.broadcastEncodes++;
      return serializer.message(null, null, message.topic, message.event, message.payload);
    } catch (err) {
      this.log.error({ err, topic: message.topic, event: message.event }, 'cannot encode broadcast; dropped');
      return null;
    }
  }
}
