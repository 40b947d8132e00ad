/**
 * Operators' identities: users with scrypt password hashes and API tokens stored as sha256.
 * The only SQL the API layer writes itself (everything else goes through server/fleet).
 */
import { createHash, randomBytes, scrypt as scryptCb, timingSafeEqual, type ScryptOptions } from 'node:crypto';
import { audit, SYSTEM, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { Role } from '../db/schema.ts';
import { ApiError } from '../http/errors.ts';

import { isRole, ROLES } from '../http/auth.ts';

export { isRole, ROLES, roleRank } from '../http/auth.ts';

// scrypt cost: N=2^15 is OWASP's minimum for interactive logins (~50 ms, 32 MiB).
const SCRYPT = { N: 32768, r: 8, p: 1, keylen: 64, maxmem: 64 * 1024 * 1024 } as const;

function scrypt(password: string, salt: Buffer, keylen: number, options: ScryptOptions): Promise<Buffer> {
  return new Promise((resolve, reject) =>
    scryptCb(password, salt, keylen, options, (err, key) => (err ? reject(err) : resolve(key))),
  );
}

/** Hashes a password as `scrypt$N$r$p$<salt>$<hash>` (base64url) with a fresh 16-byte salt. */
export async function hashPassword(password: string): Promise<string> {
  const salt = randomBytes(16);
  const key = await scrypt(password, salt, SCRYPT.keylen, {
    N: SCRYPT.N,
    r: SCRYPT.r,
    p: SCRYPT.p,
    maxmem: SCRYPT.maxmem,
  });
  return ['scrypt', SCRYPT.N, SCRYPT.r, SCRYPT.p, salt.toString('base64url'), key.toString('base64url')].join('$');
}

/** Checks a password against a stored hash in constant time. */
export async function verifyPassword(password: string, stored: string): Promise<boolean> {
  const parts = stored.split('$');
  if (parts.length !== 6 || parts[0] !== 'scrypt') return false;
  const [N, r, p] = parts.slice(1, 4).map(Number) as [number, number, number];
  const salt = Buffer.from(parts[4]!, 'base64url');
  const expected = Buffer.from(parts[5]!, 'base64url');
  const key = await scrypt(password, salt, expected.length, { N, r, p, maxmem: SCRYPT.maxmem });
  return key.length === expected.length && timingSafeEqual(key, expected);
}

// Compared against when the email is unknown, so a login takes as long whether or not the user exists.
let dummyHash: Promise<string> | undefined;
export function dummyPasswordHash(): Promise<string> {
  dummyHash ??= hashPassword(randomBytes(16).toString('hex'));
  return dummyHash;
}

/** A user as the API shows it (never the password hash); API bodies use snake_case like the database. */
export interface UserSummary {
  id: string;
  email: string;
  name: string | null;
  role: Role;
  org_id: string | null;
  disabled: boolean;
  created_at: string;
}

export interface NewUser {
  email: string;
  password: string;
  role: Role;
  /** Org id or name; null or absent: an instance user who sees every org. */
  orgId?: string | null;
  name?: string | null;
}

const EMAIL_RE = /^[^\s@]+@[^\s@]+$/;
export const MIN_PASSWORD_LENGTH = 8;

/** Creates a user with a hashed password; rejects duplicates (409) and weak input (400). */
export async function createUser(db: Db, input: NewUser, actor: Actor = SYSTEM): Promise<UserSummary> {
  const email = input.email.trim().toLowerCase();
  if (!EMAIL_RE.test(email)) throw new ApiError(400, 'invalid', `"${input.email}" is not an email address`);
  if (input.password.length < MIN_PASSWORD_LENGTH) {
    throw new ApiError(400, 'invalid', `the password must have at least ${MIN_PASSWORD_LENGTH} characters`);
  }
  if (!isRole(input.role)) throw new ApiError(400, 'invalid', `role must be one of ${ROLES.join(', ')}`);
  let orgId: string | null = null;
  if (input.orgId) {
    const ref = input.orgId;
    const org = await db
      .selectFrom('orgs')
      .select('id')
      .where((eb) => (isUuid(ref) ? eb('id', '=', ref) : eb('name', '=', ref)))
      .executeTakeFirst();
    if (!org)
      throw new ApiError(
        404,
        'not_found',
        `org ${JSON.stringify(ref)} does not exist; create it first or omit --org for an instance user`,
      );
    orgId = org.id;
  }
  const existing = await db.selectFrom('users').select('id').where('email', '=', email).executeTakeFirst();
  if (existing) throw new ApiError(409, 'conflict', `a user with email ${email} already exists`);
  const passwordHash = await hashPassword(input.password);
  const row = await db.transaction().execute(async (trx) => {
    const created = await trx
      .insertInto('users')
      .values({ email, name: input.name ?? null, password_hash: passwordHash, role: input.role, org_id: orgId })
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId,
      action: 'user.create',
      resourceType: 'user',
      resourceId: created.id,
      details: { email, role: input.role },
    });
    return created;
  });
  return toUserSummary(row);
}

