import type { Kysely } from 'kysely';

// grisp_log_events.seq may be null: after its log buffer overflowed, a GRiSP board sends a made-up
// `log_drop` event without a sequence number first in the batch; it is stored with the others so
// operators see the gap where it happened. Frozen in time.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .alterTable('grisp_log_events')
    .alterColumn('seq', (c) => c.dropNotNull())
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.deleteFrom('grisp_log_events').where('seq', 'is', null).execute();
  await db.schema
    .alterTable('grisp_log_events')
    .alterColumn('seq', (c) => c.setNotNull())
    .execute();
}
