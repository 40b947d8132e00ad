/** Login, the caller's identity, users (admin) and API tokens. */
import type { FastifyInstance } from 'fastify';
import type { Role } from '../../db/schema.ts';
import { assertOrgAccess, orgFilter, requireRole, type OperatorPrincipal } from '../auth.ts';
import { ApiError } from '../../http/errors.ts';
import {
  createApiToken,
  createUser,
  deleteUser,
  dummyPasswordHash,
  findApiTokenById,
  findUserByEmail,
  findUserById,
  listApiTokens,
  listUsers,
  revokeApiToken,
  roleRank,
  toUserSummary,
  revokeSession,
  unexpiredSessionIds,
  updateUser,
  verifyPassword,
} from '../operators.ts';
import { audit, SYSTEM } from '../../audit.ts';
import { rateLimitedWarning } from '../../log.ts';
import { LoginThrottle } from '../login-throttle.ts';
import {
  authErrors,
  conflictError,
  emptyOk,
  page,
  pageOf,
  paginationQuery,
  ref,
  roleSchema,
} from '../../http/schemas.ts';
import type { RouteDeps } from '../index.ts';
import { operatorSocketId, operatorSocketIdsOfUser } from '../socket.ts';

const principalSchema = {
  type: 'object',
  properties: {
    user: ref('User'),
    role: roleSchema,
    org_id: { type: ['string', 'null'] },
    token_id: { type: ['string', 'null'] },
  },
} as const;

