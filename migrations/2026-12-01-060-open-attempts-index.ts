import { type Kysely, sql } from 'kysely';

// The attempts still in flight, by device, component and version: what every device report and
// every join looks up. Without it the planner may combine the device index with the
// (org_id, state) index and scan every open attempt of the org for each report (0.35 ms a row
// at 27k open attempts on PGlite, which runs no autovacuum to refresh its statistics).
// Frozen in time: the state list is the open states of 2026-12-01.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createIndex('update_attempts_open_idx')
    .on('update_attempts')
    .columns(['device_id', 'component', 'to_version', 'created_at'])
    .where(sql.ref('state'), 'in', ['queued', 'sent', 'begun', 'downloading', 'finished'])
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropIndex('update_attempts_open_idx').execute();
}
