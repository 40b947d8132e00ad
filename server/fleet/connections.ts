import { sql } from 'kysely';
import type { Db } from '../db/index.ts';
import type { Firmware, UpdateAttempt } from '../db/schema.ts';
import type { DeviceJoinParams, FirmwareUpdatePayload } from '../../shared/protocol.ts';
import { inTransaction, publishAll, Topics, type FleetContext, type FleetEvent } from './context.ts';
import { certificateUsableSql, deviceGroupNamesSql, deviceGroupTopics, groupTopicsOf } from './devices.ts';
import { FleetError, isUuid, validVersion } from './errors.ts';
import { OPEN, TRANSITIONS } from './link-table.ts';
import { reconcileAttempts, resolvedSql } from './reconcile.ts';
import { reportedLabel, recordRunningComponent } from './running-firmware.ts';
import { firmwareUpdatePayload, settleAttemptsOnJoin, transitionEvent } from './updates.ts';

/** The device a connection belongs to, as its certificate says (identity/ resolves it). */
export interface ConnectedDevice {
  deviceId: string;
  orgId: string;
  productId: string;
  /** The certificate that authenticated the connection: a join is refused once it is revoked or outside its validity. */
  certificateId?: string;
}

export interface JoinOutcome {
  /** Group topics the device should join. */
  groups: string[];
  /** Push this after the join reply: the device does not run its target. */
  update?: FirmwareUpdatePayload;
  /** The firmware of `update`, and its attempt (now `sent`). */
  target?: Firmware;
  attempt?: UpdateAttempt;
  firmware: { id: string; version: string };
  /** When this connection was recorded; pass it back to `deviceDisconnected`. */
  connectedAt: string;
}

/**
 * A device joined with `firmwareUuid` (the firmware it runs). Records the running firmware on
 * the device (for a uuid the catalogue does not hold, from the join params `version/platform/
 * architecture`; it never becomes a catalogue row), marks the device online on this node,
 * settles in-flight updates (running the target → succeeded; back on other firmware after
 * `finish` → rolled_back), and returns the group topics plus the update to push when the device
 * does not run its target (its attempt becomes `sent`).
 */
export async function deviceJoined(
  ctx: FleetContext,
  device: ConnectedDevice,
  firmwareUuid: string,
  params: DeviceJoinParams = {},
): Promise<JoinOutcome> {
  if (!isUuid(firmwareUuid))
    throw new FleetError('invalid', 'join device:<firmware uuid> with the UUID of the firmware you run', {
      topic_uuid: firmwareUuid,
    });
  const uuid = firmwareUuid.toLowerCase();
  const connectedAt = new Date();
  const unchanged = await rejoinUnchanged(ctx, device, uuid, connectedAt);
  if (unchanged) return unchanged;
  return inTransaction(ctx, async (trx, outbox) => {
    const current = await trx
      .selectFrom('devices')
      .selectAll()
      .where('id', '=', device.deviceId)
      .forUpdate()
      .executeTakeFirst();
    if (!current) throw new FleetError('not_found', 'this device is not registered', { device_id: device.deviceId });
    if (current.approval !== 'approved')
      throw new FleetError('forbidden', `this device is ${current.approval}; an operator must approve it`, {
        approval: current.approval,
      });
    if (device.certificateId) await assertCertificateUsable(trx, device.deviceId, device.certificateId);

    const catalogued = await trx
      .selectFrom('firmware')
      .select(['id', 'version', 'product_id', 'platform', 'architecture'])
      .where('id', '=', uuid)
      .executeTakeFirst();
    if (catalogued && catalogued.product_id !== current.product_id) {
      throw new FleetError('invalid', 'the firmware uuid in the topic belongs to another product', {
        firmware_uuid: uuid,
      });
    }
    // Firmware the catalogue does not hold is recorded on the device only (running-firmware.ts).
    if (!catalogued && !params.version) {
      throw new FleetError(
        'invalid',
        'unknown firmware uuid: join with params {version, platform?, architecture?} describing the firmware you run',
        { firmware_uuid: uuid },
      );
    }
    const firmware = { id: uuid, version: catalogued?.version ?? validVersion(params.version) };
    const platform = catalogued?.platform ?? reportedLabel('platform', params.platform);
    const architecture = catalogued?.architecture ?? reportedLabel('architecture', params.architecture);

    await trx
      .updateTable('devices')
      .set({
        firmware_uuid: firmware.id,
        firmware_version: firmware.version,
        platform: platform ?? current.platform,
        architecture: architecture ?? current.architecture,
        connection_status: 'online',
        connected_node: ctx.nodeName,
        last_seen_at: connectedAt,
        updated_at: connectedAt,
      })
      .where('id', '=', current.id)
      .execute();
    await recordRunningComponent(
      trx,
      device,
      { component: 'firmware', version: firmware.version, firmwareId: catalogued ? uuid : null },
      { firmware_uuid: uuid },
    );

    await settleAttemptsOnJoin(trx, device, firmware.id, outbox);
    await reconcileAttempts(trx, { ids: [current.id] });
    // What is still open now is for the resolved target: (re)send it.
    const pending = await trx
      .updateTable('update_attempts')
      .set({ state: 'sent', sent_at: connectedAt, updated_at: connectedAt, from_version: firmware.version })
      .where('device_id', '=', current.id)
      .where('component', '=', 'firmware')
      .where('state', 'in', TRANSITIONS.send.from)
      .returningAll()
      .execute();
    let update: FirmwareUpdatePayload | undefined;
    let target: Firmware | undefined;
    const attempt = pending.sort((a, b) => b.created_at.getTime() - a.created_at.getTime())[0];
    if (attempt) {
      target = await trx
        .selectFrom('firmware')
        .selectAll()
        .where('id', '=', attempt.firmware_id)
        .executeTakeFirstOrThrow();
      update = firmwareUpdatePayload(ctx, target);
      outbox.push(transitionEvent(attempt));
    }

    outbox.push(onlineEvent(ctx, current.org_id, current.id, firmware.version));
    const groups = await deviceGroupTopics(trx, current.id);
    return {
      groups,
      ...(update && target && attempt ? { update, target, attempt } : {}),
      firmware: { id: firmware.id, version: firmware.version },
      connectedAt: connectedAt.toISOString(),
    };
  });
}

