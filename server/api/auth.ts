/**
 * Operator authentication and authorisation for every `/api/v1` route (and the operator socket).
 *
 * A bearer is either a JWT from `POST /api/v1/auth/login` (HS256, 12 h) or an API token
 * (`fht_...`, stored as sha256). Either way the user is re-read on each request, so disabling a
 * user or lowering their role takes effect at once. Roles: viewer < operator < admin. A principal
 * is scoped to one org or (orgId null) to every org; other orgs' resources answer 404, not 403,
 * so their existence does not leak.
 *
 * Routes use `{ onRequest: requireRole('operator') }` and then read `request.operator`: the check
 * runs before the body is parsed or validated, so an anonymous caller gets 401 whatever it sent.
 */
import type { FastifyInstance } from 'fastify';
import { jwtVerify, SignJWT } from 'jose';
import type { Db } from '../db/index.ts';
import {
  requiredRoleOf,
  roleRank,
  type OperatorAuthenticator,
  type OperatorPrincipal,
  type RouteRequirement,
} from '../http/auth.ts';
import { API_TOKEN_PREFIX, findUserById, hashApiToken, isRole } from './operators.ts';

export {
  assertOrgAccess,
  assertRole,
  bearerToken,
  canAccessOrg,
  orgFilter,
  requireRole,
  requiredRoleOf,
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

  /** Signs a JWT for a user; the role and org are re-read from the database on every use. */
  async issueJwt(userId: string): Promise<{ token: string; expiresAt: Date }> {
    const expiresAt = new Date(Date.now() + JWT_TTL_SECONDS * 1000);
    const token = await new SignJWT({})
      .setProtectedHeader({ alg: 'HS256' })
      .setSubject(userId)
      .setIssuer(JWT_ISSUER)
      .setAudience(JWT_AUDIENCE)
      .setIssuedAt()
      .setExpirationTime(Math.floor(expiresAt.getTime() / 1000))
      .sign(this.#key);
    return { token, expiresAt };
  }

  /** The principal a bearer token stands for, or null when it is unknown, expired, revoked or its user is disabled. */
  async authenticate(token: string): Promise<OperatorPrincipal | null> {
    if (!token) return null;
    return token.startsWith(API_TOKEN_PREFIX) ? this.#fromApiToken(token) : this.#fromJwt(token);
  }

  async #fromJwt(token: string): Promise<OperatorPrincipal | null> {
    let sub: string | undefined;
    let exp: number | undefined;
    try {
      const { payload } = await jwtVerify(token, this.#key, {
        algorithms: ['HS256'],
        issuer: JWT_ISSUER,
        audience: JWT_AUDIENCE,
      });
      sub = payload.sub;
      exp = payload.exp;
    } catch {
      return null;
    }
    if (!sub) return null;
    const user = await findUserById(this.#db, sub);
    if (!user || user.disabled_at !== null || !isRole(user.role)) return null;
    return {
      userId: user.id,
      role: user.role,
      orgId: user.org_id,
      actor: { type: 'operator', id: user.id },
      ...(exp === undefined ? {} : { expiresAt: new Date(exp * 1000) }),
    };
  }

  async #fromApiToken(token: string): Promise<OperatorPrincipal | null> {
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
    if (!row || row.revokedAt !== null || row.disabledAt !== null) return null;
    if (row.expiresAt !== null && new Date(row.expiresAt).getTime() <= Date.now()) return null;
    if (!isRole(row.tokenRole) || !isRole(row.userRole)) return null;
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
      userId: row.userId,
      tokenId: row.tokenId,
      role,
      orgId,
      actor: { type: 'api_token', id: row.tokenId },
      ...(row.expiresAt === null ? {} : { expiresAt: new Date(row.expiresAt) }),
    };
  }
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