export async function registerSessionRoutes(api: FastifyInstance, deps: RouteDeps): Promise<void> {
  const { db, auth } = deps;
  const throttle = new LoginThrottle(deps.loginThrottle);
  // An attack is thousands of 429s: one warning a minute says how many.
  const warnThrottled = rateLimitedWarning(deps.log, 'logins refused by throttling', 60_000);

  api.post<{ Body: { email: string; password: string } }>(
    '/auth/login',
    {
      schema: {
        operationId: 'login',
        tags: ['auth'],
        summary:
          'Exchange email and password for a JWT (12 h) naming a new server-side session; failed logins are throttled (429)',
        description: 'Wrong email or password answer 401 with the same message, whichever was wrong.',
        security: [],
        body: {
          type: 'object',
          required: ['email', 'password'],
          additionalProperties: false,
          properties: {
            email: { type: 'string', minLength: 3, maxLength: 320 },
            password: { type: 'string', minLength: 1, maxLength: 1024 },
          },
        },
        response: {
          200: {
            type: 'object',
            required: ['token', 'expires_at'],
            properties: {
              token: { type: 'string' },
              expires_at: { type: 'string', format: 'date-time' },
              user: ref('User'),
            },
          },
          400: ref('ApiErrorBody'),
          401: ref('ApiErrorBody'),
          429: ref('ApiErrorBody'),
        },
      },
    },
    async (request, reply) => {
      const email = request.body.email;
      const address = request.ip;
      const client = { remote_address: address };
      const throttled = await throttle.check(email, address);
      if (throttled) {
        if (throttled.first) {
          await audit(db, SYSTEM, {
            orgId: null,
            action: 'auth.login_throttled',
            details: { email, ...client, scope: throttled.scope, retry_after_s: throttled.retryAfterSeconds },
          });
        }
        warnThrottled(`${throttled.scope}:${throttled.scope === 'account' ? email : address}`, {
          scope: throttled.scope,
          email,
          remote: address,
        });
        reply.header('retry-after', String(throttled.retryAfterSeconds));
        throw new ApiError(
          429,
          'too_many_requests',
          `too many failed logins ${throttled.scope === 'account' ? 'for this account' : 'from this address'}: try again in ${throttled.retryAfterSeconds} s`,
          { retry_after_s: throttled.retryAfterSeconds },
        );
      }
      const user = await findUserByEmail(db, email);
      // Hash even for unknown emails so response time does not reveal which emails exist.
      const ok = await verifyPassword(request.body.password, user?.password_hash ?? (await dummyPasswordHash()));
      if (!user || !ok || user.disabled_at !== null) {
        await throttle.failed(email, address);
        const reason = !user ? 'unknown email' : !ok ? 'wrong password' : 'user disabled';
        await audit(db, SYSTEM, {
          orgId: user?.org_id ?? null,
          action: 'auth.login_refused',
          ...(user ? { resourceType: 'user', resourceId: user.id } : {}),
          details: { email, ...client, reason },
        });
        request.log.info({ email, reason }, 'login refused');
        throw new ApiError(401, 'unauthorized', 'wrong email or password (or the account is disabled)');
      }
      await throttle.succeeded(email);
      const userAgent = request.headers['user-agent'];
      const { token, expiresAt, sessionId } = await auth.issueJwt(user.id, {
        remoteAddress: address,
        ...(userAgent ? { userAgent } : {}),
      });
      await audit(
        db,
        { type: 'operator', id: user.id },
        {
          orgId: user.org_id,
          action: 'auth.login',
          resourceType: 'operator_session',
          resourceId: sessionId,
          details: { email: user.email, ...client },
        },
      );
      return { token, expires_at: expiresAt.toISOString(), user: toUserSummary(user) };
    },
  );

  api.delete(
    '/auth/session',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'logout',
        tags: ['auth'],
        summary: "Log out: revoke the caller's login session (its JWT stops working at once, its live sockets close)",
        response: { 200: emptyOk, ...authErrors },
      },
    },
    async (request) => {
      const p = request.operator;
      if (!p.sessionId)
        throw new ApiError(
          400,
          'invalid',
          'an API token is not a login session: revoke it with DELETE /api/v1/tokens/<id> (fleethub tokens revoke)',
        );
      await revokeSession(db, p.sessionId, 'signed out');
      await audit(db, p.actor, {
        orgId: p.orgId,
        action: 'auth.logout',
        resourceType: 'operator_session',
        resourceId: p.sessionId,
      });
      await disconnectOperatorSockets([operatorSocketId(p)], 'signed out');
      return { ok: true };
    },
  );

  api.get(
    '/auth/me',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getMe',
        tags: ['auth'],
        summary: 'Who the bearer token stands for',
        response: { 200: principalSchema, ...authErrors },
      },
    },
    async (request) => {
      const p = request.operator;
      const user = await findUserById(db, p.userId);
      if (!user) throw new ApiError(401, 'unauthorized', 'the user of this token no longer exists');
      return { user: toUserSummary(user), role: p.role, org_id: p.orgId, token_id: p.tokenId ?? null };
    },
  );

  // ---- users (admin)

  api.get<{ Querystring: { org?: string } }>(
    '/users',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'listUsers',
        tags: ['users'],
        summary: 'List users (org admins see their org)',
        querystring: { type: 'object', properties: { ...paginationQuery, org: { type: 'string', format: 'uuid' } } },
        response: { 200: pageOf('User'), ...authErrors },
      },
    },
    async (request) => {
      const org = orgFilter(request.operator, request.query.org);
      return page(await listUsers(db, org ?? null), request.query);
    },
  );

  api.post<{ Body: { email: string; password: string; role: Role; org_id?: string | null; name?: string | null } }>(
    '/users',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'createUser',
        tags: ['users'],
        summary: 'Create a user',
        body: {
          type: 'object',
          required: ['email', 'password', 'role'],
          additionalProperties: false,
          properties: {
            email: { type: 'string', minLength: 3, maxLength: 320 },
            password: { type: 'string', minLength: 8, maxLength: 1024 },
            role: roleSchema,
            org_id: {
              type: ['string', 'null'],
              description: 'org id or name; null for an instance user (instance admins only)',
            },
            name: { type: ['string', 'null'], maxLength: 200 },
          },
        },
        response: { 201: ref('User'), ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const p = request.operator;
      const body = request.body;
      // Org admins create users in their own org only; instance users need an instance admin.
      const orgId = p.orgId ?? body.org_id ?? null;
      if (p.orgId !== null && body.org_id != null && body.org_id !== p.orgId)
        throw new ApiError(404, 'not_found', `org ${body.org_id} not found`);
      const user = await createUser(
        db,
        { email: body.email, password: body.password, role: body.role, orgId, name: body.name ?? null },
        p.actor,
      );
      return reply.status(201).send(user);
    },
  );

  const userIdParams = {
    type: 'object',
    required: ['id'],
    properties: { id: { type: 'string', format: 'uuid' } },
  } as const;

  api.patch<{
    Params: { id: string };
    Body: { name?: string | null; role?: Role; password?: string; disabled?: boolean };
  }>(
    '/users/:id',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'updateUser',
        tags: ['users'],
        summary:
          "Change a user's name, role, password or disabled flag (a new password, disabling or a new role revokes their login sessions and closes their live operator sockets)",
        params: userIdParams,
        body: {
          type: 'object',
          additionalProperties: false,
          minProperties: 1,
          properties: {
            name: { type: ['string', 'null'], maxLength: 200 },
            role: roleSchema,
            password: { type: 'string', minLength: 8, maxLength: 1024 },
            disabled: { type: 'boolean' },
          },
        },
        response: { 200: ref('User'), ...authErrors },
      },
    },
    async (request) => {
      const before = await userInScope(request.operator, request.params.id);
      const updated = await updateUser(db, request.params.id, request.body, request.operator.actor);
      // What the user's live sockets were authorised with no longer holds: they reconnect (or not) under the new rules.
      // A new password ends the user's login sessions (updateUser revoked them); API tokens stay.
      const reason =
        request.body.disabled === true && before.disabled_at === null
          ? 'user disabled'
          : request.body.role !== undefined && request.body.role !== before.role
            ? 'role changed'
            : undefined;
      if (reason) await disconnectOperatorSockets(await operatorSocketIdsOfUser(db, before.id), reason);
      else if (request.body.password !== undefined)
        await disconnectOperatorSockets(
          (await unexpiredSessionIds(db, before.id)).map((sessionId) =>
            operatorSocketId({ userId: before.id, sessionId }),
          ),
          'password changed',
        );
      return updated;
    },
  );

  api.delete<{ Params: { id: string } }>(
    '/users/:id',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'deleteUser',
        tags: ['users'],
        summary: 'Delete a user and their API tokens (their live operator sockets close)',
        params: userIdParams,
        response: { 204: { type: 'null' }, ...authErrors },
      },
    },
    async (request, reply) => {
      await userInScope(request.operator, request.params.id);
      if (request.params.id === request.operator.userId)
        throw new ApiError(409, 'conflict', 'you cannot delete yourself; ask another admin');
      // Read before the delete: the user's tokens go with it.
      const socketIds = await operatorSocketIdsOfUser(db, request.params.id);
      await deleteUser(db, request.params.id, request.operator.actor);
      await disconnectOperatorSockets(socketIds, 'user deleted');
      return reply.status(204).send();
    },
  );

  async function userInScope(p: OperatorPrincipal, id: string) {
    const user = await findUserById(db, id);
    // Org admins may not touch instance users nor other orgs' users: those look absent.
    if (!user || (p.orgId !== null && user.org_id !== p.orgId))
      throw new ApiError(404, 'not_found', `user ${id} not found`);
    return user;
  }

  /** After the change committed: live sockets of revoked credentials close on every node. A failure is logged; the change stands. */
  async function disconnectOperatorSockets(socketIds: string[], reason: string): Promise<void> {
    const disconnect = deps.disconnectOperatorSocket;
    if (!disconnect) return;
    const results = await Promise.allSettled(socketIds.map((id) => disconnect(id, reason)));
    for (const r of results)
      if (r.status === 'rejected') deps.log.error({ err: r.reason, reason }, 'closing operator sockets failed');
  }

  // ---- API tokens

  api.get<{ Querystring: { all?: boolean } }>(
    '/tokens',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listTokens',
        tags: ['tokens'],
        summary: 'List your API tokens (admins: `all=true` lists every token in their scope)',
        querystring: { type: 'object', properties: { ...paginationQuery, all: { type: 'boolean', default: false } } },
        response: { 200: pageOf('ApiToken'), ...authErrors },
      },
    },
    async (request) => {
      const p = request.operator;
      if (request.query.all) {
        if (roleRank(p.role) < roleRank('admin'))
          throw new ApiError(403, 'forbidden', 'listing every token needs the admin role');
        return page(await listApiTokens(db, { userId: null, orgId: p.orgId }), request.query);
      }
      return page(await listApiTokens(db, { userId: p.userId, orgId: null }), request.query);
    },
  );

  api.post<{ Body: { name: string; role?: Role; org_id?: string | null; expires_in_days?: number } }>(
    '/tokens',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'createToken',
        tags: ['tokens'],
        summary: 'Create an API token; the token is shown only in this response',
        body: {
          type: 'object',
          required: ['name'],
          additionalProperties: false,
          properties: {
            name: { type: 'string', minLength: 1, maxLength: 100 },
            role: { ...roleSchema, description: 'defaults to your role; cannot exceed it' },
            org_id: {
              type: ['string', 'null'],
              format: 'uuid',
              description: 'instance users may scope the token to one org',
            },
            expires_in_days: { type: 'integer', minimum: 1, maximum: 3650 },
          },
        },
        response: {
          201: {
            type: 'object',
            required: ['token', 'api_token'],
            properties: { token: { type: 'string' }, api_token: ref('ApiToken') },
          },
          ...authErrors,
        },
      },
    },
    async (request, reply) => {
      const p = request.operator;
      const role = request.body.role ?? p.role;
      if (roleRank(role) > roleRank(p.role))
        throw new ApiError(403, 'forbidden', `a token cannot have more rights than you: you are ${p.role}`);
      let orgId = p.orgId;
      if (request.body.org_id) {
        assertOrgAccess(p, request.body.org_id, 'org');
        orgId = request.body.org_id;
        const org = await db.selectFrom('orgs').select('id').where('id', '=', orgId).executeTakeFirst();
        if (!org) throw new ApiError(404, 'not_found', `org ${orgId} not found`);
      }
      const expiresAt = request.body.expires_in_days
        ? new Date(Date.now() + request.body.expires_in_days * 86_400_000)
        : null;
      const { token, record } = await createApiToken(
        db,
        { userId: p.userId, name: request.body.name, role, orgId, expiresAt },
        p.actor,
      );
      return reply.status(201).send({ token, api_token: record });
    },
  );

  api.delete<{ Params: { id: string } }>(
    '/tokens/:id',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'revokeToken',
        tags: ['tokens'],
        summary: 'Revoke an API token (yours, or any in scope for admins); sockets opened with it close',
        params: userIdParams,
        response: { 200: emptyOk, ...authErrors },
      },
    },
    async (request) => {
      const p = request.operator;
      const token = await findApiTokenById(db, request.params.id);
      const mine = token?.user_id === p.userId;
      const asAdmin = token && roleRank(p.role) >= roleRank('admin') && (p.orgId === null || token.org_id === p.orgId);
      if (!token || !(mine || asAdmin))
        throw new ApiError(404, 'not_found', `API token ${request.params.id} not found`);
      await revokeApiToken(db, token.id, p.actor);
      await disconnectOperatorSockets(
        [operatorSocketId({ userId: token.user_id, tokenId: token.id })],
        'API token revoked',
      );
      return { ok: true };
    },
  );
}
