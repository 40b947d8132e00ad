import { sql, type RawBuilder } from 'kysely';
import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { ConnectionStatus, Device, DeviceApproval, DeviceProtocol } from '../db/schema.ts';
import { groupTopic } from '../../shared/protocol.ts';
import { inTransaction, publishAll, Topics, type FleetContext } from './context.ts';
import { FleetError, isUniqueViolation, isUuid, NAME_PATTERN, notFound } from './errors.ts';
import { type Page, pageBounds } from './paging.ts';
import { getProduct } from './orgs.ts';

export interface CreateDeviceInput {
  orgId: string;
  productId: string;
  /** Serial number: the certificate CN for Phoenix devices; unique per product. */
  identifier: string;
  description?: string | null;
  tags?: string[];
  protocol?: DeviceProtocol;
  approval?: DeviceApproval;
}

export interface DeviceFilter {
  orgId: string;
  productId?: string;
  groupId?: string;
  /** Running firmware version (exact). */
  version?: string;
  status?: ConnectionStatus;
  /** approved | pending | revoked (edges register pending devices until an operator approves). */
  approval?: DeviceApproval;
  protocol?: DeviceProtocol;
  tag?: string;
  /** Substring of the identifier or description (case-insensitive). */
  q?: string;
  limit?: number;
  offset?: number;
}

const PROTOCOLS: readonly DeviceProtocol[] = ['phoenix', 'grisp', 'wifidogx', 'main-server', 'keyauth'];
const APPROVALS: readonly DeviceApproval[] = ['approved', 'pending', 'revoked'];

/** Pre-registers a device (its certificates are registered by identity/). */
export async function createDevice(ctx: FleetContext, actor: Actor, input: CreateDeviceInput): Promise<Device> {
  const identifier = validIdentifier(input.identifier);
  const product = await getProduct(ctx, input.orgId, input.productId);
  const tags = validTags(input.tags ?? []);
  const description = validDescription(input.description);
  if (input.protocol !== undefined && !PROTOCOLS.includes(input.protocol))
    throw new FleetError('invalid', `protocol must be one of ${PROTOCOLS.join(', ')}`, { field: 'protocol' });
  if (input.approval !== undefined && !APPROVALS.includes(input.approval))
    throw new FleetError('invalid', `approval must be one of ${APPROVALS.join(', ')}`, { field: 'approval' });
  try {
    return await inTransaction(ctx, async (trx) => {
      const device = await trx
        .insertInto('devices')
        .values({
          org_id: product.org_id,
          product_id: product.id,
          identifier,
          description,
          tags: JSON.stringify(tags),
          protocol: input.protocol,
          approval: input.approval,
        })
        .returningAll()
        .executeTakeFirstOrThrow();
      await audit(trx, actor, {
        orgId: device.org_id,
        action: 'device.create',
        resourceType: 'device',
        resourceId: device.id,
        details: { identifier, product: product.name },
      });
      return device;
    });
  } catch (err) {
    if (isUniqueViolation(err))
      throw new FleetError(
        'conflict',
        `a device with identifier ${JSON.stringify(identifier)} already exists in this product`,
        { field: 'identifier' },
      );
    throw err;
  }
}

/** Devices of an organization matching every given filter, newest first, with the total count. */
export async function listDevices(ctx: FleetContext, filter: DeviceFilter): Promise<Page<Device>> {
  const { limit, offset } = pageBounds(filter.limit, filter.offset);
  if (!isUuid(filter.orgId)) return { items: [], total: 0 };
  for (const key of ['productId', 'groupId'] as const) {
    if (filter[key] !== undefined && !isUuid(filter[key])) return { items: [], total: 0 };
  }
  let query = ctx.db.selectFrom('devices').where('devices.org_id', '=', filter.orgId);
  if (filter.productId) query = query.where('devices.product_id', '=', filter.productId);
  if (filter.groupId) {
    const groupId = filter.groupId;
    query = query.where((eb) =>
      eb.exists(
        eb
          .selectFrom('group_devices')
          .select('group_devices.device_id')
          .whereRef('group_devices.device_id', '=', 'devices.id')
          .where('group_devices.group_id', '=', groupId),
      ),
    );
  }
  if (filter.version) query = query.where('devices.firmware_version', '=', filter.version);
  if (filter.status) query = query.where('devices.connection_status', '=', filter.status);
  if (filter.approval) query = query.where('devices.approval', '=', filter.approval);
  if (filter.protocol) query = query.where('devices.protocol', '=', filter.protocol);
  if (filter.tag) query = query.where(sql<boolean>`devices.tags @> ${JSON.stringify([filter.tag])}::jsonb`);
  if (filter.q) {
    const pattern = `%${filter.q.replace(/[\\%_]/g, (c) => `\\${c}`)}%`;
    query = query.where((eb) =>
      eb.or([eb('devices.identifier', 'ilike', pattern), eb('devices.description', 'ilike', pattern)]),
    );
  }
  const [items, count] = await Promise.all([
    query
      .selectAll('devices')
      .orderBy('devices.created_at', 'desc')
      .orderBy('devices.id')
      .limit(limit)
      .offset(offset)
      .execute(),
    query.select((eb) => eb.fn.countAll<number>().as('n')).executeTakeFirstOrThrow(),
  ]);
  return { items, total: Number(count.n) };
}

