import type { PubSub } from '../../server/channels/types.ts';

/** What one node published (topic and event, in order) while recording; `stop()` restores the PubSub. */
export interface Published {
  readonly messages: Array<{ topic: string; event: string }>;
  stop(): void;
}

/** Records every `broadcast` of `pubsub` (what reaches the other nodes) until `stop()`. */
export function recordPublished(pubsub: PubSub): Published {
  const messages: Array<{ topic: string; event: string }> = [];
  const broadcast = pubsub.broadcast;
  pubsub.broadcast = (topic, event, payload) => {
    messages.push({ topic, event });
    return broadcast.call(pubsub, topic, event, payload);
  };
  return {
    messages,
    stop: () => {
      pubsub.broadcast = broadcast;
    },
  };
}
