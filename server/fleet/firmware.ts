import { audit, type Actor } from '../audit.ts';
import type { Firmware } from '../db/schema.ts';
import { inTransaction, type FleetContext } from './context.ts';
import { FleetError, isUniqueViolation, isUuid, NAME_PATTERN, notFound, validUuid, validVersion } from './errors.ts';
import { OPEN_STATES } from './link-table.ts';
import { getProduct } from './orgs.ts';
import { linkRunningDevices } from './running-firmware.ts';

export interface CreateFirmwareInput {
  orgId: string;
  productId: string;
  /** The firmware UUID (fwup `meta-uuid`); generated when absent. Devices join `device:<uuid>`. */
  uuid?: string;
  component?: string;
  version: string;
  platform?: string | null;
  architecture?: string | null;
  /** Package format: raw | grisp | main-server-zip (edges define theirs). */
  format?: string;
  sha256?: string | null;
  size?: number | null;
  /** Detached signature of the image, base64 (required by products with requires_signature). */
  signature?: string | null;
  metadata?: Record<string, unknown>;
  /** True when the image is stored in the blob store (false: metadata of firmware stored elsewhere). */
  hasBlob?: boolean;
}

/**
 * Records firmware metadata (the blob store holds the image). A release (product, component,
 * version) holds one record per package `format` (its variants); `conflict` when the version
 * exists in that format for that component, or the uuid exists.
 */
export async function createFirmware(ctx: FleetContext, actor: Actor, input: CreateFirmwareInput): Promise<Firmware> {
  const product = await getProduct(ctx, input.orgId, input.productId);
  const version = validVersion(input.version);
  const component = input.component ?? 'firmware';
  if (!NAME_PATTERN.test(component))
    throw new FleetError('invalid', "component must be a name (letters, digits, '_', '.', '-')", {
      field: 'component',
    });
  const hasBlob = input.hasBlob ?? false;
  if (input.sha256 != null && !/^[0-9a-f]{64}$/.test(input.sha256))
    throw new FleetError('invalid', 'sha256 must be 64 lowercase hex digits', { field: 'sha256' });
  if (input.size != null && (!Number.isSafeInteger(input.size) || input.size < 0))
    throw new FleetError('invalid', 'size must be a non-negative integer', { field: 'size' });
  if (hasBlob && (input.sha256 == null || input.size == null))
    throw new FleetError('invalid', 'firmware with an image needs its sha256 and size', { field: 'sha256' });
  if (hasBlob && product.requires_signature && !input.signature) {
    throw new FleetError(
      'invalid',
      `product ${product.name} requires signed firmware; sign the image and upload it with its signature`,
      { field: 'signature' },
    );
  }
  try {
    return await inTransaction(ctx, async (trx, outbox) => {
      const firmware = await trx
        .insertInto('firmware')
        .values({
          ...(input.uuid ? { id: validUuid('uuid', input.uuid) } : {}),
          org_id: product.org_id,
          product_id: product.id,
          component,
          version,
          platform: input.platform ?? null,
          architecture: input.architecture ?? null,
          format: input.format ?? 'raw',
          sha256: input.sha256 ?? null,
          size: input.size ?? null,
          signature: input.signature ?? null,
          metadata: JSON.stringify(input.metadata ?? {}),
          has_blob: hasBlob,
        })
        .returningAll()
        .executeTakeFirstOrThrow();
      await linkRunningDevices(trx, firmware);
      await audit(trx, actor, {
        orgId: product.org_id,
        action: 'firmware.create',
        resourceType: 'firmware',
        resourceId: firmware.id,
        details: { product: product.name, component, version, has_blob: hasBlob, sha256: firmware.sha256 },
      });
      outbox.push({
        topic: `operator:${product.org_id}`,
        event: 'firmware_created',
        payload: { firmware_id: firmware.id, product_id: product.id, version, component },
      });
      return firmware;
    });
  } catch (err) {
    if (isUniqueViolation(err))
      throw new FleetError(
        'conflict',
        `firmware ${component} ${version} of format ${input.format ?? 'raw'} (or uuid ${input.uuid ?? ''}) already exists for product ${product.name}; bump the version`,
        { field: 'version' },
      );
    throw err;
  }
}

