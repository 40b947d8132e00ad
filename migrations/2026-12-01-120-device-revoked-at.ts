import { type Kysely, sql } from 'kysely';

// devices.revoked_at: when the device was last revoked (kept when it is approved again). A
// credential issued before it is void (WiFiDogX gateways: a leaked credential does not survive
// revoke + re-approve). Filled from the audit log's device.revoke entries; a device revoked now
// without one gets the migration's time. Frozen in time.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('devices').addColumn('revoked_at', 'timestamptz').execute();
  await sql`
    UPDATE devices d SET revoked_at = (
      SELECT max(a.at) FROM audit_log a WHERE a.action = 'device.revoke' AND a.resource_type = 'device' AND a.resource_id = d.id::text
    )`.execute(db);
  await sql`UPDATE devices SET revoked_at = now() WHERE approval = 'revoked' AND revoked_at IS NULL`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('devices').dropColumn('revoked_at').execute();
}
