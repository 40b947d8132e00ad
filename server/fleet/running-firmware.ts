/**
 * What a device reports running, kept on the device (`devices.firmware_uuid/firmware_version/
 * platform/architecture`, one `device_components` row per component), never as catalogue rows:
 * only operators add firmware. A device making up uuids or versions changes its own rows and
 * nothing else. Targets are catalogue firmware, so "runs its target" compares the running uuid
 * (Phoenix) or the catalogue record of the running version (edges) with the target's id.
 */
import { sql } from 'kysely';
import { audit } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { DeviceProtocol, Firmware } from '../db/schema.ts';
import { FleetError } from './errors.ts';
import { ANY_FORMAT, installsSql } from './formats.ts';
import { deviceActor, type DeviceRef } from './updates.ts';

export interface RunningComponent {
  component: string;
  /** null: the device reports none (unknown). */
  version: string | null;
  /** Its catalogue record; null when the catalogue has none (reported only). */
  firmwareId: string | null;
}

/**
 * The catalogue firmware of a product for a reported `version` (edges report versions, not uuids):
 * of that release's variants, the one a device of `protocol` installs first (formats.ts), else
 * any of them (the device runs the release whichever package brought it).
 */
export async function catalogueFirmwareByVersion(
  db: Db,
  productId: string,
  component: string,
  version: string,
  protocol: DeviceProtocol,
): Promise<Firmware | undefined> {
  const { rows } = await sql<Firmware>`
    SELECT f.* FROM firmware f
    LEFT JOIN ${installsSql()} pf(protocol, format, rank)
      ON pf.protocol = ${protocol} AND (pf.format = f.format OR pf.format = ${ANY_FORMAT})
    WHERE f.product_id = ${productId} AND f.component = ${component} AND f.version = ${version}
    ORDER BY pf.rank ASC NULLS LAST, f.format, f.id
    LIMIT 1`.execute(db);
  return rows[0];
}

/**
 * Records the component a device runs and audits `device.firmware_changed` when it now runs
 * catalogue firmware other than the one it was last audited running. Firmware outside the
 * catalogue is not audited (the device row shows it), so made-up versions or uuids, even
 * alternating with a real one, add no audit rows. `details` go into the audit record.
 */
export async function recordRunningComponent(
  trx: Db,
  device: DeviceRef,
  running: RunningComponent,
  details: Record<string, unknown> = {},
): Promise<void> {
  const { component, version, firmwareId } = running;
  // The row as it was and the upsert, in one statement (both parts see the row before the upsert).
  const { rows } = await sql<{ version: string | null; audited_firmware_id: string | null }>`
    WITH before AS (
      SELECT version, audited_firmware_id FROM device_components
      WHERE device_id = ${device.deviceId} AND component = ${component}
    ), upserted AS (
      INSERT INTO device_components (device_id, component, version, firmware_id, audited_firmware_id)
      VALUES (${device.deviceId}, ${component}, ${version}, ${firmwareId}::uuid,
              COALESCE(${firmwareId}::uuid, (SELECT audited_firmware_id FROM before)))
      ON CONFLICT (device_id, component) DO UPDATE
      SET version = EXCLUDED.version, firmware_id = EXCLUDED.firmware_id,
          audited_firmware_id = EXCLUDED.audited_firmware_id, updated_at = now()
    )
    SELECT version, audited_firmware_id FROM before`.execute(trx);
  const before = rows[0];
  if (firmwareId === null || before?.audited_firmware_id === firmwareId) return;
  await audit(trx, deviceActor(device), {
    orgId: device.orgId,
    action: 'device.firmware_changed',
    resourceType: 'device',
    resourceId: device.deviceId,
    details: {
      component,
      from_version: before?.version ?? null,
      to_version: version,
      firmware_id: firmwareId,
      ...details,
    },
  });
}

/** A label a device reports about its firmware (`platform`, `architecture`): 1-100 printable characters, or null when absent. */
export function reportedLabel(field: string, value: unknown): string | null {
  if (value === undefined || value === null || value === '') return null;
  if (typeof value !== 'string' || value.length > 100 || /[\u0000-\u001f\u007f]/.test(value)) {
    throw new FleetError('invalid', `${field} must be a string of at most 100 printable characters`, { field });
  }
  return value;
}

/**
 * New catalogue firmware: devices of its product that already run it point at its record, so
 * targeting it sends them nothing. Edges match by version (their running firmware had no record),
 * Phoenix devices by the uuid they joined with. Not audited: what they run did not change.
 */
export async function linkRunningDevices(
  trx: Db,
  firmware: Pick<Firmware, 'id' | 'product_id' | 'component' | 'version' | 'format'>,
): Promise<void> {
  // A variant links the edge devices whose protocol installs its format (formats.ts).
  const installable = sql`EXISTS (SELECT 1 FROM ${installsSql()} pf(protocol, format, rank)
    WHERE pf.protocol = d.protocol AND (pf.format = ${firmware.format} OR pf.format = ${ANY_FORMAT}))`;
  if (firmware.component === 'firmware') {
    await sql`
      UPDATE devices d SET firmware_uuid = ${firmware.id}
      WHERE d.product_id = ${firmware.product_id} AND d.protocol <> 'phoenix' AND d.firmware_uuid IS NULL
        AND d.firmware_version = ${firmware.version} AND ${installable}`.execute(trx);
  }
  await sql`
    UPDATE device_components dc SET firmware_id = ${firmware.id}, audited_firmware_id = ${firmware.id}
    FROM devices d
    WHERE d.id = dc.device_id AND d.product_id = ${firmware.product_id} AND dc.component = ${firmware.component} AND dc.firmware_id IS NULL
      AND CASE WHEN d.protocol = 'phoenix' AND dc.component = 'firmware' THEN d.firmware_uuid = ${firmware.id}
               ELSE dc.version = ${firmware.version} AND ${installable} END`.execute(trx);
}

/** What each of `deviceIds` reports running, component by component (by component name). */
export async function runningComponentsOf(
  db: Db,
  deviceIds: readonly string[],
): Promise<{ device_id: string; component: string; version: string | null }[]> {
  if (deviceIds.length === 0) return [];
  return db
    .selectFrom('device_components')
    .select(['device_id', 'component', 'version'])
    .where('device_id', 'in', deviceIds)
    .orderBy('component')
    .execute();
}
