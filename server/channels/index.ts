/** The generic Phoenix Channels engine: no fleet knowledge here (docs/architecture.md, "Layers"). */
export type * from './types.ts';
export {
  createPubSub,
  LocalAdapter,
  type CreatePubSubOptions,
  type PubSubStats,
  type PubSubWithStats,
} from './pubsub.ts';
export {
  NOTIFY_PAYLOAD_LIMIT,
  PgAdapter,
  pubsubAdapterFor,
  type PgAdapterOptions,
  type PgAdapterStats,
  type PubSubDatabase,
} from './pg-adapter.ts';
export { createEndpoint, type Endpoint, type EndpointOptions } from './endpoint.ts';
export { phoenixProtocolHandler, tokenFromProtocolHeader, AUTH_TOKEN_PREFIX } from './websocket.ts';
export {
  createPresence,
  type Presence,
  type PresenceMeta,
  type PresenceOptions,
  type PresenceState,
} from './presence.ts';
export {
  binaryPayload,
  isBinaryPayload,
  serializerFor,
  v1Json,
  v2Json,
  type BinaryPayload,
  type InboundMessage,
  type OutFrame,
  type Serializer,
} from './serializers.ts';
export { assertNever, ChannelResultError } from './channel.ts';
export type { LongPollTimings } from './longpoll.ts';