interface UserRow {
  id: string;
  email: string;
  name: string | null;
  role: Role;
  org_id: string | null;
  disabled_at: Date | null;
  created_at: Date;
}

export function toUserSummary(row: UserRow): UserSummary {
  return {
    id: row.id,
    email: row.email,
    name: row.name,
    role: row.role,
    org_id: row.org_id,
    disabled: row.disabled_at !== null,
    created_at: new Date(row.created_at).toISOString(),
  };
}

/** Users visible to a principal scoped to `orgId` (null: every user). */
export async function listUsers(db: Db, orgId: string | null): Promise<UserSummary[]> {
  let q = db.selectFrom('users').selectAll().orderBy('email');
  if (orgId !== null) q = q.where('org_id', '=', orgId);
  return (await q.execute()).map(toUserSummary);
}

export async function findUserById(db: Db, id: string): Promise<(UserRow & { password_hash: string }) | undefined> {
  if (!isUuid(id)) return undefined;
  return db.selectFrom('users').selectAll().where('id', '=', id).executeTakeFirst();
}

export async function findUserByEmail(
  db: Db,
  email: string,
): Promise<(UserRow & { password_hash: string }) | undefined> {
  return db.selectFrom('users').selectAll().where('email', '=', email.trim().toLowerCase()).executeTakeFirst();
}

export interface UserChanges {
  name?: string | null;
  role?: Role;
  password?: string;
  disabled?: boolean;
}

/** Changes a user's name, role, password or disabled flag. */
export async function updateUser(db: Db, id: string, changes: UserChanges, actor: Actor): Promise<UserSummary> {
  const user = await findUserById(db, id);
  if (!user) throw new ApiError(404, 'not_found', `user ${id} does not exist`);
  const values: Record<string, unknown> = {};
  if (changes.name !== undefined) values.name = changes.name;
  if (changes.role !== undefined) values.role = changes.role;
  if (changes.password !== undefined) {
    if (changes.password.length < MIN_PASSWORD_LENGTH) {
      throw new ApiError(400, 'invalid', `the password must have at least ${MIN_PASSWORD_LENGTH} characters`);
    }
    values.password_hash = await hashPassword(changes.password);
  }
  if (changes.disabled !== undefined) values.disabled_at = changes.disabled ? new Date() : null;
  if (Object.keys(values).length === 0) return toUserSummary(user);
  const revokedBecause = sessionRevocationReason(user, changes);
  const row = await db.transaction().execute(async (trx) => {
    const updated = await trx
      .updateTable('users')
      .set(values)
      .where('id', '=', id)
      .returningAll()
      .executeTakeFirstOrThrow();
    // In the same transaction: no request sees the new password, role or flag with an old session.
    if (revokedBecause) await revokeUserSessions(trx, id, revokedBecause);
    const { password: _omit, ...logged } = changes;
    await audit(trx, actor, {
      orgId: user.org_id,
      action: 'user.update',
      resourceType: 'user',
      resourceId: id,
      details: { ...logged, passwordChanged: changes.password !== undefined },
    });
    return updated;
  });
  return toUserSummary(row);
}

