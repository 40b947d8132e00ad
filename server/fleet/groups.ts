import { sql } from 'kysely';
import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { Device, Group } from '../db/schema.ts';
import { groupTopic } from '../../shared/protocol.ts';
import { inTransaction, Topics, type FleetContext, type FleetEvent } from './context.ts';
import { certificateUsableSql, listDevices } from './devices.ts';
import { FleetError, isUniqueViolation, isUuid, notFound, validName } from './errors.ts';
import { getProduct } from './orgs.ts';
import type { Page } from './paging.ts';
import { reconcileAttempts } from './reconcile.ts';
import { pushCreatedAttempts } from './updates.ts';

export type GroupWithCount = Group & { device_count: number; topic: string };

export interface CreateGroupInput {
  orgId: string;
  productId: string;
  name: string;
  description?: string | null;
  /** Lower wins when a device's groups target different firmware (default 100). */
  priority?: number;
}

/** Creates a group in a product; `conflict` when the name is taken in that product. */
export async function createGroup(ctx: FleetContext, actor: Actor, input: CreateGroupInput): Promise<Group> {
  const name = validName('group', input.name);
  const priority = validPriority(input.priority ?? 100);
  const product = await getProduct(ctx, input.orgId, input.productId);
  try {
    return await inTransaction(ctx, async (trx) => {
      const group = await trx
        .insertInto('groups')
        .values({
          org_id: product.org_id,
          product_id: product.id,
          name,
          description: input.description ?? null,
          priority,
        })
        .returningAll()
        .executeTakeFirstOrThrow();
      await audit(trx, actor, {
        orgId: group.org_id,
        action: 'group.create',
        resourceType: 'group',
        resourceId: group.id,
        details: { name, product: product.name, priority },
      });
      return group;
    });
  } catch (err) {
    if (isUniqueViolation(err))
      throw new FleetError('conflict', `group ${JSON.stringify(name)} already exists in product ${product.name}`, {
        field: 'name',
      });
    throw err;
  }
}

/** Groups of an organization (optionally one product), with member counts and their channel topic. */
export async function listGroups(
  ctx: FleetContext,
  orgId: string,
  filter: { productId?: string } = {},
): Promise<GroupWithCount[]> {
  if (!isUuid(orgId) || (filter.productId && !isUuid(filter.productId))) return [];
  let query = groupQuery(ctx.db).where('groups.org_id', '=', orgId);
  if (filter.productId) query = query.where('groups.product_id', '=', filter.productId);
  const rows = await query.orderBy('groups.name').execute();
  return rows.map(withTopic);
}

/** One group of `orgId` by id, with its member count and channel topic. */
export async function getGroup(ctx: FleetContext, orgId: string, groupId: string): Promise<GroupWithCount> {
  const group = await findGroup(ctx.db, orgId, groupId);
  if (!group) throw notFound('group', groupId);
  return group;
}

export async function findGroup(db: Db, orgId: string, groupId: string): Promise<GroupWithCount | undefined> {
  if (!isUuid(orgId) || !isUuid(groupId)) return undefined;
  const row = await groupQuery(db)
    .where('groups.org_id', '=', orgId)
    .where('groups.id', '=', groupId)
    .executeTakeFirst();
  return row && withTopic(row);
}

/** Changes a group's description or priority (a priority change can change resolved targets). */
export async function updateGroup(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  groupId: string,
  patch: { description?: string | null; priority?: number },
): Promise<Group> {
  const group = await getGroup(ctx, orgId, groupId);
  const priority = patch.priority === undefined ? undefined : validPriority(patch.priority);
  return inTransaction(ctx, async (trx, outbox) => {
    const updated = await trx
      .updateTable('groups')
      .set({
        ...(patch.description !== undefined ? { description: patch.description } : {}),
        ...(priority !== undefined ? { priority } : {}),
      })
      .where('id', '=', group.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId,
      action: 'group.update',
      resourceType: 'group',
      resourceId: group.id,
      details: { ...patch },
    });
    if (priority !== undefined && priority !== group.priority)
      await reconcileAndPush(ctx, trx, outbox, { groupId: group.id });
    return updated;
  });
}

/**
 * Deletes a group: online members get `leave {channel}` on their device topic, then the group
 * topic gets `group_deleted` (group channels stop on it); members' targets are re-resolved.
 */
