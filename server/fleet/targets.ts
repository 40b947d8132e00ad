import { sql, type Selectable } from 'kysely';
import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { Firmware, TargetsTable } from '../db/schema.ts';
import { inTransaction, Topics, type FleetContext, type FleetEvent } from './context.ts';
import {
  activeTargetDeployment,
  closeTargetDeployment,
  openTargetDeployment,
  supersedeTargetDeployment,
} from './deployments/target.ts';
import { getDevice } from './devices.ts';
import { FleetError, isUuid } from './errors.ts';
import { getFirmware } from './firmware.ts';
import { getGroup } from './groups.ts';
import { reconcileAttempts, resolveTargets, runsComponentSql, variantSql, type CreatedAttempt } from './reconcile.ts';
import { firmwareUpdatePayload, pushCreatedAttempts } from './updates.ts';

export type Target = Selectable<TargetsTable>;

export interface ResolvedTarget {
  firmware: Firmware;
  /** `device` when a device-level target applies, else the winning group. */
  source: { type: 'device' } | { type: 'group'; groupId: string };
}

/**
 * The firmware a device should run for `component`: the variant of its target's release that its
 * protocol installs (undefined when no target applies to it).
 * Rule: a device-level target overrides group targets; if the device's groups target different
 * firmware, the group with the lowest `priority` wins, ties → the most recently set target.
 * Devices not approved resolve nothing.
 */
export async function resolveTarget(
  db: Db,
  deviceId: string,
  component = 'firmware',
): Promise<ResolvedTarget | undefined> {
  if (!isUuid(deviceId)) return undefined;
  const [row] = await resolveTargets(db, { ids: [deviceId] }, component);
  if (!row?.target_id) return undefined;
  const firmware = await db
    .selectFrom('firmware')
    .selectAll()
    .where('id', '=', row.target_id)
    .executeTakeFirstOrThrow();
  const source =
    row.via === 'device'
      ? { type: 'device' as const }
      : { type: 'group' as const, groupId: row.via!.slice('group:'.length) };
  return { firmware, source };
}

export interface TargetChange {
  target: Target;
  /** Attempts created (sent to online devices, queued for offline ones). */
  attempts: { sent: number; queued: number };
  /** How online devices were told: one group broadcast, or one push per device. */
  delivery: 'group' | 'devices' | 'none';
  /**
   * A group target: the deployment (kind `target`) that tracks the members told, per device
   * (docs/deployments.md). A device target has none (null).
   */
  deployment_id: string | null;
  /** A group target: members that already run the release (not in the deployment). */
  already_running?: number;
}

/** The firmware a group or device may target: of the same product, with its image uploaded. */
async function targetableFirmware(
  ctx: FleetContext,
  orgId: string,
  firmwareId: string,
  kind: 'group' | 'device',
  owner: { id: string; product_id: string },
) {
  const firmware = await getFirmware(ctx, orgId, firmwareId);
  if (firmware.product_id !== owner.product_id)
    throw new FleetError('invalid', `the firmware belongs to another product than the ${kind}`, {
      firmware_id: firmware.id,
      [`${kind}_id`]: owner.id,
    });
  if (!firmware.has_blob)
    throw new FleetError(
      'invalid',
      `firmware ${firmware.version} has no uploaded image; upload it before targeting it`,
      { firmware_id: firmware.id },
    );
  return firmware;
}

/**
 * A device-level target must concern its device: the device runs the component, and the release
 * has a variant its protocol installs (formats.ts). Otherwise `invalid`, naming what is missing.
 */
async function assertInstallable(
  db: Db,
  device: { id: string; identifier: string; protocol: string },
  firmware: Firmware,
): Promise<void> {
  const { rows } = await sql<{ runs_component: boolean; variant: string | null; formats: string }>`
    SELECT ${runsComponentSql('d', firmware.component)} AS runs_component,
           (${variantSql('d', 'tf')}) AS variant,
           array_to_string(ARRAY(SELECT f.format FROM firmware f
                 WHERE f.product_id = tf.product_id AND f.component = tf.component AND f.version = tf.version AND f.has_blob
                 ORDER BY f.format), ', ') AS formats
    FROM devices d, firmware tf
    WHERE d.id = ${device.id} AND tf.id = ${firmware.id}`.execute(db);
  const row = rows[0];
  if (!row) throw new FleetError('not_found', 'the device or the firmware is gone', { device_id: device.id });
  if (!row.runs_component)
    throw new FleetError(
      'invalid',
      `device ${device.identifier} does not run component ${firmware.component}; a target for it would never apply`,
      { device_id: device.id, component: firmware.component },
    );
  if (!row.variant)
    throw new FleetError(
      'invalid',
      `${firmware.component} ${firmware.version} has no variant a ${device.protocol} device installs (it has: ${row.formats}); upload the package for ${device.protocol} under the same version`,
      {
        device_id: device.id,
        protocol: device.protocol,
        formats: row.formats ? row.formats.split(', ') : [],
        firmware_id: firmware.id,
      },
    );
}