/** One device of `orgId`. */
export async function getDevice(ctx: FleetContext, orgId: string, deviceId: string): Promise<Device> {
  const device = await findDevice(ctx.db, orgId, deviceId);
  if (!device) throw notFound('device', deviceId);
  return device;
}

export async function findDevice(db: Db, orgId: string, deviceId: string): Promise<Device | undefined> {
  if (!isUuid(orgId) || !isUuid(deviceId)) return undefined;
  return db.selectFrom('devices').selectAll().where('id', '=', deviceId).where('org_id', '=', orgId).executeTakeFirst();
}

/** Devices matched by a selector rather than named one by one (groups filled by pattern or tag). */
export interface DeviceSelector {
  orgId: string;
  productId: string;
  /** Glob over the identifier: `*` any run of characters, `?` one character; case-sensitive. */
  match?: string;
  tag?: string;
}

/** At most this many devices per selector, as for a list of devices named in one request. */
export const MAX_SELECTED_DEVICES = 10_000;

/** The ids of the devices a selector matches (both conditions when both are given), oldest first. */
export async function selectDeviceIds(ctx: FleetContext, selector: DeviceSelector): Promise<string[]> {
  if (!isUuid(selector.productId)) return [];
  let query = ctx.db
    .selectFrom('devices')
    .select('devices.id')
    .where('devices.org_id', '=', selector.orgId)
    .where('devices.product_id', '=', selector.productId);
  if (selector.match !== undefined) {
    const pattern = selector.match.replace(/[\\%_]/g, (c) => `\\${c}`).replace(/[*?]/g, (c) => (c === '*' ? '%' : '_'));
    query = query.where('devices.identifier', 'like', pattern);
  }
  if (selector.tag !== undefined)
    query = query.where(sql<boolean>`devices.tags @> ${JSON.stringify([selector.tag])}::jsonb`);
  const rows = await query
    .orderBy('devices.created_at')
    .orderBy('devices.id')
    .limit(MAX_SELECTED_DEVICES + 1)
    .execute();
  if (rows.length > MAX_SELECTED_DEVICES)
    throw new FleetError('invalid', `the selector matches more than ${MAX_SELECTED_DEVICES} devices; narrow it`, {
      field: selector.match !== undefined ? 'match' : 'tag',
    });
  return rows.map((r) => r.id);
}

/** A device by id in whatever org: for edges, whose own tables hold device ids. */
export async function deviceById(db: Db, deviceId: string): Promise<Device | undefined> {
  if (!isUuid(deviceId)) return undefined;
  return db.selectFrom('devices').selectAll().where('id', '=', deviceId).executeTakeFirst();
}

/** SQL: when the device `deviceId` names was last revoked (null: never), for edges' credential checks. */
export function deviceRevokedAtSql(deviceId: RawBuilder<unknown>): RawBuilder<Date | null> {
  return sql<Date | null>`(SELECT d.revoked_at FROM devices d WHERE d.id = ${deviceId})`;
}

/** SQL: the device `deviceId` names exists. */
export function deviceExistsSql(deviceId: RawBuilder<unknown>): RawBuilder<boolean> {
  return sql<boolean>`EXISTS (SELECT 1 FROM devices d WHERE d.id = ${deviceId})`;
}