export async function deleteGroup(ctx: FleetContext, actor: Actor, orgId: string, groupId: string): Promise<void> {
  const group = await getGroup(ctx, orgId, groupId);
  await inTransaction(ctx, async (trx, outbox) => {
    const members = await trx
      .selectFrom('group_devices')
      .innerJoin('devices', 'devices.id', 'group_devices.device_id')
      .select(['devices.id', 'devices.connection_status'])
      .where('group_id', '=', group.id)
      .execute();
    await trx.deleteFrom('groups').where('id', '=', group.id).execute();
    await audit(trx, actor, {
      orgId,
      action: 'group.delete',
      resourceType: 'group',
      resourceId: group.id,
      details: { name: group.name, members: members.length },
    });
    for (const m of members)
      if (m.connection_status === 'online')
        outbox.push({ topic: Topics.device(m.id), event: 'leave', payload: { channel: group.topic } });
    outbox.push({ topic: group.topic, event: 'group_deleted', payload: {} });
    outbox.push({ topic: Topics.operator(orgId), event: 'group_deleted', payload: { group_id: group.id } });
    await reconcileAndPush(ctx, trx, outbox, { ids: members.map((m) => m.id) });
  });
}

/** Adds devices (same product as the group) to a group; online newcomers get `join {channel}`. Returns the ids actually added. */
export async function addDevicesToGroup(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  groupId: string,
  deviceIds: string[],
): Promise<{ added: string[] }> {
  const group = await getGroup(ctx, orgId, groupId);
  const ids = validIds(deviceIds);
  return inTransaction(ctx, async (trx, outbox) => {
    const devices = await trx
      .selectFrom('devices')
      .select(['id', 'product_id', 'connection_status'])
      .where('org_id', '=', orgId)
      .where('id', 'in', ids.length ? ids : [NO_ID])
      .execute();
    const missing = ids.filter((id) => !devices.some((d) => d.id === id));
    if (missing.length)
      throw new FleetError('not_found', `${missing.length} device(s) do not exist in this organization`, {
        device_ids: missing.slice(0, 20),
      });
    const foreign = devices.filter((d) => d.product_id !== group.product_id).map((d) => d.id);
    if (foreign.length)
      throw new FleetError('invalid', 'devices can only join groups of their own product', {
        device_ids: foreign.slice(0, 20),
      });
    const added = ids.length
      ? await trx
          .insertInto('group_devices')
          .values(ids.map((id) => ({ group_id: group.id, device_id: id })))
          .onConflict((oc) => oc.doNothing())
          .returning('device_id')
          .execute()
      : [];
    const addedIds = added.map((r) => r.device_id);
    await audit(trx, actor, {
      orgId,
      action: 'group.add_devices',
      resourceType: 'group',
      resourceId: group.id,
      details: { device_ids: addedIds.slice(0, 100), count: addedIds.length },
    });
    const online = new Set(devices.filter((d) => d.connection_status === 'online').map((d) => d.id));
    for (const id of addedIds)
      if (online.has(id)) outbox.push({ topic: Topics.device(id), event: 'join', payload: { channel: group.topic } });
    if (addedIds.length) await reconcileAndPush(ctx, trx, outbox, { ids: addedIds });
    return { added: addedIds };
  });
}

/** Removes devices from a group; online leavers get `leave {channel}`. Returns the ids actually removed. */
export async function removeDevicesFromGroup(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  groupId: string,
  deviceIds: string[],
): Promise<{ removed: string[] }> {
  const group = await getGroup(ctx, orgId, groupId);
  const ids = validIds(deviceIds);
  return inTransaction(ctx, async (trx, outbox) => {
    const removed = ids.length
      ? await trx
          .deleteFrom('group_devices')
          .where('group_id', '=', group.id)
          .where('device_id', 'in', ids)
          .returning('device_id')
          .execute()
      : [];
    const removedIds = removed.map((r) => r.device_id);
    await audit(trx, actor, {
      orgId,
      action: 'group.remove_devices',
      resourceType: 'group',
      resourceId: group.id,
      details: { device_ids: removedIds.slice(0, 100), count: removedIds.length },
    });
    if (removedIds.length) {
      const online = await trx
        .selectFrom('devices')
        .select('id')
        .where('id', 'in', removedIds)
        .where('connection_status', '=', 'online')
        .execute();
      for (const d of online)
        outbox.push({ topic: Topics.device(d.id), event: 'leave', payload: { channel: group.topic } });
      await reconcileAndPush(ctx, trx, outbox, { ids: removedIds });
    }
    return { removed: removedIds };
  });
}

