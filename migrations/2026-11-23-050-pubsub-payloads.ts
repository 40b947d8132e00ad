import { type Kysely, sql } from 'kysely';

// Cross-node PubSub messages too large for a NOTIFY payload (8000 bytes): the publisher stores
// the message here and notifies its id; receivers read the row; old rows are deleted by age.
// Frozen in time.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('pubsub_payloads')
    .addColumn('id', 'bigserial', (c) => c.primaryKey())
    .addColumn('origin', 'text', (c) => c.notNull())
    .addColumn('body', 'text', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();
  await db.schema.createIndex('pubsub_payloads_created_at').on('pubsub_payloads').column('created_at').execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('pubsub_payloads').execute();
}
