import { type Kysely, sql } from 'kysely';

// Phased deployments (docs/deployments.md): a release rolled out to a target set in stages, one
// row per device of it, and the lease that lets exactly one node's orchestrator act on it.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('deployments')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('org_id', 'uuid', (c) => c.notNull().references('orgs.id').onDelete('cascade'))
    .addColumn('product_id', 'uuid', (c) => c.notNull().references('products.id').onDelete('cascade'))
    .addColumn('firmware_id', 'uuid', (c) => c.notNull().references('firmware.id'))
    .addColumn('component', 'text', (c) => c.notNull().defaultTo('firmware'))
    .addColumn('name', 'text')
    // Target set, as given (resolved once into deployment_devices at creation).
    .addColumn('group_ids', sql`uuid[]`, (c) => c.notNull())
    .addColumn('tags', 'jsonb', (c) => c.notNull().defaultTo(sql`'[]'::jsonb`))
    .addColumn('version_range', 'text')
    .addColumn('platform', 'text')
    .addColumn('architecture', 'text')
    .addColumn('state', 'text', (c) => c.notNull())
    .addColumn('paused_reason', 'text')
    // operator | error (a stage's error condition) | success (a stage finished short of its success condition)
    .addColumn('pause_cause', 'text')
    .addColumn('aborted_reason', 'text')
    .addColumn('current_stage', 'integer', (c) => c.notNull().defaultTo(0))
    // Pacing. rate: {type: constant} or {type: exponential, base, factor, criterion}.
    .addColumn('max_concurrent', 'integer')
    .addColumn('rate_per_minute', 'integer')
    .addColumn('rate', 'jsonb', (c) => c.notNull().defaultTo(sql`'{"type":"constant"}'::jsonb`))
    .addColumn('in_flight_timeout_s', 'integer')
    .addColumn('retries', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('retry_backoff_s', 'integer', (c) => c.notNull().defaultTo(60))
    .addColumn('penalty_failures', 'integer')
    .addColumn('penalty_window_s', 'integer')
    .addColumn('penalty_hold_s', 'integer')
    // The node whose orchestrator acts on the deployment, until lease_until (database time).
    .addColumn('lease_holder', 'text')
    .addColumn('lease_until', 'timestamptz')
    .addColumn('created_by', 'text')
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('started_at', 'timestamptz')
    .addColumn('ended_at', 'timestamptz')
    .execute();
  await db.schema.createIndex('deployments_org_idx').on('deployments').columns(['org_id', 'created_at']).execute();
  await sql`CREATE INDEX deployments_active_idx ON deployments (state) WHERE state IN ('running', 'paused', 'awaiting_approval', 'draft')`.execute(
    db,
  );

  await db.schema
    .createTable('deployment_stages')
    .addColumn('deployment_id', 'uuid', (c) => c.notNull().references('deployments.id').onDelete('cascade'))
    .addColumn('stage', 'integer', (c) => c.notNull())
    // {count} | {percent} | {rest: true}, as given; size is the device count it resolved to.
    .addColumn('spec', 'jsonb', (c) => c.notNull())
    .addColumn('size', 'integer', (c) => c.notNull())
    .addColumn('success_count', 'integer')
    .addColumn('success_percent', 'integer')
    .addColumn('error_count', 'integer')
    .addColumn('error_percent', 'integer')
    .addColumn('min_finished', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('on_error', 'text', (c) => c.notNull().defaultTo('pause'))
    .addColumn('requires_approval', 'boolean', (c) => c.notNull().defaultTo(false))
    .addColumn('soak_s', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('error_overridden', 'boolean', (c) => c.notNull().defaultTo(false))
    .addColumn('approved_at', 'timestamptz')
    .addColumn('started_at', 'timestamptz')
    .addColumn('succeeded_at', 'timestamptz')
    .addPrimaryKeyConstraint('deployment_stages_pk', ['deployment_id', 'stage'])
    .execute();

  await db.schema
    .createTable('deployment_devices')
    .addColumn('deployment_id', 'uuid', (c) => c.notNull().references('deployments.id').onDelete('cascade'))
    .addColumn('device_id', 'uuid', (c) => c.notNull().references('devices.id').onDelete('cascade'))
    .addColumn('stage', 'integer', (c) => c.notNull())
    .addColumn('position', 'integer', (c) => c.notNull())
    // pending | in_flight | succeeded | failed | cancelled
    .addColumn('state', 'text', (c) => c.notNull().defaultTo('pending'))
    .addColumn('tries', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('told_at', 'timestamptz')
    .addColumn('succeeded_at', 'timestamptz')
    .addColumn('failed_at', 'timestamptz')
    .addColumn('failure_reason', 'text')
    .addColumn('attempt_id', 'uuid')
    .addPrimaryKeyConstraint('deployment_devices_pk', ['deployment_id', 'device_id'])
    .execute();
  await db.schema
    .createIndex('deployment_devices_order_idx')
    .on('deployment_devices')
    .columns(['deployment_id', 'state', 'stage', 'position'])
    .execute();
  // Target resolution looks up the deployment that told a device (reconcile.ts resolvedSql).
  await sql`CREATE INDEX deployment_devices_told_idx ON deployment_devices (device_id, told_at) WHERE told_at IS NOT NULL`.execute(
    db,
  );
  await sql`CREATE INDEX deployment_devices_attempt_idx ON deployment_devices (attempt_id) WHERE attempt_id IS NOT NULL`.execute(
    db,
  );
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('deployment_devices').execute();
  await db.schema.dropTable('deployment_stages').execute();
  await db.schema.dropTable('deployments').execute();
}
