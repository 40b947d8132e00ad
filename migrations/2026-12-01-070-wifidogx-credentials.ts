import type { Kysely } from 'kysely';

// WiFiDogX gateway credentials: gateways carry no certificate and claim their device_id in a
// message, so an approved gateway is given a secret it sends on the upgrade path
// (`WSServerPath /ws/wifidogx?credential=<it>`). Only its SHA-256 is stored. Frozen in time.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .alterTable('wifidogx_gateways')
    .addColumn('credential_hash', 'text')
    .addColumn('credential_issued_at', 'timestamptz')
    .execute();
  await db.schema
    .createIndex('wifidogx_gateways_credential_idx')
    .unique()
    .on('wifidogx_gateways')
    .column('credential_hash')
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropIndex('wifidogx_gateways_credential_idx').execute();
  await db.schema
    .alterTable('wifidogx_gateways')
    .dropColumn('credential_issued_at')
    .dropColumn('credential_hash')
    .execute();
}
