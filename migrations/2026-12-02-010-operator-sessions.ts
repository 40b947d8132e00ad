import { type Kysely, sql } from 'kysely';

// Server-side operator sessions: every login JWT names one (claim `sid`) and is honoured only
// while its row lives and is not revoked. Logout revokes one; a password change, a disabled
// user or a new role revokes all of a user's; deleting the user deletes them. Frozen in time.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('operator_sessions')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('user_id', 'uuid', (c) => c.notNull().references('users.id').onDelete('cascade'))
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('expires_at', 'timestamptz', (c) => c.notNull())
    .addColumn('revoked_at', 'timestamptz')
    // signed out | password changed | user disabled | role changed
    .addColumn('revoked_reason', 'text')
    .addColumn('remote_address', 'text')
    .addColumn('user_agent', 'text')
    .execute();
  await db.schema.createIndex('operator_sessions_user_idx').on('operator_sessions').column('user_id').execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('operator_sessions').execute();
}