/** Why a change to a user ends their sessions, if it does: what they logged in under no longer holds. */
function sessionRevocationReason(user: UserRow, changes: UserChanges): SessionRevocationReason | undefined {
  if (changes.password !== undefined) return 'password changed';
  if (changes.disabled === true && user.disabled_at === null) return 'user disabled';
  if (changes.role !== undefined && changes.role !== user.role) return 'role changed';
  return undefined;
}

/** Deletes a user and, by cascade, their API tokens and sessions. */
export async function deleteUser(db: Db, id: string, actor: Actor): Promise<void> {
  const user = await findUserById(db, id);
  if (!user) throw new ApiError(404, 'not_found', `user ${id} does not exist`);
  await db.transaction().execute(async (trx) => {
    await trx.deleteFrom('users').where('id', '=', id).execute();
    await audit(trx, actor, {
      orgId: user.org_id,
      action: 'user.delete',
      resourceType: 'user',
      resourceId: id,
      details: { email: user.email },
    });
  });
}

// ---------------------------------------------------------------------------------------------
// API tokens

/** Prefix that tells an API token from a JWT (and makes leaked tokens greppable). */
export const API_TOKEN_PREFIX = 'fht_';

export interface ApiTokenSummary {
  id: string;
  user_id: string;
  name: string;
  role: Role;
  org_id: string | null;
  expires_at: string | null;
  last_used_at: string | null;
  revoked: boolean;
  created_at: string;
}

export function hashApiToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

export interface NewApiToken {
  userId: string;
  name: string;
  role: Role;
  orgId: string | null;
  expiresAt?: Date | null;
}

/** Creates an API token; the returned `token` is the only time it exists in clear. */
export async function createApiToken(
  db: Db,
  input: NewApiToken,
  actor: Actor,
): Promise<{ token: string; record: ApiTokenSummary }> {
  const token = API_TOKEN_PREFIX + randomBytes(32).toString('base64url');
  const row = await db.transaction().execute(async (trx) => {
    const created = await trx
      .insertInto('api_tokens')
      .values({
        user_id: input.userId,
        name: input.name,
        token_hash: hashApiToken(token),
        role: input.role,
        org_id: input.orgId,
        expires_at: input.expiresAt ?? null,
      })
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId: input.orgId,
      action: 'api_token.create',
      resourceType: 'api_token',
      resourceId: created.id,
      details: { name: input.name, role: input.role },
    });
    return created;
  });
  return { token, record: toTokenSummary(row) };
}

interface TokenRow {
  id: string;
  user_id: string;
  name: string;
  role: Role;
  org_id: string | null;
  expires_at: Date | null;
  last_used_at: Date | null;
  revoked_at: Date | null;
  created_at: Date;
}

export function toTokenSummary(row: TokenRow): ApiTokenSummary {
  return {
    id: row.id,
    user_id: row.user_id,
    name: row.name,
    role: row.role,
    org_id: row.org_id,
    expires_at: row.expires_at ? new Date(row.expires_at).toISOString() : null,
    last_used_at: row.last_used_at ? new Date(row.last_used_at).toISOString() : null,
    revoked: row.revoked_at !== null,
    created_at: new Date(row.created_at).toISOString(),
  };
}

/** Tokens of one user, or (userId null) of every user in `orgId` (null: all). */
export async function listApiTokens(
  db: Db,
  filter: { userId: string | null; orgId: string | null },
): Promise<ApiTokenSummary[]> {
  let q = db
    .selectFrom('api_tokens')
    .select(['id', 'user_id', 'name', 'role', 'org_id', 'expires_at', 'last_used_at', 'revoked_at', 'created_at'])
    .orderBy('created_at', 'desc');
  if (filter.userId !== null) q = q.where('user_id', '=', filter.userId);
  if (filter.orgId !== null) q = q.where('org_id', '=', filter.orgId);
  return (await q.execute()).map(toTokenSummary);
}

