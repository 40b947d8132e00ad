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
import type { FastifyInstance, FastifyReply, FastifyRequest, onRequestAsyncHookHandler, RouteOptions } from 'fastify';
import { jwtVerify, SignJWT } from 'jose';
import type { Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { Role } from '../db/schema.ts';
import { ApiError } from './errors.ts';
import { API_TOKEN_PREFIX, findUserById, hashApiToken, isRole, roleRank } from './operators.ts';

export type { Role };

/** Who is calling: set on `request.operator` by `requireRole`. */
export interface OperatorPrincipal {
  userId: string;
  /** Set when the call authenticated with an API token. */
  tokenId?: string;
  role: Role;
  /** The one org this principal may see; null for instance users who see every org. */
  orgId: string | null;
  /** For audit records: `operator` (user id) or `api_token` (token id). */
  actor: Actor;
  /** When the bearer expires (a JWT's exp, an API token's expires_at); unset when it does not. */
  expiresAt?: Date;
}

export interface AuthDeps {
  db: Db;
  /** HS256 key for operator JWTs. */
  secret: string;
}

declare module 'fastify' {
  interface FastifyInstance {
    fleethubAuth: OperatorAuth;
    /** Every route of this listener with the role its guard demands (filled by `registerAuth`'s onRoute hook). */
    fleethubRoutes: readonly RouteRequirement[];
  }
  interface FastifyRequest {
    /** The authenticated operator; only set on routes guarded by `requireRole`. */
    operator: OperatorPrincipal;
  }
}

/** JWT lifetime: a working day; automation uses API tokens instead. */
export const JWT_TTL_SECONDS = 12 * 3600;
const JWT_ISSUER = 'fleethub';
const JWT_AUDIENCE = 'fleethub-operator';

/** Verifies bearers and issues JWTs with one secret and database. */
export class OperatorAuth {
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

/** One route of the listener and the role its `requireRole` guard demands (none: public, or its own credential). */
export interface RouteRequirement {
  method: string;
  url: string;
  role: Role | undefined;
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

/** The bearer token of a request: `Authorization: Bearer <token>`. */
export function bearerToken(request: FastifyRequest): string | undefined {
  const header = request.headers.authorization;
  if (!header) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  return match?.[1];
}

/** A `requireRole` hook: the role it demands is readable from the route table (`requiredRoleOf`). */
export type RoleGuard = onRequestAsyncHookHandler & { readonly requiredRole: Role };

/**
 * Fastify onRequest hook: 401 without a valid bearer, 403 when the principal's role is below
 * `role`. Sets `request.operator`. Runs before body parsing and validation.
 */
export function requireRole(role: Role): RoleGuard {
  const checkRole = async function checkRole(
    this: FastifyInstance,
    request: FastifyRequest,
    _reply: FastifyReply,
  ): Promise<void> {
    const auth = request.server.fleethubAuth;
    if (!auth) throw new Error('requireRole used before registerAuth(app, ...)');
    const token = bearerToken(request);
    if (!token)
      throw new ApiError(
        401,
        'unauthorized',
        'missing bearer token: log in (POST /api/v1/auth/login) or pass an API token as "Authorization: Bearer <token>"',
      );
    const principal = await auth.authenticate(token);
    if (!principal)
      throw new ApiError(401, 'unauthorized', 'the bearer token is invalid, expired or revoked: log in again');
    request.operator = principal;
    if (roleRank(principal.role) < roleRank(role)) {
      throw new ApiError(403, 'forbidden', `this needs the ${role} role; you are ${principal.role}`);
    }
  };
  return Object.assign(checkRole, { requiredRole: role });
}

/** The role a route's `requireRole` guard demands (from its onRequest hooks), or undefined when it has none. */
export function requiredRoleOf(route: Pick<RouteOptions, 'onRequest'>): Role | undefined {
  const hooks =
    route.onRequest === undefined ? [] : Array.isArray(route.onRequest) ? route.onRequest : [route.onRequest];
  for (const hook of hooks) {
    const role = (hook as Partial<RoleGuard>).requiredRole;
    if (role !== undefined) return role;
  }
  return undefined;
}

/** Whether a principal may see an org's resources. */
export function canAccessOrg(principal: OperatorPrincipal, orgId: string): boolean {
  return principal.orgId === null || principal.orgId === orgId;
}

/** Throws 404 when the principal may not see `orgId`, so other orgs' resources look absent. */
export function assertOrgAccess(principal: OperatorPrincipal, orgId: string, what = 'resource'): void {
  if (!canAccessOrg(principal, orgId)) throw new ApiError(404, 'not_found', `${what} not found`);
}

/** Throws 403 unless the principal has at least `role` (for checks inside a handler). */
export function assertRole(principal: OperatorPrincipal, role: Role): void {
  if (roleRank(principal.role) < roleRank(role))
    throw new ApiError(403, 'forbidden', `this needs the ${role} role; you are ${principal.role}`);
}

/**
 * The org filter for a list: the principal's own org, or `requested` for instance users
 * (undefined: every org). Asking for another org than one's own answers 404.
 */
export function orgFilter(principal: OperatorPrincipal, requested?: string): string | undefined {
  if (principal.orgId === null) return requested;
  if (requested !== undefined && requested !== principal.orgId)
    throw new ApiError(404, 'not_found', `org ${requested} not found`);
  return principal.orgId;
}
