import { type Kysely, sql } from 'kysely';

// Firmware a device reports running stays on the device from now on; only operators add catalogue
// rows. Until now every Phoenix join with an unknown uuid and every edge report of an unknown
// version inserted a firmware row (has_blob = false, metadata.reported_by = the device), without
// bound. This migration:
// - adds device_components.audited_firmware_id, the catalogue firmware a device was last audited
//   running (device.firmware_changed is written only when that changes), filled from firmware_id;
// - deletes the rows devices created that no update attempt or target references (an image
//   attached later made a row has_blob = true: it is kept); referenced ones are update history and
//   stay. Edge devices' firmware_uuid named the deleted row, so it becomes NULL (their version
//   stays); a Phoenix device's firmware_uuid is the uuid it reported and stays.
// Frozen in time. `down` drops the column; deleted rows are not restored (nothing needs them).
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .alterTable('device_components')
    .addColumn('audited_firmware_id', 'uuid', (c) => c.references('firmware.id').onDelete('set null'))
    .execute();
  await sql`UPDATE device_components SET audited_firmware_id = firmware_id WHERE firmware_id IS NOT NULL`.execute(db);

  const reportedOnly = sql`
    f.has_blob = false AND f.metadata ? 'reported_by'
    AND NOT EXISTS (SELECT 1 FROM update_attempts ua WHERE ua.firmware_id = f.id)
    AND NOT EXISTS (SELECT 1 FROM targets t WHERE t.firmware_id = f.id)`;
  await sql`UPDATE devices SET firmware_uuid = NULL WHERE protocol <> 'phoenix' AND firmware_uuid IN (SELECT f.id FROM firmware f WHERE ${reportedOnly})`.execute(
    db,
  );
  await sql`DELETE FROM firmware f WHERE ${reportedOnly}`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('device_components').dropColumn('audited_firmware_id').execute();
}