/**
 * Sets a group's target firmware (its component comes from the firmware record). Members not
 * running it get an attempt (open attempts for other firmware are cancelled), and online ones are
 * told with ONE `firmware_update` on the group topic — unless some online member resolves another
 * target (a device target or a group with lower priority), in which case each device whose
 * target this is gets its own push instead. Setting the same target again retries failed devices.
 * The members told are the rows of a new one-stage deployment (kind `target`) that the
 * orchestrator tracks; it supersedes the group's previous one for the component (devices still
 * on an open attempt to the same release move over, the others in flight are cancelled there).
 */
export async function setGroupTarget(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  groupId: string,
  firmwareId: string,
): Promise<TargetChange> {
  const group = await getGroup(ctx, orgId, groupId);
  const firmware = await targetableFirmware(ctx, orgId, firmwareId, 'group', group);
  return inTransaction(ctx, async (trx, outbox) => {
    const target = await upsertTarget(trx, { org_id: orgId, group_id: group.id, firmware, actor });
    // Before reconcile moves the attempts: what its finished devices reached is recorded first.
    const previous = await activeTargetDeployment(trx, group.id, firmware.component);
    await audit(trx, actor, {
      orgId,
      action: 'target.set',
      resourceType: 'group',
      resourceId: group.id,
      details: { firmware_id: firmware.id, version: firmware.version, component: firmware.component },
    });
    const opened = await openTargetDeployment(trx, actor, { group, firmware, previous });
    // One pass resolves the members, moves their attempts, says how online ones are told and
    // records those told as the rows of the target deployment.
    const { created, broadcast, tracked } = await reconcileAttempts(trx, { groupId: group.id }, firmware.component, {
      broadcastRelease: firmware.id,
      track: opened.track,
    });
    const toPush = created.filter((a) => a.state === 'sent');
    let delivery: TargetChange['delivery'] = 'none';
    if (toPush.length > 0 || broadcast?.needed) {
      const variant = broadcast?.variant;
      if (variant) {
        const image =
          variant === firmware.id
            ? firmware
            : await trx.selectFrom('firmware').selectAll().where('id', '=', variant).executeTakeFirstOrThrow();
        outbox.push({
          topic: group.topic,
          event: 'firmware_update',
          payload: { ...firmwareUpdatePayload(ctx, image) },
        });
        delivery = 'group';
      } else {
        await pushCreatedAttempts(ctx, trx, outbox, toPush);
        delivery = toPush.length ? 'devices' : 'none';
      }
    }
    const attempts = { sent: toPush.length, queued: created.length - toPush.length };
    const alreadyRunning = tracked?.already_running ?? 0;
    const deployment = await closeTargetDeployment(trx, outbox, actor, {
      deployment: opened.deployment,
      ended: opened.ended,
      group,
      firmware,
      created: tracked?.devices ?? 0,
      alreadyRunning,
    });
    targetChanged(
      outbox,
      {
        org_id: orgId,
        product_id: group.product_id,
        group_id: group.id,
        component: firmware.component,
        firmware_id: firmware.id,
      },
      attempts,
    );
    return { target, attempts, delivery, deployment_id: deployment.id, already_running: alreadyRunning };
  });
}

/**
 * Removes a group's target for `component`; members re-resolve (attempts for it are cancelled),
 * and the group's target deployment for it is superseded.
 */
export async function clearGroupTarget(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  groupId: string,
  component = 'firmware',
): Promise<void> {
  const group = await getGroup(ctx, orgId, groupId);
  await inTransaction(ctx, async (trx, outbox) => {
    const deleted = await trx
      .deleteFrom('targets')
      .where('group_id', '=', group.id)
      .where('component', '=', component)
      .returning('id')
      .executeTakeFirst();
    if (!deleted)
      throw new FleetError('not_found', `group ${group.name} has no ${component} target`, {
        group_id: group.id,
        component,
      });
    const previous = await activeTargetDeployment(trx, group.id, component);
    await audit(trx, actor, {
      orgId,
      action: 'target.clear',
      resourceType: 'group',
      resourceId: group.id,
      details: { component },
    });
    const { created } = await reconcileAttempts(trx, { groupId: group.id }, component);
    await pushCreatedAttempts(ctx, trx, outbox, created);
    if (previous) await supersedeTargetDeployment(trx, outbox, actor, previous);
    targetChanged(
      outbox,
      { org_id: orgId, product_id: group.product_id, group_id: group.id, component, firmware_id: null },
      countAttempts(created),
    );
  });
}

