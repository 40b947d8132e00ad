/**
 * Presence across nodes. Each node owns what it tracked and replicates the others' entries from
 * diffs on an internal PubSub topic (diffs carry their node). Clients on a topic get
 * `presence_state` `{key: {metas: [{..., phx_ref}]}}` on join and `presence_diff`
 * `{joins, leaves}` afterwards, like Phoenix.Presence.
 */
import { randomBytes } from 'node:crypto';
import type { Effect, Message, Payload, PubSub } from './types.ts';

export interface PresenceMeta extends Payload {
  phx_ref: string;
}

export type PresenceState = Record<string, { metas: PresenceMeta[] }>;

export interface PresenceOptions {
  /** Unique name of this node (e.g. hostname:pid). */
  nodeName: string;
  /** How often this node announces itself; a node silent for 3 periods is dropped. Default 5 s. */
  heartbeatMs?: number;
}

export interface Presence {
  /** Tracks `key` on `topic` with `meta`; returns the `phx_ref` of this entry. */
  track(topic: string, key: string, meta: Payload): Promise<string>;
  /** Removes this node's entries of `key` on `topic` (only `phxRef` when given). */
  untrack(topic: string, key: string, phxRef?: string): Promise<void>;
  /** Every node's entries on `topic`. */
  list(topic: string): PresenceState;
  /** The effect that pushes `presence_state` to a channel (return it from `join`). */
  stateEffect(topic: string): Effect;
  close(): Promise<void>;
}

const PRESENCE_TOPIC = 'phx:presence';

/** node → topic → key → metas */
type Replica = Map<string, Map<string, Map<string, PresenceMeta[]>>>;

function toState(keys: Map<string, PresenceMeta[]> | undefined): PresenceState {
  const state: PresenceState = {};
  if (keys) for (const [key, metas] of keys) state[key] = { metas: [...metas] };
  return state;
}

function isEmpty(state: PresenceState): boolean {
  for (const _ in state) return false;
  return true;
}

