/**
 * Operator authentication and authorisation for every `/api/v1` route (and the operator socket).
 *
 * A bearer is either a JWT from `POST /api/v1/auth/login` (HS256, 12 h) or an API token
 * (`fht_...`, stored as sha256). A JWT names a server-side session (claim `sid`, table
 * `operator_sessions`) and works only while that session is neither revoked nor expired: logout,
 * a password change, disabling the user or a new role revoke it at once. Either way the user is
 * re-read on each request, so disabling a user or lowering their role takes effect at once.
 * Refusals say why (`details.reason`: invalid_token, session_expired, session_revoked,
 * token_expired, token_revoked). Roles: viewer < operator < admin. A principal
 * is scoped to one org or (orgId null) to every org; other orgs' resources answer 404, not 403,
 * so their existence does not leak.
 *
 * Routes use `{ onRequest: requireRole('operator') }` and then read `request.operator`: the check
 * runs before the body is parsed or validated, so an anonymous caller gets 401 whatever it sent.
 */
import type { FastifyInstance } from 'fastify';
import { errors as joseErrors, jwtVerify, SignJWT } from 'jose';
import type { Db } from '../db/index.ts';
import {
  requiredRoleOf,
  roleRank,
  type AuthRefusal,
  type AuthResult,
  type OperatorAuthenticator,
  type OperatorPrincipal,
  type RouteRequirement,
} from '../http/auth.ts';
import { createSession, findSession, findUserById, hashApiToken, isRole, API_TOKEN_PREFIX } from './operators.ts';

export {
  assertOrgAccess,
  assertRole,
  bearerToken,
  canAccessOrg,
  orgFilter,
  requireRole,
  requiredRoleOf,
  type AuthRefusal,
  type AuthResult,
  type OperatorPrincipal,
  type Role,
  type RoleGuard,
  type RouteRequirement,
} from '../http/auth.ts';

export interface AuthDeps {
  db: Db;
  /** HS256 key for operator JWTs. */
  secret: string;
}

/** JWT lifetime: a working day; automation uses API tokens instead. */
export const JWT_TTL_SECONDS = 12 * 3600;
const JWT_ISSUER = 'fleethub';
const JWT_AUDIENCE = 'fleethub-operator';

/** Verifies bearers and issues JWTs with one secret and database. */
export class OperatorAuth implements OperatorAuthenticator {
  readonly #db: Db;
  readonly #key: Uint8Array;

  constructor(deps: AuthDeps) {
    if (!deps.secret || deps.secret.length < 16)
      throw new Error(
        'the API secret must have at least 16 characters (set FLEETHUB_SECRET or let the server generate one)',
      );
    this.#db = deps.db;
    this.#key = new TextEncoder().encode(deps.secret);
  }

