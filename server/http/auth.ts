/**
 * The HTTP kit both the operator API (server/api/) and the edges' REST routes use: who is
 * calling (`OperatorPrincipal`), the role guard `requireRole`, org scoping and roles. The API
 * decorates the app with the authenticator (server/api/auth.ts `registerAuth`); routes use
 * `{ onRequest: requireRole('operator') }` and then read `request.operator`: the check runs
 * before the body is parsed or validated, so an anonymous caller gets 401 whatever it sent.
 * Roles: viewer < operator < admin. Other orgs' resources answer 404, not 403.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest, onRequestAsyncHookHandler, RouteOptions } from 'fastify';
import type { Actor } from '../audit.ts';
import type { Role } from '../db/schema.ts';
import { ApiError } from './errors.ts';

export type { Role };

export const ROLES: readonly Role[] = ['viewer', 'operator', 'admin'];

/** Roles ordered by what they may do: viewer < operator < admin. */
export function roleRank(role: Role): number {
  return ROLES.indexOf(role);
}

export function isRole(value: unknown): value is Role {
  return typeof value === 'string' && (ROLES as readonly string[]).includes(value);
}

/** Who is calling: set on `request.operator` by `requireRole`. */
export interface OperatorPrincipal {
  userId: string;
  /** Set when the call authenticated with an API token. */
  tokenId?: string;
  /** Set when the call authenticated with a login JWT: the server-side session it names. */
  sessionId?: string;
  role: Role;
  /** The one org this principal may see; null for instance users who see every org. */
  orgId: string | null;
  /** For audit records: `operator` (user id) or `api_token` (token id). */
  actor: Actor;
  /** When the bearer expires (a JWT's exp, an API token's expires_at); unset when it does not. */
  expiresAt?: Date;
}

/** Why a bearer was refused: the `reason` in a 401 body's details. */
export type AuthRefusal = 'invalid_token' | 'session_expired' | 'session_revoked' | 'token_expired' | 'token_revoked';

export type AuthResult =
  | { ok: true; principal: OperatorPrincipal }
  | { ok: false; reason: AuthRefusal; message: string; cause?: string };

/** Turns a bearer into a principal (JWT or API token), or says why it is refused. */
export interface OperatorAuthenticator {
  authenticate(token: string): Promise<OperatorPrincipal | null>;
  verify(token: string): Promise<AuthResult>;
}

declare module 'fastify' {
  interface FastifyInstance {
    fleethubAuth: OperatorAuthenticator;
    /** Every route of this listener with the role its guard demands (filled by `registerAuth`'s onRoute hook). */
    fleethubRoutes: readonly RouteRequirement[];
  }
  interface FastifyRequest {
    /** The authenticated operator; only set on routes guarded by `requireRole`. */
    operator: OperatorPrincipal;
  }
}

/** One route of the listener and the role its `requireRole` guard demands (none: public, or its own credential). */
export interface RouteRequirement {
  method: string;
  url: string;
  role: Role | undefined;
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
    const result = await auth.verify(token);
    if (!result.ok)
      throw new ApiError(401, 'unauthorized', result.message, {
        reason: result.reason,
        ...(result.cause ? { cause: result.cause } : {}),
      });
    const principal = result.principal;
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