/** Sets a device-level target (overrides its groups); the device is told on its own topic. */
export async function setDeviceTarget(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  deviceId: string,
  firmwareId: string,
): Promise<TargetChange> {
  const device = await getDevice(ctx, orgId, deviceId);
  const firmware = await targetableFirmware(ctx, orgId, firmwareId, 'device', device);
  await assertInstallable(ctx.db, device, firmware);
  return inTransaction(ctx, async (trx, outbox) => {
    const target = await upsertTarget(trx, { org_id: orgId, device_id: device.id, firmware, actor });
    await audit(trx, actor, {
      orgId,
      action: 'target.set',
      resourceType: 'device',
      resourceId: device.id,
      details: { firmware_id: firmware.id, version: firmware.version, component: firmware.component },
    });
    const { created } = await reconcileAttempts(trx, { ids: [device.id] }, firmware.component);
    await pushCreatedAttempts(ctx, trx, outbox, created);
    const attempts = countAttempts(created);
    targetChanged(
      outbox,
      {
        org_id: orgId,
        product_id: device.product_id,
        device_id: device.id,
        component: firmware.component,
        firmware_id: firmware.id,
      },
      attempts,
    );
    return { target, attempts, delivery: attempts.sent ? 'devices' : 'none', deployment_id: null };
  });
}

/** Removes a device-level target; the device falls back to its groups' targets. */
export async function clearDeviceTarget(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  deviceId: string,
  component = 'firmware',
): Promise<void> {
  const device = await getDevice(ctx, orgId, deviceId);
  await inTransaction(ctx, async (trx, outbox) => {
    const deleted = await trx
      .deleteFrom('targets')
      .where('device_id', '=', device.id)
      .where('component', '=', component)
      .returning('id')
      .executeTakeFirst();
    if (!deleted)
      throw new FleetError('not_found', `device ${device.identifier} has no ${component} target of its own`, {
        device_id: device.id,
        component,
      });
    await audit(trx, actor, {
      orgId,
      action: 'target.clear',
      resourceType: 'device',
      resourceId: device.id,
      details: { component },
    });
    const { created } = await reconcileAttempts(trx, { ids: [device.id] }, component);
    await pushCreatedAttempts(ctx, trx, outbox, created);
    targetChanged(
      outbox,
      { org_id: orgId, product_id: device.product_id, device_id: device.id, component, firmware_id: null },
      countAttempts(created),
    );
  });
}

/** Targets of an organization, optionally one group's or one device's. */
export async function listTargets(
  ctx: FleetContext,
  orgId: string,
  filter: { groupId?: string; deviceId?: string } = {},
): Promise<Target[]> {
  if (!isUuid(orgId) || (filter.groupId && !isUuid(filter.groupId)) || (filter.deviceId && !isUuid(filter.deviceId)))
    return [];
  let query = ctx.db.selectFrom('targets').selectAll().where('org_id', '=', orgId);
  if (filter.groupId) query = query.where('group_id', '=', filter.groupId);
  if (filter.deviceId) query = query.where('device_id', '=', filter.deviceId);
  return query.orderBy('set_at', 'desc').execute();
}

async function upsertTarget(
  trx: Db,
  t: { org_id: string; group_id?: string; device_id?: string; firmware: Firmware; actor: Actor },
): Promise<Target> {
  const scope = t.group_id ? ('group_id' as const) : ('device_id' as const);
  const scopeId = (t.group_id ?? t.device_id)!;
  const setBy = `${t.actor.type}:${t.actor.id ?? ''}`;
  const now = sql<Date>`now()`;
  const existing = await trx
    .selectFrom('targets')
    .select('id')
    .where(scope, '=', scopeId)
    .where('component', '=', t.firmware.component)
    .forUpdate()
    .executeTakeFirst();
  if (existing) {
    return trx
      .updateTable('targets')
      .set({ firmware_id: t.firmware.id, set_by: setBy, set_at: now })
      .where('id', '=', existing.id)
      .returningAll()
      .executeTakeFirstOrThrow();
  }
  return trx
    .insertInto('targets')
    .values({
      org_id: t.org_id,
      group_id: t.group_id ?? null,
      device_id: t.device_id ?? null,
      component: t.firmware.component,
      firmware_id: t.firmware.id,
      set_by: setBy,
      set_at: now,
    })
    .returningAll()
    .executeTakeFirstOrThrow();
}

function countAttempts(created: CreatedAttempt[]): { sent: number; queued: number } {
  const sent = created.filter((a) => a.state === 'sent').length;
  return { sent, queued: created.length - sent };
}

function targetChanged(
  outbox: FleetEvent[],
  change: {
    org_id: string;
    product_id: string;
    group_id?: string;
    device_id?: string;
    component: string;
    firmware_id: string | null;
  },
  attempts: { sent: number; queued: number },
): void {
  outbox.push({ topic: Topics.operator(change.org_id), event: 'target_changed', payload: { ...change, attempts } });
}