/** Devices by id (edges pair their own rows with these), in no particular order. */
export async function devicesByIds(db: Db, deviceIds: readonly string[]): Promise<Device[]> {
  const ids = deviceIds.filter(isUuid);
  if (ids.length === 0) return [];
  return db.selectFrom('devices').selectAll().where('id', 'in', ids).execute();
}

export interface ProductDeviceFilter {
  protocol: DeviceProtocol;
  approval?: DeviceApproval;
  orderBy?: 'identifier' | 'created_at';
}

/** A product's devices of one protocol (an edge's devices), by identifier unless told otherwise. */
export async function listProductDevices(db: Db, productId: string, filter: ProductDeviceFilter): Promise<Device[]> {
  if (!isUuid(productId)) return [];
  let q = db
    .selectFrom('devices')
    .selectAll()
    .where('product_id', '=', productId)
    .where('protocol', '=', filter.protocol);
  if (filter.approval) q = q.where('approval', '=', filter.approval);
  return q.orderBy(filter.orderBy ?? 'identifier').execute();
}

/** A product's device of `protocol` by identifier, or by id too when `byId`. */
export async function findProductDevice(
  db: Db,
  productId: string,
  protocol: DeviceProtocol,
  ref: string,
  options: { byId?: boolean } = {},
): Promise<Device | undefined> {
  if (!isUuid(productId)) return undefined;
  return db
    .selectFrom('devices')
    .selectAll()
    .where('product_id', '=', productId)
    .where('protocol', '=', protocol)
    .where((eb) =>
      options.byId && isUuid(ref)
        ? eb.or([eb('id', '=', ref), eb('identifier', '=', ref)])
        : eb('identifier', '=', ref),
    )
    .executeTakeFirst();
}

/** Devices of a product that report running `component` and are not members of `groupId`. */
export async function componentDevicesOutsideGroup(
  db: Db,
  productId: string,
  component: string,
  groupId: string,
): Promise<string[]> {
  const rows = await db
    .selectFrom('device_components')
    .innerJoin('devices', 'devices.id', 'device_components.device_id')
    .select('devices.id')
    .where('devices.product_id', '=', productId)
    .where('device_components.component', '=', component)
    .where((eb) =>
      eb.not(
        eb.exists(
          eb
            .selectFrom('group_devices')
            .select('device_id')
            .whereRef('group_devices.device_id', '=', 'devices.id')
            .where('group_devices.group_id', '=', groupId),
        ),
      ),
    )
    .execute();
  return rows.map((r) => r.id);
}

/** Changes a device's description and/or tags. */
export async function updateDevice(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  deviceId: string,
  patch: { description?: string | null; tags?: string[] },
): Promise<Device> {
  const device = await getDevice(ctx, orgId, deviceId);
  const set: { description?: string | null; tags?: string; updated_at: Date } = { updated_at: new Date() };
  if (patch.description !== undefined) set.description = validDescription(patch.description);
  if (patch.tags !== undefined) set.tags = JSON.stringify(validTags(patch.tags));
  return inTransaction(ctx, async (trx) => {
    const updated = await trx
      .updateTable('devices')
      .set(set)
      .where('id', '=', device.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId,
      action: 'device.update',
      resourceType: 'device',
      resourceId: device.id,
      details: {
        ...(patch.description !== undefined ? { description: set.description } : {}),
        ...(patch.tags !== undefined ? { tags: patch.tags } : {}),
      },
    });
    return updated;
  });
}

/** Deletes a device with its certificates, memberships and update history; a connected device is told `deleted` (its channel stops). */
export async function deleteDevice(ctx: FleetContext, actor: Actor, orgId: string, deviceId: string): Promise<void> {
  const device = await getDevice(ctx, orgId, deviceId);
  await inTransaction(ctx, async (trx, outbox) => {
    await trx.deleteFrom('devices').where('id', '=', device.id).execute();
    await audit(trx, actor, {
      orgId,
      action: 'device.delete',
      resourceType: 'device',
      resourceId: device.id,
      details: { identifier: device.identifier },
    });
    // One publication: every subscriber of the device's topic closes what it holds (device-link.ts `linkNotice`).
    outbox.push({ topic: Topics.device(device.id), event: 'device_deleted', payload: { device_id: device.id } });
  });
}

/**
 * Announces a certificate revocation that has committed: the device's channels and links that
 * this certificate authenticated stop, and every node's listener closes its connections.
 */
