/**
 * What the Main Server edge keeps beside the fleet: registration details and hashed device
 * tokens (`main_server_devices`), integer extension ids (`main_server_extensions`), and device
 * presence from heartbeats. Approval itself is the fleet's `devices.approval`.
 *
 * Tokens: the device gets a claim secret when it registers; once an operator approved it, the
 * device presents the claim and collects its device token (shown once, stored as sha256). An
 * operator may also rotate (new token shown once to the operator) or revoke.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { sql, type ColumnType, type Generated } from 'kysely';
import { audit, type Actor } from '../../audit.ts';
import type { Db } from '../../db/index.ts';
import type { Device } from '../../db/schema.ts';
import { inTransaction, Topics, type FleetContext } from '../../fleet/context.ts';
import { deviceById } from '../../fleet/devices.ts';

declare module '../../db/schema.ts' {
  interface Database {
    main_server_devices: MainServerDevicesTable;
    main_server_extensions: MainServerExtensionsTable;
  }
}

export interface MainServerDevicesTable {
  device_id: string;
  name: string | null;
  ip: string | null;
  token_hash: string | null;
  token_issued_at: ColumnType<Date, Date | string | null | undefined, Date | string | null> | null;
  claim_hash: string | null;
  registered_at: ColumnType<Date, Date | string | undefined, never>;
}

export interface MainServerExtensionsTable {
  id: Generated<number>;
  org_id: string;
  product_id: string;
  name: string;
  created_at: ColumnType<Date, Date | string | undefined, never>;
}

export const DEVICE_TOKEN_PREFIX = 'fhd_';
export const CLAIM_PREFIX = 'fhc_';

export function hashSecret(secret: string): string {
  return createHash('sha256').update(secret).digest('hex');
}

function newSecret(prefix: string): string {
  return prefix + randomBytes(32).toString('base64url');
}

function sameHash(a: string, b: string): boolean {
  const x = Buffer.from(a, 'hex');
  const y = Buffer.from(b, 'hex');
  return x.length === y.length && timingSafeEqual(x, y);
}

/** The approved Main Server device a bearer token belongs to, or undefined. */
export async function deviceForToken(db: Db, token: string): Promise<Device | undefined> {
  if (!token.startsWith(DEVICE_TOKEN_PREFIX) || token.length > 200) return undefined;
  const row = await db
    .selectFrom('main_server_devices')
    .select('device_id')
    .where('token_hash', '=', hashSecret(token))
    .executeTakeFirst();
  const device = row && (await deviceById(db, row.device_id));
  return device?.approval === 'approved' ? device : undefined;
}

export interface RegistrationDetails {
  name: string | null;
  ip: string | null;
}

/** Records (or refreshes) a device's registration details; a first registration gets a claim secret. */
export async function recordRegistration(
  db: Db,
  deviceId: string,
  details: RegistrationDetails,
): Promise<{ claim?: string }> {
  const existing = await db
    .selectFrom('main_server_devices')
    .select(['device_id', 'claim_hash', 'token_hash'])
    .where('device_id', '=', deviceId)
    .executeTakeFirst();
  if (existing) {
    // Fields a repeat registration leaves out keep their values.
    const set = {
      ...(details.name !== null ? { name: details.name } : {}),
      ...(details.ip !== null ? { ip: details.ip } : {}),
    };
    if (Object.keys(set).length)
      await db.updateTable('main_server_devices').set(set).where('device_id', '=', deviceId).execute();
    return {};
  }
  const claim = newSecret(CLAIM_PREFIX);
  const inserted = await db
    .insertInto('main_server_devices')
    .values({ device_id: deviceId, name: details.name, ip: details.ip, claim_hash: hashSecret(claim) })
    .onConflict((oc) => oc.column('device_id').doNothing())
    .returning('device_id')
    .executeTakeFirst();
  // A concurrent first registration won: that one holds the claim.
  return inserted ? { claim } : {};
}

export type ClaimCheck = 'valid' | 'invalid' | 'none';

