import { type Kysely, sql } from 'kysely';

// Edges of Main Server REST and keyauth (public-key TCP): device tokens and
// registration details of Main Server devices, integer extension ids, and client public keys.
// Approval itself is devices.approval. Frozen in time: never import application code here.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('main_server_devices')
    .addColumn('device_id', 'uuid', (c) => c.primaryKey().references('devices.id').onDelete('cascade'))
    .addColumn('name', 'text')
    .addColumn('ip', 'text')
    // sha256 (hex) of the device token; null until the device collects one after approval.
    .addColumn('token_hash', 'text', (c) => c.unique())
    .addColumn('token_issued_at', 'timestamptz')
    // sha256 (hex) of the claim secret the device got at registration; consumed when it collects its token.
    .addColumn('claim_hash', 'text')
    .addColumn('registered_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();

  await db.schema
    .createTable('main_server_extensions')
    // The seed's integer `extension_id`; the extension's name is the fleet component.
    .addColumn('id', 'serial', (c) => c.primaryKey())
    .addColumn('org_id', 'uuid', (c) => c.notNull().references('orgs.id').onDelete('cascade'))
    .addColumn('product_id', 'uuid', (c) => c.notNull().references('products.id').onDelete('cascade'))
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addUniqueConstraint('main_server_extensions_product_name', ['product_id', 'name'])
    .execute();

  await db.schema
    .createTable('keyauth_clients')
    // SHA-256 (hex) of the client's SPKI DER public key: how operators approve and revoke.
    .addColumn('fingerprint', 'text', (c) => c.primaryKey())
    .addColumn('device_id', 'uuid', (c) => c.notNull().unique().references('devices.id').onDelete('cascade'))
    .addColumn('public_key_pem', 'text', (c) => c.notNull())
    .addColumn('name', 'text')
    .addColumn('remote_address', 'text')
    .addColumn('first_seen_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('last_seen_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['keyauth_clients', 'main_server_extensions', 'main_server_devices']) {
    await db.schema.dropTable(table).execute();
  }
}
