import { type Kysely, sql } from 'kysely';

// Releases with one artifact per package format: several firmware records may share product,
// component and version, one per `format` (a GRiSP tar, a Main Server ZIP, a raw image of the
// same release). The unique key gains `format`.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('firmware').dropConstraint('firmware_product_component_version').execute();
  await db.schema
    .alterTable('firmware')
    .addUniqueConstraint('firmware_product_component_version_format', ['product_id', 'component', 'version', 'format'])
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM (
      SELECT 1 FROM firmware GROUP BY product_id, component, version HAVING count(*) > 1) releases`.execute(db);
  if (Number(rows[0]?.n ?? 0) > 0)
    throw new Error(
      `${rows[0]!.n} release(s) hold more than one format; delete the extra variants (fleethub firmware delete) before migrating down`,
    );
  await db.schema.alterTable('firmware').dropConstraint('firmware_product_component_version_format').execute();
  await db.schema
    .alterTable('firmware')
    .addUniqueConstraint('firmware_product_component_version', ['product_id', 'component', 'version'])
    .execute();
}