export async function publishCertificateRevoked(
  ctx: FleetContext,
  deviceId: string,
  certificateId: string,
): Promise<void> {
  const payload = { device_id: deviceId, certificate_id: certificateId };
  await publishAll(ctx, [{ topic: Topics.device(deviceId), event: 'certificate_revoked', payload }]);
}

/**
 * SQL for the `[org, product, group]` names of `deviceId`'s groups as a JSON array sorted by
 * group name: a scalar subquery, so a statement can return it beside other columns
 * (`groupTopicsOf` turns it into topics).
 */
export function deviceGroupNamesSql(deviceId: RawBuilder<unknown>): RawBuilder<[string, string, string][]> {
  return sql<[string, string, string][]>`(
    SELECT coalesce(json_agg(json_build_array(o.name, p.name, g.name) ORDER BY g.name), '[]')
    FROM group_devices gd JOIN groups g ON g.id = gd.group_id JOIN products p ON p.id = g.product_id JOIN orgs o ON o.id = g.org_id
    WHERE gd.device_id = ${deviceId})`;
}

/**
 * SQL: `certificateId` is a certificate of `deviceId`, not revoked, and within its validity now:
 * what every join checks of the certificate that authenticated the connection.
 */
export function certificateUsableSql(certificateId: string, deviceId: RawBuilder<unknown>): RawBuilder<boolean> {
  return sql<boolean>`EXISTS (
    SELECT 1 FROM device_certificates c
    WHERE c.id = ${certificateId} AND c.device_id = ${deviceId} AND c.revoked_at IS NULL AND c.not_before <= now() AND c.not_after > now())`;
}

/** Group topics (`group:<org>:<product>:<group>`) from `deviceGroupNamesSql`'s names. */
export function groupTopicsOf(names: [string, string, string][]): string[] {
  return names.map(([org, product, group]) => groupTopic(org, product, group));
}

/** The group topics (`group:<org>:<product>:<group>`) of a device, sorted. */
export async function deviceGroupTopics(db: Db, deviceId: string): Promise<string[]> {
  const { rows } = await sql<{
    names: [string, string, string][];
  }>`SELECT ${deviceGroupNamesSql(sql`${deviceId}::uuid`)} AS names`.execute(db);
  return groupTopicsOf(rows[0]?.names ?? []);
}

/**
 * What a link attaching to a device needs, in one statement: its group topics, and whether it may
 * still be connected (it exists, is not revoked, and `certificateId`, when given, is usable). A
 * link subscribes to the device's topic first and reads this after, so a revocation is either
 * seen here or delivered to the subscription.
 */
export async function deviceLinkState(
  db: Db,
  deviceId: string,
  certificateId?: string,
): Promise<{ groups: string[]; usable: boolean }> {
  const certificate = certificateId ? sql`AND ${certificateUsableSql(certificateId, sql.ref('d.id'))}` : sql``;
  const { rows } = await sql<{ names: [string, string, string][]; usable: boolean }>`
    SELECT ${deviceGroupNamesSql(sql.ref('d.id'))} AS names, (d.approval <> 'revoked' ${certificate}) AS usable
    FROM devices d WHERE d.id = ${deviceId}`.execute(db);
  const row = rows[0];
  return { groups: groupTopicsOf(row?.names ?? []), usable: row?.usable ?? false };
}

function validIdentifier(value: unknown): string {
  // Identifiers come from certificate CNs and other protocols' serials: printable, bounded.
  if (typeof value !== 'string' || value.length < 1 || value.length > 200 || /[\u0000-\u001f\u007f]/.test(value)) {
    throw new FleetError('invalid', 'identifier must be 1-200 printable characters', { field: 'identifier' });
  }
  return value;
}

function validTags(tags: unknown): string[] {
  if (!Array.isArray(tags) || tags.length > 50 || !tags.every((t) => typeof t === 'string' && NAME_PATTERN.test(t))) {
    throw new FleetError('invalid', "tags must be a list of at most 50 names (letters, digits, '_', '.', '-')", {
      field: 'tags',
    });
  }
  return [...new Set(tags as string[])];
}

function validDescription(value: unknown): string | null {
  if (value === undefined || value === null) return null;
  if (typeof value !== 'string' || value.length > 1000)
    throw new FleetError('invalid', 'description must be a string of at most 1000 characters', {
      field: 'description',
    });
  return value;
}
