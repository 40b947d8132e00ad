/**
 * WiFiDogX gateway credentials and the admission rule. A gateway has no certificate and names
 * itself in its `connect`; an approved gateway is therefore given a secret it sends on the
 * upgrade path (`?credential=`, apfree-wifidog's `WSServerPath`). Only a SHA-256 of it is stored.
 * `admitClaim` is pure: which claims are served, which are refused, and why.
 */
import { createHash, randomBytes } from 'node:crypto';
import { sql } from 'kysely';
import type { Db } from '../../db/index.ts';
import type { DeviceApproval } from '../../db/schema.ts';
import { deviceById, deviceExistsSql, deviceRevokedAtSql } from '../../fleet/devices.ts';

/** `secure` (default): an approved gateway is served on its credential only. `open`: a claim of a gateway without a credential suffices (labs). */
export type WifidogxAuthPolicy = 'secure' | 'open';
export const WIFIDOGX_AUTH_POLICIES: readonly WifidogxAuthPolicy[] = ['secure', 'open'];

/** Where gateways connect (apfree-wifidog's default WSServerPath). */
export const WIFIDOGX_PATH = '/ws/wifidogx';

/** Longest `credential` query value looked up (issued ones are 43 characters). */
const MAX_CREDENTIAL_LENGTH = 128;

function hashCredential(credential: string): string {
  return createHash('sha256').update(credential).digest('hex');
}

/** The path a gateway puts in `WSServerPath` to carry `credential`. */
export function credentialPath(basePath: string, credential: string): string {
  return `${basePath}?credential=${credential}`;
}

/** Issues a new credential for the gateway, replacing any previous one; returns it (shown once). */
export async function issueCredential(db: Db, deviceId: string): Promise<{ token: string; issuedAt: Date }> {
  // base64url: letters, digits, '-' and '_' only, safe in a URL query and in wifidog.conf.
  const token = randomBytes(32).toString('base64url');
  // Database time, as devices.revoked_at is: the two are compared (liveCredential).
  const set = { credential_hash: hashCredential(token), credential_issued_at: sql<Date>`now()` };
  const row = await db
    .insertInto('wifidogx_gateways')
    .values({ device_id: deviceId, ...set })
    .onConflict((oc) => oc.column('device_id').doUpdateSet({ ...set, updated_at: sql`now()` }))
    .returning('credential_issued_at')
    .executeTakeFirstOrThrow();
  return { token, issuedAt: new Date(row.credential_issued_at!) };
}

/**
 * A credential counts only if it was issued after the device was last revoked: revoking voids
 * it, on every route and whichever node holds (or no node holds) the gateway's link, and a
 * re-approval issues a new one.
 */
const liveCredential = sql<boolean>`(${deviceRevokedAtSql(sql.ref('wifidogx_gateways.device_id'))} IS NULL
  OR wifidogx_gateways.credential_issued_at > ${deviceRevokedAtSql(sql.ref('wifidogx_gateways.device_id'))})`;

/** Whether the gateway holds a credential that still counts (issued, and not voided by a revocation since). */
export async function hasCredential(db: Db, deviceId: string): Promise<boolean> {
  const row = await db
    .selectFrom('wifidogx_gateways')
    .select('device_id')
    .where('device_id', '=', deviceId)
    .where('credential_hash', 'is not', null)
    .where(deviceExistsSql(sql.ref('wifidogx_gateways.device_id')))
    .where(liveCredential)
    .executeTakeFirst();
  return row !== undefined;
}

/** The gateway (device id and identifier) a presented credential was issued to, if any. */
export async function credentialOwner(
  db: Db,
  credential: string,
): Promise<{ deviceId: string; identifier: string } | undefined> {
  if (credential.length === 0 || credential.length > MAX_CREDENTIAL_LENGTH) return undefined;
  const row = await db
    .selectFrom('wifidogx_gateways')
    .select('device_id')
    .where('credential_hash', '=', hashCredential(credential))
    .where(liveCredential)
    .executeTakeFirst();
  const device = row && (await deviceById(db, row.device_id));
  return device ? { deviceId: device.id, identifier: device.identifier } : undefined;
}

export interface ClaimFacts {
  approval: DeviceApproval;
  /** The gateway has been issued a credential. */
  credentialIssued: boolean;
  /** The connection carried the gateway's own credential. */
  authenticated: boolean;
  policy: WifidogxAuthPolicy;
}

export type ClaimVerdict = { admit: true } | { admit: false; code: number; reason: string; audit: string };

/** WebSocket close codes of the WiFiDogX edge (docs/edges/wifidogx.md). */
export const CLOSE = {
  deviceIdRequired: 4000,
  credential: 4001,
  revoked: 4003,
  identifyTimeout: 4008,
  connectedElsewhere: 4009,
  otherProtocol: 4010,
  tooManyUnidentified: 1013,
} as const;

/** Whether a claim of a registered gateway is served (pending ones get nothing, as always). */
export function admitClaim(f: ClaimFacts): ClaimVerdict {
  if (f.approval === 'revoked') return { admit: false, code: CLOSE.revoked, reason: 'revoked', audit: 'revoked' };
  if (f.authenticated) return { admit: true };
  // A credential, once issued, is always required, whatever the policy.
  if (f.credentialIssued)
    return {
      admit: false,
      code: CLOSE.credential,
      reason: 'credential required: connect on WSServerPath /ws/wifidogx?credential=<issued credential>',
      audit: 'credential_required',
    };
  if (f.approval === 'approved' && f.policy === 'secure') {
    return {
      admit: false,
      code: CLOSE.credential,
      reason: 'credential required: an operator must issue this gateway a credential',
      audit: 'credential_not_issued',
    };
  }
  return { admit: true };
}
