import { type Kysely, sql } from 'kysely';

// Ed25519 public keys a product's firmware images are signed with (detached signatures over
// the image's SHA-256 digest). Frozen in time: never import application code here.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('product_signing_keys')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('product_id', 'uuid', (c) => c.notNull().references('products.id').onDelete('cascade'))
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('public_key_pem', 'text', (c) => c.notNull())
    // SHA-256 of the raw 32-byte public key, lowercase hex.
    .addColumn('fingerprint', 'text', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addUniqueConstraint('product_signing_keys_product_name', ['product_id', 'name'])
    .addUniqueConstraint('product_signing_keys_product_fingerprint', ['product_id', 'fingerprint'])
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('product_signing_keys').execute();
}