export async function findApiTokenById(db: Db, id: string): Promise<ApiTokenSummary | undefined> {
  if (!isUuid(id)) return undefined;
  const row = await db
    .selectFrom('api_tokens')
    .select(['id', 'user_id', 'name', 'role', 'org_id', 'expires_at', 'last_used_at', 'revoked_at', 'created_at'])
    .where('id', '=', id)
    .executeTakeFirst();
  return row ? toTokenSummary(row) : undefined;
}

/** Marks a token revoked; later requests with it get 401. */
export async function revokeApiToken(db: Db, id: string, actor: Actor): Promise<void> {
  const token = await findApiTokenById(db, id);
  if (!token) throw new ApiError(404, 'not_found', `API token ${id} does not exist`);
  await db.transaction().execute(async (trx) => {
    await trx
      .updateTable('api_tokens')
      .set({ revoked_at: new Date() })
      .where('id', '=', id)
      .where('revoked_at', 'is', null)
      .execute();
    await audit(trx, actor, {
      orgId: token.org_id,
      action: 'api_token.revoke',
      resourceType: 'api_token',
      resourceId: id,
      details: { name: token.name },
    });
  });
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Ids in paths are checked before they reach a uuid column (PostgreSQL rejects malformed ones with an error). */
export function isUuid(value: string): boolean {
  return UUID_RE.test(value);
}

// ---------------------------------------------------------------------------------------------
// Sessions: one per login; its id is the JWT's `sid`.

export type SessionRevocationReason = 'signed out' | 'password changed' | 'user disabled' | 'role changed';

export interface NewSession {
  userId: string;
  expiresAt: Date;
  remoteAddress?: string | null;
  userAgent?: string | null;
}

/** Opens a session for a login; expired sessions of the same user are dropped on the way. */
export async function createSession(db: Db, input: NewSession): Promise<string> {
  await db
    .deleteFrom('operator_sessions')
    .where('user_id', '=', input.userId)
    .where('expires_at', '<', new Date())
    .execute();
  const row = await db
    .insertInto('operator_sessions')
    .values({
      user_id: input.userId,
      expires_at: input.expiresAt,
      remote_address: input.remoteAddress ?? null,
      user_agent: input.userAgent?.slice(0, 300) ?? null,
    })
    .returning('id')
    .executeTakeFirstOrThrow();
  return row.id;
}

export interface SessionRow {
  id: string;
  user_id: string;
  expires_at: Date;
  revoked_at: Date | null;
  revoked_reason: string | null;
}

export async function findSession(db: Db, id: string): Promise<SessionRow | undefined> {
  if (!isUuid(id)) return undefined;
  return db
    .selectFrom('operator_sessions')
    .select(['id', 'user_id', 'expires_at', 'revoked_at', 'revoked_reason'])
    .where('id', '=', id)
    .executeTakeFirst();
}

/** Revokes one session (logout); false when it was revoked already. */
export async function revokeSession(db: Db, id: string, reason: SessionRevocationReason): Promise<boolean> {
  const result = await db
    .updateTable('operator_sessions')
    .set({ revoked_at: new Date(), revoked_reason: reason })
    .where('id', '=', id)
    .where('revoked_at', 'is', null)
    .executeTakeFirst();
  return Number(result.numUpdatedRows) > 0;
}

/** Revokes every live session of a user; returns how many. */
export async function revokeUserSessions(db: Db, userId: string, reason: SessionRevocationReason): Promise<number> {
  const result = await db
    .updateTable('operator_sessions')
    .set({ revoked_at: new Date(), revoked_reason: reason })
    .where('user_id', '=', userId)
    .where('revoked_at', 'is', null)
    .where('expires_at', '>', new Date())
    .executeTakeFirst();
  return Number(result.numUpdatedRows);
}

/** Ids of a user's sessions that have not expired (revoked or not): their sockets may still be open. */
export async function unexpiredSessionIds(db: Db, userId: string): Promise<string[]> {
  const rows = await db
    .selectFrom('operator_sessions')
    .select('id')
    .where('user_id', '=', userId)
    .where('expires_at', '>', new Date())
    .execute();
  return rows.map((r) => r.id);
}
