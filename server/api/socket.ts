/**
 * The operators' live socket: Phoenix protocol at `/socket` on the API listener. Operators
 * authenticate with the same bearer as the REST API (subprotocol `base64url.bearer.phx.<token>`
 * or `?token=`), then join `operator:<orgId>` to receive the domain's events for that org
 * (device online/offline, update transitions, target and group changes). The channel decides
 * nothing: joining subscribes to the topic and the engine's fastlane relays every broadcast.
 */
import type { FastifyInstance } from 'fastify';
import { createEndpoint, type Endpoint } from '../channels/endpoint.ts';
import type { ChannelDefinition, PubSub, SocketDefinition } from '../channels/types.ts';
import type { Db } from '../db/index.ts';
import type { Logger } from '../log.ts';
import type { OperatorAuthenticator } from '../http/auth.ts';
import { canAccessOrg, OperatorAuth, type OperatorPrincipal } from './auth.ts';
import { isUuid, unexpiredSessionIds } from './operators.ts';

export interface OperatorSocketAssigns {
  principal: OperatorPrincipal;
}

export interface OperatorSocketDeps {
  db: Db;
  secret: string;
  pubsub: PubSub;
  log: Logger;
  /** Reuses the API's authenticator when registered after `registerApi`. */
  auth?: OperatorAuthenticator;
  path?: string;
  idleTimeoutMs?: number;
  checkOrigin?: '*' | readonly string[];
}

export const OPERATOR_TOPIC_PREFIX = 'operator:';

/** `operator:<orgId>`: joinable by principals who may see that org. */
export const operatorChannel: ChannelDefinition<OperatorSocketAssigns, Record<string, never>> = {
  async join(topic, _params, ctx) {
    const orgId = topic.slice(OPERATOR_TOPIC_PREFIX.length);
    // Same answer for a malformed id, an unknown org and another org: nothing to probe.
    if (!isUuid(orgId) || !canAccessOrg(ctx.assigns.principal, orgId))
      return { status: 'error', response: { reason: 'unauthorized' } };
    return { status: 'ok', response: { org_id: orgId }, session: {} };
  },
  async handleIn() {
    // Operators only listen here; actions go through the REST API.
    return { reply: { status: 'error', response: { reason: 'read-only channel: use the REST API for actions' } } };
  },
};

/**
 * The socket id of an operator's live sockets, one per credential: an API token's sockets, or
 * the sockets opened with one login session's JWT. Revoking a token or a session disconnects
 * exactly its sockets.
 */
export function operatorSocketId(principal: Pick<OperatorPrincipal, 'userId' | 'tokenId' | 'sessionId'>): string {
  return `operator_socket:${principal.tokenId ?? principal.sessionId ?? principal.userId}`;
}

/**
 * Every socket id a user's credentials may hold: each unexpired login session and each API
 * token (read before deleting the user, whose tokens and sessions go with it).
 */
export async function operatorSocketIdsOfUser(db: Db, userId: string): Promise<string[]> {
  const tokens = await db.selectFrom('api_tokens').select('id').where('user_id', '=', userId).execute();
  const sessions = await unexpiredSessionIds(db, userId);
  return [
    ...sessions.map((sessionId) => operatorSocketId({ userId, sessionId })),
    ...tokens.map((t) => operatorSocketId({ userId, tokenId: t.id })),
  ];
}

/** The socket definition: bearer → principal, one channel pattern. */
export function operatorSocket(auth: OperatorAuthenticator): SocketDefinition<OperatorSocketAssigns> {
  return {
    async connect(info) {
      const token = info.token ?? info.params.token;
      if (!token)
        return {
          ok: false,
          status: 401,
          reason: 'a bearer token is required (subprotocol base64url.bearer.phx.<token> or ?token=)',
        };
      const result = await auth.verify(token);
      if (!result.ok) return { ok: false, status: 403, reason: result.message };
      const principal = result.principal;
      // The socket ends with its bearer (a login JWT after 12 h, an API token at its expires_at).
      return {
        ok: true,
        assigns: { principal },
        id: operatorSocketId(principal),
        ...(principal.expiresAt ? { expiresAt: principal.expiresAt.getTime() } : {}),
      };
    },
    channels: [{ pattern: `${OPERATOR_TOPIC_PREFIX}*`, channel: operatorChannel }],
  };
}

/** Mounts the operator socket at `/socket` (by default) on the API listener; returns the endpoint for drain/close. */
export async function registerOperatorSocket(app: FastifyInstance, deps: OperatorSocketDeps): Promise<Endpoint> {
  const auth =
    deps.auth ??
    (app.hasDecorator('fleethubAuth') ? app.fleethubAuth : new OperatorAuth({ db: deps.db, secret: deps.secret }));
  const endpoint = createEndpoint(operatorSocket(auth), {
    pubsub: deps.pubsub,
    log: deps.log.child({ socket: 'operator' }),
    idleTimeoutMs: deps.idleTimeoutMs,
    checkOrigin: deps.checkOrigin,
  });
  await endpoint.register(app, { path: deps.path ?? '/socket' });
  return endpoint;
}
