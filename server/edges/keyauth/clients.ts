/**
 * Client keys of the keyauth edge: each RSA public key (named by the SHA-256 fingerprint of its
 * SPKI DER) is one fleet device of protocol `keyauth`, identifier `key-<first 16 hex digits>`.
 * Approval is the device's (`devices.approval`): operators approve or revoke by fingerprint.
 */
import type { ColumnType } from 'kysely';
import type { Actor } from '../../audit.ts';
import type { Db } from '../../db/index.ts';
import type { Device } from '../../db/schema.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { deviceById, listProductDevices } from '../../fleet/devices.ts';
import { approveDevice, findOrRegisterEdgeDevice, revokeDevice } from '../../fleet/edge-devices.ts';
import { FleetError } from '../../fleet/errors.ts';
import type { Product } from '../../fleet/orgs.ts';

declare module '../../db/schema.ts' {
  interface Database {
    keyauth_clients: KeyauthClientsTable;
  }
}

export interface KeyauthClientsTable {
  fingerprint: string;
  device_id: string;
  public_key_pem: string;
  name: string | null;
  remote_address: string | null;
  first_seen_at: ColumnType<Date, Date | string | undefined, never>;
  last_seen_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

export const PROTOCOL = 'keyauth' as const;

export interface KeyauthClient {
  fingerprint: string;
  device_id: string;
  identifier: string;
  name: string | null;
  approval: Device['approval'];
  status: Device['connection_status'];
  remote_address: string | null;
  first_seen_at: Date;
  last_seen_at: Date;
}

export function identifierFor(fingerprint: string): string {
  return `key-${fingerprint.slice(0, 16)}`;
}

/**
 * The device a client key stands for, recording an unknown key as a pending device (and its key).
 * Returns the device with its current approval.
 */
export async function clientDevice(
  fleet: FleetContext,
  product: Product,
  key: { fingerprint: string; pem: string },
  seen: { name: string | null; remote: string | null },
): Promise<Device> {
  const client = await fleet.db
    .selectFrom('keyauth_clients')
    .select('device_id')
    .where('fingerprint', '=', key.fingerprint)
    .executeTakeFirst();
  const known = client && (await deviceById(fleet.db, client.device_id));
  if (known) {
    await fleet.db
      .updateTable('keyauth_clients')
      .set({ last_seen_at: new Date(), remote_address: seen.remote })
      .where('fingerprint', '=', key.fingerprint)
      .execute();
    return known;
  }
  const { device } = await findOrRegisterEdgeDevice(fleet, {
    orgId: product.org_id,
    productId: product.id,
    identifier: identifierFor(key.fingerprint),
    protocol: PROTOCOL,
    approval: 'pending',
    description: seen.name,
  });
  await fleet.db
    .insertInto('keyauth_clients')
    .values({
      fingerprint: key.fingerprint,
      device_id: device.id,
      public_key_pem: key.pem,
      name: seen.name,
      remote_address: seen.remote,
    })
    .onConflict((oc) => oc.column('fingerprint').doNothing())
    .execute();
  return device;
}

/** Client keys of a product, newest first, optionally by approval. */
export async function listClients(db: Db, productId: string, approval?: Device['approval']): Promise<KeyauthClient[]> {
  const devices = await listProductDevices(db, productId, { protocol: PROTOCOL, ...(approval ? { approval } : {}) });
  if (devices.length === 0) return [];
  const byId = new Map(devices.map((d) => [d.id, d]));
  const clients = await db
    .selectFrom('keyauth_clients')
    .select(['fingerprint', 'device_id', 'name', 'remote_address', 'first_seen_at', 'last_seen_at'])
    .where('device_id', 'in', [...byId.keys()])
    .orderBy('first_seen_at', 'desc')
    .execute();
  return clients.map((c) => {
    const device = byId.get(c.device_id)!;
    return {
      fingerprint: c.fingerprint,
      device_id: c.device_id,
      identifier: device.identifier,
      name: c.name,
      approval: device.approval,
      status: device.connection_status,
      remote_address: c.remote_address,
      first_seen_at: c.first_seen_at,
      last_seen_at: c.last_seen_at,
    };
  });
}

/** The client whose fingerprint is `ref` or starts with it (at least 8 hex digits, unambiguous). */
export async function findClient(db: Db, productId: string, ref: string): Promise<KeyauthClient> {
  const prefix = ref
    .toLowerCase()
    .replace(/^sha256:/, '')
    .replace(/:/g, '');
  if (!/^[0-9a-f]{8,64}$/.test(prefix))
    throw new FleetError('invalid', 'name the key by its SHA-256 fingerprint (hex; at least the first 8 digits)', {
      field: 'fingerprint',
    });
  const rows = (await listClients(db, productId)).filter((c) => c.fingerprint.startsWith(prefix));
  if (rows.length === 0)
    throw new FleetError(
      'not_found',
      `no client key with fingerprint ${prefix}; list them with "fleethub keyauth list"`,
      { fingerprint: prefix },
    );
  if (rows.length > 1)
    throw new FleetError('conflict', `${rows.length} client keys start with ${prefix}; give more digits`, {
      fingerprint: prefix,
    });
  return rows[0]!;
}

async function clientDeviceOf(fleet: FleetContext, client: KeyauthClient): Promise<Device> {
  const device = await deviceById(fleet.db, client.device_id);
  if (!device)
    throw new FleetError('not_found', 'the device of this client key is gone', { fingerprint: client.fingerprint });
  return device;
}

export async function approveClient(
  fleet: FleetContext,
  actor: Actor,
  productId: string,
  ref: string,
): Promise<KeyauthClient> {
  const client = await findClient(fleet.db, productId, ref);
  const device = await clientDeviceOf(fleet, client);
  await approveDevice(fleet, actor, device.org_id, client.device_id);
  return findClient(fleet.db, productId, client.fingerprint);
}

/** Revokes a key: connected sessions of it are closed (the fleet publishes `device_revoked`). */
export async function revokeClient(
  fleet: FleetContext,
  actor: Actor,
  productId: string,
  ref: string,
): Promise<KeyauthClient> {
  const client = await findClient(fleet.db, productId, ref);
  const device = await clientDeviceOf(fleet, client);
  await revokeDevice(fleet, actor, device.org_id, client.device_id);
  return findClient(fleet.db, productId, client.fingerprint);
}
