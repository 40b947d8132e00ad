import { type Kysely, sql } from 'kysely';

// A plain group `target set` is a one-stage deployment (docs/deployments.md, "Plain `target set`
// as a one-stage deployment"): `kind` tells it from a phased one, `superseded` is how it ends when
// a newer target set or a clear replaces it, and the partial unique index finds (and bounds to
// one) the active target deployment of a group and component.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .alterTable('deployments')
    .addColumn('kind', 'text', (c) => c.notNull().defaultTo('phased'))
    .execute();
  await sql`ALTER TABLE deployments ADD CONSTRAINT deployments_kind_check CHECK (kind IN ('phased', 'target'))`.execute(
    db,
  );
  await sql`CREATE UNIQUE INDEX deployments_target_active_idx ON deployments ((group_ids[1]), component)
    WHERE kind = 'target' AND state IN ('running', 'paused')`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await sql`DROP INDEX deployments_target_active_idx`.execute(db);
  await db.schema.alterTable('deployments').dropColumn('kind').execute();
}
