/**
 * Cross-node publish/subscribe. Every broadcast goes through the adapter so nothing assumes a
 * single process; local subscribers are served directly (adapters deliver only what OTHER nodes
 * published, see `PubSubAdapter.start`).
 */
import type { Logger } from 'pino';
import type { Message, Payload, PubSub, PubSubAdapter } from './types.ts';

export interface PubSubStats {
  /** Messages published by this node (broadcast + localBroadcast). */
  published: number;
  /** Messages received from other nodes through the adapter. */
  received: number;
  /** Listener invocations. */
  delivered: number;
  /** Listeners that threw. */
  listenerErrors: number;
}

export interface CreatePubSubOptions {
  adapter?: PubSubAdapter;
  log: Logger;
}

/** In-process adapter: there are no other nodes, so publishing reaches nobody else. */
export class LocalAdapter implements PubSubAdapter {
  async publish(_message: Message): Promise<void> {}
  async start(_deliver: (message: Message) => void): Promise<void> {}
  async stop(): Promise<void> {}
}

export type PubSubWithStats = PubSub & { readonly stats: PubSubStats; readonly ready: Promise<void> };

/** A PubSub over `adapter` (default: `LocalAdapter`). `ready` settles once the adapter listens. */
export function createPubSub(options: CreatePubSubOptions): PubSubWithStats {
  const adapter = options.adapter ?? new LocalAdapter();
  const log = options.log;
  const listeners = new Map<string, Set<(message: Message) => void>>();
  /** Few (one per node-wide reader): a list checked per message beats a trie. */
  let prefixed: Array<{ prefix: string; listener: (message: Message) => void }> = [];
  const stats: PubSubStats = { published: 0, received: 0, delivered: 0, listenerErrors: 0 };
  let closed = false;

  function call(listener: (message: Message) => void, message: Message): void {
    stats.delivered++;
    try {
      listener(message);
    } catch (err) {
      stats.listenerErrors++;
      log.error({ err, topic: message.topic, event: message.event }, 'pubsub listener threw');
    }
  }

  function deliver(message: Message): void {
    const set = listeners.get(message.topic);
    if (set) for (const listener of set) call(listener, message);
    for (const p of prefixed) if (message.topic.startsWith(p.prefix)) call(p.listener, message);
  }

  const ready = adapter.start((message) => {
    stats.received++;
    deliver(message);
  });
  ready.catch((err) => log.error({ err }, 'pubsub adapter failed to start'));

  return {
    stats,
    ready,
    async broadcast(topic: string, event: string, payload: Payload): Promise<void> {
      if (closed) throw new Error('PUBSUB_CLOSED: broadcast after close; create a new PubSub');
      const message: Message = { topic, event, payload };
      stats.published++;
      deliver(message);
      await adapter.publish(message);
    },
    localBroadcast(topic: string, event: string, payload: Payload): void {
      stats.published++;
      deliver({ topic, event, payload });
    },
    subscribe(topic: string, listener: (message: Message) => void): () => void {
      let set = listeners.get(topic);
      if (!set) {
        set = new Set();
        listeners.set(topic, set);
      }
      set.add(listener);
      return () => {
        const current = listeners.get(topic);
        if (!current) return;
        current.delete(listener);
        if (current.size === 0) listeners.delete(topic);
      };
    },
    subscribePrefix(prefix: string, listener: (message: Message) => void): () => void {
      const entry = { prefix, listener };
      prefixed = [...prefixed, entry];
      return () => {
        prefixed = prefixed.filter((p) => p !== entry);
      };
    },
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      listeners.clear();
      prefixed = [];
      await ready.catch(() => undefined);
      await adapter.stop();
    },
  };
}