/** Members of a group, newest first. */
export async function listGroupMembers(
  ctx: FleetContext,
  orgId: string,
  groupId: string,
  page: { limit?: number; offset?: number } = {},
): Promise<Page<Device>> {
  const group = await getGroup(ctx, orgId, groupId);
  return listDevices(ctx, { orgId, groupId: group.id, ...page });
}

/**
 * Whether a device belongs to the group named by org, product and group names (the group
 * channel's authorization). With the connection's `certificateId`, also that the device is
 * approved and the certificate neither revoked nor outside its validity (one statement: the
 * check runs on every group join).
 */
export async function isGroupMember(
  db: Db,
  deviceId: string,
  names: { org: string; product: string; group: string },
  certificateId?: string,
): Promise<boolean> {
  let query = db
    .selectFrom('group_devices')
    .innerJoin('groups', 'groups.id', 'group_devices.group_id')
    .innerJoin('products', 'products.id', 'groups.product_id')
    .innerJoin('orgs', 'orgs.id', 'groups.org_id')
    .innerJoin('devices', 'devices.id', 'group_devices.device_id')
    .select('group_devices.group_id')
    .where('group_devices.device_id', '=', deviceId)
    .where('orgs.name', '=', names.org)
    .where('products.name', '=', names.product)
    .where('groups.name', '=', names.group)
    .whereRef('devices.org_id', '=', 'groups.org_id')
    .whereRef('devices.product_id', '=', 'groups.product_id');
  if (certificateId) {
    query = query
      .where('devices.approval', '=', 'approved')
      .where(certificateUsableSql(certificateId, sql.ref('devices.id')));
  }
  const row = await query.executeTakeFirst();
  return row !== undefined;
}

const NO_ID = '00000000-0000-0000-0000-000000000000';

async function reconcileAndPush(
  ctx: FleetContext,
  trx: Db,
  outbox: FleetEvent[],
  set: { ids: string[] } | { groupId: string },
): Promise<void> {
  if ('ids' in set && set.ids.length === 0) return;
  // Membership and priority decide targets for every component a device may have.
  const components = await trx.selectFrom('targets').select('component').distinct().execute();
  for (const { component } of components) {
    const result = await reconcileAttempts(trx, set, component);
    await pushCreatedAttempts(ctx, trx, outbox, result.created);
  }
}

function groupQuery(db: Db) {
  return db
    .selectFrom('groups')
    .innerJoin('orgs', 'orgs.id', 'groups.org_id')
    .innerJoin('products', 'products.id', 'groups.product_id')
    .selectAll('groups')
    .select(['orgs.name as org_name', 'products.name as product_name'])
    .select((eb) =>
      eb
        .selectFrom('group_devices')
        .select((e) => e.fn.countAll<number>().as('n'))
        .whereRef('group_devices.group_id', '=', 'groups.id')
        .as('device_count'),
    );
}

function withTopic<T extends Group & { org_name: string; product_name: string; device_count: number | null }>(
  row: T,
): GroupWithCount {
  const { org_name, product_name, ...group } = row;
  return { ...group, device_count: Number(row.device_count ?? 0), topic: groupTopic(org_name, product_name, row.name) };
}

function validPriority(value: unknown): number {
  if (!Number.isInteger(value) || (value as number) < 0 || (value as number) > 1_000_000)
    throw new FleetError('invalid', 'priority must be an integer from 0 to 1000000 (lower wins)', {
      field: 'priority',
    });
  return value as number;
}

function validIds(ids: unknown): string[] {
  if (!Array.isArray(ids) || ids.length > 20_000 || !ids.every(isUuid))
    throw new FleetError('invalid', 'device_ids must be a list of at most 20000 device UUIDs', { field: 'device_ids' });
  return [...new Set((ids as string[]).map((id) => id.toLowerCase()))];
}
