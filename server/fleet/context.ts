import type { Db } from '../db/index.ts';
import type { Firmware } from '../db/schema.ts';
import type { Logger } from '../log.ts';

/** Where the domain publishes events; the wiring connects it to the engine's (cross-node) PubSub. */
export interface FleetBus {
  publish(topic: string, event: string, payload: Record<string, unknown>): Promise<void>;
}

/** Everything a fleet function needs. */
export interface FleetContext {
  db: Db;
  bus: FleetBus;
  log: Logger;
  /** This process's node name (devices.connected_node, nodes table). */
  nodeName: string;
  /** Signed download URL for a firmware image (injected by the wiring; H5 implements signing). */
  firmwareUrl(firmware: Firmware): string;
  /**
   * Sees every domain event once its transaction committed (before it is published), and how
   * long each update report took to commit: the wiring turns them into log lines and metrics.
   */
  observer?: FleetObserver;
}

/** What the wiring observes of the domain; it must not throw (a throw is logged and ignored). */
export interface FleetObserver {
  committed?(event: FleetEvent): void;
  /** An update report (`firmware_update_*` event) was committed, `seconds` after it arrived. */
  reportIngested?(event: string, seconds: number): void;
}

/** An event to publish once the transaction that caused it has committed. */
export interface FleetEvent {
  topic: string;
  event: string;
  payload: Record<string, unknown>;
}

/** PubSub topics the domain publishes on. */
export const Topics = {
  /**
   * One device, wherever it is connected: join/leave/firmware_update/commands, and what ends its
   * connections (`device_revoked`, `device_deleted`, `certificate_revoked`, `connection_replaced`):
   * each node's device listener reads every device topic (`DEVICE_TOPIC_PREFIX`) for those.
   */
  device: (deviceId: string) => `${DEVICE_TOPIC_PREFIX}${deviceId}`,
  /** Operators' live view of one organization. */
  operator: (orgId: string) => `operator:${orgId}`,
} as const;

/** What every device topic starts with (`Topics.device`). */
export const DEVICE_TOPIC_PREFIX = 'device_id:';

/** A bus backed by the engine's PubSub (`broadcast` reaches every node). */
export function pubsubBus(pubsub: {
  broadcast(topic: string, event: string, payload: Record<string, unknown>): Promise<void>;
}): FleetBus {
  return { publish: (topic, event, payload) => pubsub.broadcast(topic, event, payload) };
}

/**
 * A bus that hands every event to `observer` once it is published (webhook deliveries queue
 * here, so they see each fleet event — domain and edges alike — after its change committed).
 * Awaited like the publish; an observer failure is logged, the change stands.
 */
export function observedBus(bus: FleetBus, observer: (event: FleetEvent) => Promise<void>, log: Logger): FleetBus {
  return {
    async publish(topic, event, payload) {
      try {
        await bus.publish(topic, event, payload);
      } finally {
        await observer({ topic, event, payload }).catch((err: unknown) =>
          log.error({ err, topic, event }, 'fleet event observer failed'),
        );
      }
    },
  };
}

/**
 * Runs `fn` in one transaction and publishes the events it queued only after the commit, so a
 * receiver that reads the database sees the change. Publishing is best-effort after the commit:
 * a failure is logged, the change stands.
 */
export async function inTransaction<T>(
  ctx: FleetContext,
  fn: (trx: Db, outbox: FleetEvent[]) => Promise<T>,
): Promise<T> {
  const outbox: FleetEvent[] = [];
  const result = await ctx.db.transaction().execute((trx) => fn(trx, outbox));
  await publishAll(ctx, outbox);
  return result;
}

/** Publishes events in order, in batches (a 20k-device group change queues 20k `join`s). */
export async function publishAll(ctx: FleetContext, events: FleetEvent[]): Promise<void> {
  if (ctx.observer?.committed) {
    for (const e of events) {
      try {
        ctx.observer.committed(e);
      } catch (err) {
        ctx.log.error({ err, event: e.event }, 'fleet observer threw');
      }
    }
  }
  const BATCH = 200;
  for (let i = 0; i < events.length; i += BATCH) {
    const batch = events.slice(i, i + BATCH);
    const results = await Promise.allSettled(batch.map((e) => ctx.bus.publish(e.topic, e.event, e.payload)));
    for (const [j, r] of results.entries()) {
      if (r.status === 'rejected')
        ctx.log.error({ err: r.reason, topic: batch[j]!.topic, event: batch[j]!.event }, 'fleet event publish failed');
    }
  }
}