/**
 * Refuses a join over a connection whose certificate was revoked (or expired) after the
 * connection was authenticated: revocation holds at every step, not only at the upgrade.
 */
async function assertCertificateUsable(db: Db, deviceId: string, certificateId: string): Promise<void> {
  const { rows } = await sql<{
    usable: boolean;
  }>`SELECT ${certificateUsableSql(certificateId, sql`${deviceId}::uuid`)} AS usable`.execute(db);
  if (!rows[0]?.usable)
    throw new FleetError(
      'forbidden',
      "this connection's certificate is revoked or no longer valid; reconnect with a valid certificate",
      { certificate_id: certificateId },
    );
}

/**
 * The common reconnect, in one statement: the device runs the firmware it ran last time (its
 * component row agrees), no attempt is open, and reconciling would create none (no target, the
 * target is running, or it failed since it was set). Then the full join would only mark the
 * device online and read its groups, so this does exactly that. Anything else (a new firmware,
 * an update in flight, a device not approved, a certificate no longer usable) returns undefined
 * and takes the full path, which refuses or does the work.
 */
async function rejoinUnchanged(
  ctx: FleetContext,
  device: ConnectedDevice,
  uuid: string,
  connectedAt: Date,
): Promise<JoinOutcome | undefined> {
  const { deviceId, certificateId } = device;
  const certificateUsable = certificateId ? sql`AND ${certificateUsableSql(certificateId, sql.ref('d.id'))}` : sql``;
  const { rows } = await sql<{ org_id: string; firmware_version: string; groups: [string, string, string][] }>`
    UPDATE devices d
    SET connection_status = 'online', connected_node = ${ctx.nodeName}, last_seen_at = ${connectedAt}, updated_at = ${connectedAt}
    FROM (${resolvedSql({ ids: [deviceId] }, 'firmware')}) r
    WHERE d.id = ${deviceId} AND r.device_id = d.id AND d.firmware_uuid = ${uuid} ${certificateUsable}
      AND EXISTS (
        SELECT 1 FROM device_components dc
        WHERE dc.device_id = d.id AND dc.component = 'firmware' AND dc.version = d.firmware_version
          AND dc.firmware_id IS NOT DISTINCT FROM (SELECT f.id FROM firmware f WHERE f.id = d.firmware_uuid))
      AND NOT EXISTS (SELECT 1 FROM update_attempts ua WHERE ua.device_id = d.id AND ua.component = 'firmware' AND ua.state IN (${OPEN}))
      AND (r.target_id IS NULL OR r.runs_target OR EXISTS (
        SELECT 1 FROM update_attempts x
        WHERE x.device_id = d.id AND x.component = 'firmware' AND x.firmware_id = r.target_id
          AND x.state IN ('failed', 'rolled_back') AND x.completed_at >= r.target_set_at))
    RETURNING d.org_id, d.firmware_version, ${deviceGroupNamesSql(sql.ref('d.id'))} AS groups`.execute(ctx.db);
  const row = rows[0];
  if (!row) return undefined;
  await publishAll(ctx, [onlineEvent(ctx, row.org_id, deviceId, row.firmware_version)]);
  return {
    groups: groupTopicsOf(row.groups),
    firmware: { id: uuid, version: row.firmware_version },
    connectedAt: connectedAt.toISOString(),
  };
}

function onlineEvent(ctx: FleetContext, orgId: string, deviceId: string, version: string): FleetEvent {
  return {
    topic: Topics.operator(orgId),
    event: 'device_status',
    payload: { device_id: deviceId, status: 'online', version, node: ctx.nodeName, protocol: 'phoenix' },
  };
}

/**
 * The device's connection on this node ended: mark it offline, unless a newer connection (on any
 * node) has taken over since `connectedAt`. `reason` says why the connection ended (for operators
 * and the log).
 */
export async function deviceDisconnected(
  ctx: FleetContext,
  deviceId: string,
  connectedAt?: string,
  reason = 'connection closed',
): Promise<boolean> {
  if (!isUuid(deviceId)) return false;
  // One statement is atomic on its own: no transaction needed.
  let query = ctx.db
    .updateTable('devices')
    .set({ connection_status: 'offline', connected_node: null, updated_at: new Date() })
    .where('id', '=', deviceId)
    .where('connected_node', '=', ctx.nodeName);
  if (connectedAt) query = query.where('last_seen_at', '=', new Date(connectedAt));
  const row = await query.returning(['id', 'org_id', 'protocol']).executeTakeFirst();
  if (row) {
    const duration = connectedAt ? { connected_ms: Date.now() - Date.parse(connectedAt) } : {};
    await publishAll(ctx, [
      {
        topic: Topics.operator(row.org_id),
        event: 'device_status',
        payload: { device_id: row.id, status: 'offline', protocol: row.protocol, reason, ...duration },
      },
    ]);
  }
  return row !== undefined;
}