/** Firmware of an organization, newest first, optionally one product's or one component's. */
export async function listFirmware(
  ctx: FleetContext,
  orgId: string,
  filter: { productId?: string; component?: string } = {},
): Promise<Firmware[]> {
  if (!isUuid(orgId) || (filter.productId && !isUuid(filter.productId))) return [];
  let query = ctx.db.selectFrom('firmware').selectAll().where('org_id', '=', orgId);
  if (filter.productId) query = query.where('product_id', '=', filter.productId);
  if (filter.component) query = query.where('component', '=', filter.component);
  return query.orderBy('uploaded_at', 'desc').orderBy('id').execute();
}

/** One firmware record of `orgId`. */
export async function getFirmware(ctx: FleetContext, orgId: string, firmwareId: string): Promise<Firmware> {
  const firmware =
    isUuid(orgId) && isUuid(firmwareId)
      ? await ctx.db
          .selectFrom('firmware')
          .selectAll()
          .where('org_id', '=', orgId)
          .where('id', '=', firmwareId)
          .executeTakeFirst()
      : undefined;
  if (!firmware) throw notFound('firmware', firmwareId);
  return firmware;
}

/**
 * Deletes a firmware record and its (finished) update history; `conflict` while a group or device
 * targets it or an update to it is in flight (a variant of a targeted release). The caller removes the blob when no other record shares its sha256.
 */
export async function deleteFirmware(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  firmwareId: string,
): Promise<Firmware> {
  const firmware = await getFirmware(ctx, orgId, firmwareId);
  return inTransaction(ctx, async (trx) => {
    const targets = await trx
      .selectFrom('targets')
      .select(['group_id', 'device_id'])
      .where('firmware_id', '=', firmware.id)
      .forUpdate()
      .execute();
    if (targets.length) {
      throw new FleetError(
        'conflict',
        `firmware ${firmware.version} is the target of ${targets.length} group(s)/device(s); retarget them first`,
        {
          group_ids: targets.flatMap((t) => (t.group_id ? [t.group_id] : [])),
          device_ids: targets.flatMap((t) => (t.device_id ? [t.device_id] : [])),
        },
      );
    }
    // A variant of a targeted release may be installing on devices (another variant is the target's name).
    const open = await trx
      .selectFrom('update_attempts')
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .where('firmware_id', '=', firmware.id)
      .where('state', 'in', OPEN_STATES)
      .executeTakeFirstOrThrow();
    if (Number(open.n) > 0)
      throw new FleetError(
        'conflict',
        `firmware ${firmware.version} (format ${firmware.format}) is being installed by ${open.n} device(s); retarget them or wait for the updates to end`,
        { firmware_id: firmware.id, open_attempts: Number(open.n) },
      );
    // A phased deployment's release stays (its history); a target set's deployments are ended once
    // the target is gone (superseded or completed): they go with it.
    const phased = await trx
      .selectFrom('deployments')
      .select('id')
      .where('firmware_id', '=', firmware.id)
      .where('kind', '=', 'phased')
      .execute();
    if (phased.length)
      throw new FleetError(
        'conflict',
        `firmware ${firmware.version} is the release of ${phased.length} deployment(s); it is kept as their record`,
        { firmware_id: firmware.id, deployments: phased.map((d) => d.id) },
      );
    await trx.deleteFrom('deployments').where('firmware_id', '=', firmware.id).where('kind', '=', 'target').execute();
    await trx.deleteFrom('update_attempts').where('firmware_id', '=', firmware.id).execute();
    await trx.deleteFrom('firmware').where('id', '=', firmware.id).execute();
    await audit(trx, actor, {
      orgId,
      action: 'firmware.delete',
      resourceType: 'firmware',
      resourceId: firmware.id,
      details: { version: firmware.version, component: firmware.component, format: firmware.format },
    });
    return firmware;
  });
}

/** Whether another firmware record still references this image (blob stores share by sha256). */
export async function isBlobReferenced(ctx: FleetContext, sha256: string): Promise<boolean> {
  const row = await ctx.db
    .selectFrom('firmware')
    .select('id')
    .where('sha256', '=', sha256)
    .where('has_blob', '=', true)
    .limit(1)
    .executeTakeFirst();
  return row !== undefined;
}