  /**
   * Opens a server-side session for a user and signs a JWT naming it (`sid`); the role and org
   * are re-read from the database on every use, and the token works only while the session lives.
   */
  async issueJwt(
    userId: string,
    client: { remoteAddress?: string; userAgent?: string } = {},
  ): Promise<{ token: string; expiresAt: Date; sessionId: string }> {
    const expiresAt = new Date(Date.now() + JWT_TTL_SECONDS * 1000);
    const sessionId = await createSession(this.#db, { userId, expiresAt, ...client });
    const token = await new SignJWT({ sid: sessionId })
      .setProtectedHeader({ alg: 'HS256' })
      .setSubject(userId)
      .setIssuer(JWT_ISSUER)
      .setAudience(JWT_AUDIENCE)
      .setIssuedAt()
      .setExpirationTime(Math.floor(expiresAt.getTime() / 1000))
      .sign(this.#key);
    return { token, expiresAt, sessionId };
  }

  /** The principal a bearer token stands for, or null when it is unknown, expired, revoked or its user is disabled. */
  async authenticate(token: string): Promise<OperatorPrincipal | null> {
    const result = await this.verify(token);
    return result.ok ? result.principal : null;
  }

  /** Like `authenticate`, and says why a bearer is refused (the 401 body tells the caller what happened). */
  async verify(token: string): Promise<AuthResult> {
    if (!token) return refusal('invalid_token');
    return token.startsWith(API_TOKEN_PREFIX) ? this.#fromApiToken(token) : this.#fromJwt(token);
  }

  async #fromJwt(token: string): Promise<AuthResult> {
    let sub: string | undefined;
    let sid: unknown;
    let exp: number | undefined;
    try {
      const { payload } = await jwtVerify(token, this.#key, {
        algorithms: ['HS256'],
        issuer: JWT_ISSUER,
        audience: JWT_AUDIENCE,
      });
      sub = payload.sub;
      sid = payload.sid;
      exp = payload.exp;
    } catch (err) {
      // Signed by us and merely past its exp: the session ended; anything else is not our token.
      return refusal(err instanceof joseErrors.JWTExpired ? 'session_expired' : 'invalid_token');
    }
    // Tokens from before server-side sessions carry no sid: they cannot be revoked, so they are refused.
    if (!sub || typeof sid !== 'string') return refusal('invalid_token');
    const session = await findSession(this.#db, sid);
    if (!session || session.user_id !== sub) return refusal('session_revoked', 'the session no longer exists');
    if (session.revoked_at !== null) return refusal('session_revoked', session.revoked_reason ?? undefined);
    if (new Date(session.expires_at).getTime() <= Date.now()) return refusal('session_expired');
    const user = await findUserById(this.#db, sub);
    if (!user || !isRole(user.role)) return refusal('session_revoked', 'the user no longer exists');
    if (user.disabled_at !== null) return refusal('session_revoked', 'user disabled');
    return {
      ok: true,
      principal: {
        userId: user.id,
        sessionId: session.id,
        role: user.role,
        orgId: user.org_id,
        actor: { type: 'operator', id: user.id },
        ...(exp === undefined ? {} : { expiresAt: new Date(exp * 1000) }),
      },
    };
  }

  async #fromApiToken(token: string): Promise<AuthResult> {
    const row = await this.#db
      .selectFrom('api_tokens')
      .innerJoin('users', 'users.id', 'api_tokens.user_id')
      .select([
        'api_tokens.id as tokenId',
        'api_tokens.role as tokenRole',
        'api_tokens.org_id as tokenOrg',
        'api_tokens.expires_at as expiresAt',
        'api_tokens.revoked_at as revokedAt',
        'api_tokens.last_used_at as lastUsedAt',
        'users.id as userId',
        'users.role as userRole',
        'users.org_id as userOrg',
        'users.disabled_at as disabledAt',
      ])
      .where('api_tokens.token_hash', '=', hashApiToken(token))
      .executeTakeFirst();
    if (!row) return refusal('invalid_token');
    if (row.revokedAt !== null) return refusal('token_revoked');
    if (row.disabledAt !== null) return refusal('token_revoked', 'its user is disabled');
    if (row.expiresAt !== null && new Date(row.expiresAt).getTime() <= Date.now()) return refusal('token_expired');
    if (!isRole(row.tokenRole) || !isRole(row.userRole)) return refusal('invalid_token');
    // A token never does more than its user may do now, nor sees more than the user's org.
    const role = roleRank(row.tokenRole) <= roleRank(row.userRole) ? row.tokenRole : row.userRole;
    const orgId = row.userOrg ?? row.tokenOrg;
    // Record use at most once a minute so reads do not turn into writes.
    if (row.lastUsedAt === null || Date.now() - new Date(row.lastUsedAt).getTime() > 60_000) {
      await this.#db
        .updateTable('api_tokens')
        .set({ last_used_at: new Date() })
        .where('id', '=', row.tokenId)
        .execute();
    }
    return {
      ok: true,
      principal: {
        userId: row.userId,
        tokenId: row.tokenId,
        role,
        orgId,
        actor: { type: 'api_token', id: row.tokenId },
        ...(row.expiresAt === null ? {} : { expiresAt: new Date(row.expiresAt) }),
      },
    };
  }
}

const REFUSAL_MESSAGES: Record<AuthRefusal, string> = {
  invalid_token: 'the bearer token is invalid (not issued by this server, or malformed): log in again',
  session_expired: `your session expired (sessions last ${JWT_TTL_SECONDS / 3600} h): log in again`,
  session_revoked: 'your session was revoked: log in again',
  token_expired: 'this API token has expired: create a new one (POST /api/v1/tokens)',
  token_revoked: 'this API token was revoked: create a new one (POST /api/v1/tokens)',
};

function refusal(reason: AuthRefusal, cause?: string): AuthResult {
  const base = REFUSAL_MESSAGES[reason];
  const message = cause ? base.replace(/:/, ` (${cause}):`) : base;
  return { ok: false, reason, message, ...(cause ? { cause } : {}) };
}

/**
 * Decorates the app with the authenticator `requireRole` uses and the route table; call once on
 * the root instance before routes are added. Guarded routes say their role in the OpenAPI document.
 */
export function registerAuth(app: FastifyInstance, deps: AuthDeps): OperatorAuth {
  const auth = new OperatorAuth(deps);
  if (!app.hasDecorator('fleethubAuth')) app.decorate('fleethubAuth', auth);
  if (!app.hasRequestDecorator('operator')) app.decorateRequest('operator', null as unknown as OperatorPrincipal);
  if (!app.hasDecorator('fleethubRoutes')) {
    const routes: RouteRequirement[] = [];
    app.decorate('fleethubRoutes', routes);
    app.addHook('onRoute', (route) => {
      const role = requiredRoleOf(route);
      for (const method of Array.isArray(route.method) ? route.method : [route.method])
        routes.push({ method, url: route.url, role });
      if (role && route.schema) {
        const needs = `Needs the ${role} role or higher.`;
        route.schema = {
          ...route.schema,
          description: route.schema.description ? `${route.schema.description}\n\n${needs}` : needs,
        };
      }
    });
  }
  return auth;
}
