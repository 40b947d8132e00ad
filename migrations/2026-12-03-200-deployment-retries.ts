import type { Kysely } from 'kysely';

// Deployment retries and the penalty box (docs/deployments.md): a device whose update failed or
// timed out waits in `retrying` (backoff) or `penalty_box` (held out) until retry_at, then the
// orchestrator tells it again. The state and the time are in the row, so a restart resumes them.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('deployment_devices').addColumn('retry_at', 'timestamptz').execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('deployment_devices').dropColumn('retry_at').execute();
}