export function createPresence(pubsub: PubSub, options: PresenceOptions): Presence {
  const node = options.nodeName;
  const heartbeatMs = options.heartbeatMs ?? 5000;
  const replica: Replica = new Map([[node, new Map()]]);
  const lastHeard = new Map<string, number>();

  function topicsOf(name: string): Map<string, Map<string, PresenceMeta[]>> {
    let topics = replica.get(name);
    if (!topics) {
      topics = new Map();
      replica.set(name, topics);
    }
    return topics;
  }

  function applyDiff(name: string, topic: string, joins: PresenceState, leaves: PresenceState): void {
    const topics = topicsOf(name);
    let keys = topics.get(topic);
    if (!keys) {
      keys = new Map();
      topics.set(topic, keys);
    }
    for (const [key, { metas }] of Object.entries(leaves)) {
      const refs = new Set(metas.map((m) => m.phx_ref));
      const remaining = (keys.get(key) ?? []).filter((m) => !refs.has(m.phx_ref));
      if (remaining.length > 0) keys.set(key, remaining);
      else keys.delete(key);
    }
    for (const [key, { metas }] of Object.entries(joins)) keys.set(key, [...(keys.get(key) ?? []), ...metas]);
    if (keys.size === 0) topics.delete(topic);
  }

  /** Replaces another node's whole state; local subscribers get the difference as diffs. */
  function replaceNode(name: string, next: Record<string, PresenceState>): void {
    const old = replica.get(name) ?? new Map<string, Map<string, PresenceMeta[]>>();
    const topics = new Set([...old.keys(), ...Object.keys(next)]);
    replica.set(name, new Map());
    for (const topic of topics) {
      const before = toState(old.get(topic));
      const after = next[topic] ?? {};
      const beforeRefs = new Set(Object.values(before).flatMap((e) => e.metas.map((m) => m.phx_ref)));
      const afterRefs = new Set(Object.values(after).flatMap((e) => e.metas.map((m) => m.phx_ref)));
      const joins: PresenceState = {};
      const leaves: PresenceState = {};
      for (const [key, { metas }] of Object.entries(after)) {
        const added = metas.filter((m) => !beforeRefs.has(m.phx_ref));
        if (added.length) joins[key] = { metas: added };
      }
      for (const [key, { metas }] of Object.entries(before)) {
        const removed = metas.filter((m) => !afterRefs.has(m.phx_ref));
        if (removed.length) leaves[key] = { metas: removed };
      }
      applyDiff(name, topic, after, {});
      if (!isEmpty(joins) || !isEmpty(leaves)) pubsub.localBroadcast(topic, 'presence_diff', { joins, leaves });
    }
  }

  function ownState(): Record<string, PresenceState> {
    const state: Record<string, PresenceState> = {};
    for (const [topic, keys] of replica.get(node)!) state[topic] = toState(keys);
    return state;
  }

  const unsubscribe = pubsub.subscribe(PRESENCE_TOPIC, (message: Message) => {
    const p = message.payload;
    const from = typeof p.node === 'string' ? p.node : undefined;
    if (!from || from === node) return;
    lastHeard.set(from, Date.now());
    switch (message.event) {
      case 'diff':
        applyDiff(from, String(p.topic), p.joins as PresenceState, p.leaves as PresenceState);
        break;
      case 'sync_request':
        void pubsub.broadcast(PRESENCE_TOPIC, 'sync', { node, to: from, state: ownState() }).catch(() => undefined);
        break;
      case 'sync':
        if (p.to === node) replaceNode(from, p.state as Record<string, PresenceState>);
        break;
      case 'node_down':
        lastHeard.delete(from);
        replaceNode(from, {});
        replica.delete(from);
        break;
      case 'heartbeat':
        // A node we have never seen (or forgot): ask for its state.
        if (!replica.has(from)) void pubsub.broadcast(PRESENCE_TOPIC, 'sync_request', { node }).catch(() => undefined);
        break;
    }
  });

  void pubsub.broadcast(PRESENCE_TOPIC, 'sync_request', { node }).catch(() => undefined);

  const heartbeat = setInterval(() => {
    void pubsub.broadcast(PRESENCE_TOPIC, 'heartbeat', { node }).catch(() => undefined);
    const deadline = Date.now() - 3 * heartbeatMs;
    for (const [name, heard] of lastHeard) {
      if (heard >= deadline) continue;
      lastHeard.delete(name);
      replaceNode(name, {});
      replica.delete(name);
    }
  }, heartbeatMs);
  heartbeat.unref();

  async function publishDiff(topic: string, joins: PresenceState, leaves: PresenceState): Promise<void> {
    await pubsub.broadcast(PRESENCE_TOPIC, 'diff', { node, topic, joins, leaves });
    await pubsub.broadcast(topic, 'presence_diff', { joins, leaves });
  }

  return {
    async track(topic, key, meta) {
      const phx_ref = randomBytes(9).toString('base64url');
      const joins: PresenceState = { [key]: { metas: [{ ...meta, phx_ref }] } };
      applyDiff(node, topic, joins, {});
      await publishDiff(topic, joins, {});
      return phx_ref;
    },

    async untrack(topic, key, phxRef) {
      const metas = replica.get(node)!.get(topic)?.get(key) ?? [];
      const removed = phxRef === undefined ? metas : metas.filter((m) => m.phx_ref === phxRef);
      if (removed.length === 0) return;
      const leaves: PresenceState = { [key]: { metas: removed } };
      applyDiff(node, topic, {}, leaves);
      await publishDiff(topic, {}, leaves);
    },

    list(topic) {
      const state: PresenceState = {};
      for (const topics of replica.values()) {
        for (const [key, metas] of topics.get(topic) ?? []) {
          state[key] = { metas: [...(state[key]?.metas ?? []), ...metas] };
        }
      }
      return state;
    },

    stateEffect(topic) {
      return { type: 'push', event: 'presence_state', payload: this.list(topic) };
    },

    async close() {
      clearInterval(heartbeat);
      unsubscribe();
      await pubsub.broadcast(PRESENCE_TOPIC, 'node_down', { node }).catch(() => undefined);
    },
  };
}