/** Whether `claim` is the device's outstanding claim secret ('none': it has none left). */
export async function checkClaim(db: Db, deviceId: string, claim: string | undefined): Promise<ClaimCheck> {
  const row = await db
    .selectFrom('main_server_devices')
    .select('claim_hash')
    .where('device_id', '=', deviceId)
    .executeTakeFirst();
  if (!row?.claim_hash) return 'none';
  if (!claim) return 'invalid';
  return sameHash(row.claim_hash, hashSecret(claim)) ? 'valid' : 'invalid';
}

/**
 * Issues a new device token (the previous one stops working) and consumes the claim. Returns the
 * token: it is never stored, only its hash.
 */
export async function issueDeviceToken(
  ctx: FleetContext,
  actor: Actor,
  device: Pick<Device, 'id' | 'org_id' | 'identifier'>,
  reason: 'claimed' | 'rotated' | 'provisioned',
): Promise<string> {
  const token = newSecret(DEVICE_TOKEN_PREFIX);
  await inTransaction(ctx, async (trx, outbox) => {
    await trx
      .insertInto('main_server_devices')
      .values({ device_id: device.id, token_hash: hashSecret(token), token_issued_at: new Date(), claim_hash: null })
      .onConflict((oc) =>
        oc
          .column('device_id')
          .doUpdateSet({ token_hash: hashSecret(token), token_issued_at: sql`now()`, claim_hash: null }),
      )
      .execute();
    await audit(trx, actor, {
      orgId: device.org_id,
      action: `main_server.token_${reason}`,
      resourceType: 'device',
      resourceId: device.id,
      details: { identifier: device.identifier },
    });
    outbox.push({
      topic: Topics.operator(device.org_id),
      event: 'device_token_issued',
      payload: { device_id: device.id, reason },
    });
  });
  return token;
}

/** Removes a device's token and claim (revocation). */
export async function clearDeviceToken(db: Db, deviceId: string): Promise<void> {
  await db
    .updateTable('main_server_devices')
    .set({ token_hash: null, token_issued_at: null, claim_hash: null })
    .where('device_id', '=', deviceId)
    .execute();
}

export interface DeviceDetails {
  name: string | null;
  ip: string | null;
  token_issued_at: Date | null;
  has_token: boolean;
}

export async function deviceDetails(db: Db, deviceIds: string[]): Promise<Map<string, DeviceDetails>> {
  if (deviceIds.length === 0) return new Map();
  const rows = await db
    .selectFrom('main_server_devices')
    .select(['device_id', 'name', 'ip', 'token_issued_at', 'token_hash'])
    .where('device_id', 'in', deviceIds)
    .execute();
  return new Map(
    rows.map((r) => [
      r.device_id,
      { name: r.name, ip: r.ip, token_issued_at: r.token_issued_at, has_token: r.token_hash !== null },
    ]),
  );
}

// --- extensions ------------------------------------------------------------------------------

export interface Extension {
  id: number;
  name: string;
}

/** The integer ids of extension names in a product, creating missing ones. */
export async function ensureExtensions(
  db: Db,
  product: { org_id: string; id: string },
  names: string[],
): Promise<Map<string, number>> {
  const unique = [...new Set(names)];
  if (unique.length === 0) return new Map();
  await db
    .insertInto('main_server_extensions')
    .values(unique.map((name) => ({ org_id: product.org_id, product_id: product.id, name })))
    .onConflict((oc) => oc.columns(['product_id', 'name']).doNothing())
    .execute();
  const rows = await db
    .selectFrom('main_server_extensions')
    .select(['id', 'name'])
    .where('product_id', '=', product.id)
    .where('name', 'in', unique)
    .execute();
  return new Map(rows.map((r) => [r.name, r.id]));
}

export async function extensionById(db: Db, productId: string, id: number): Promise<Extension | undefined> {
  if (!Number.isSafeInteger(id) || id < 1 || id > 2 ** 31 - 1) return undefined;
  return db
    .selectFrom('main_server_extensions')
    .select(['id', 'name'])
    .where('product_id', '=', productId)
    .where('id', '=', id)
    .executeTakeFirst();
}

export async function listExtensions(db: Db, productId: string): Promise<Extension[]> {
  return db
    .selectFrom('main_server_extensions')
    .select(['id', 'name'])
    .where('product_id', '=', productId)
    .orderBy('id')
    .execute();
}
