import type { Kysely } from 'kysely';

// products.update_timeout_seconds: how long an update attempt may go without a word from its
// device before the sweep marks it timed_out. Null: the server's default (--update-timeout).
// One column for every protocol; the WiFiDogX edge's own timeout goes away with it.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('products').addColumn('update_timeout_seconds', 'integer').execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('products').dropColumn('update_timeout_seconds').execute();
}
