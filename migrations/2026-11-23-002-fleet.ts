import { type Kysely, sql } from 'kysely';

// Fleet: groups and membership, firmware metadata, targets, per-component installed versions,
// and update attempts (the persisted update state machine). Frozen in time.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('groups')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('org_id', 'uuid', (c) => c.notNull().references('orgs.id').onDelete('cascade'))
    .addColumn('product_id', 'uuid', (c) => c.notNull().references('products.id').onDelete('cascade'))
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('description', 'text')
    // Lower numbers win when a device's groups target different firmware (see README).
    .addColumn('priority', 'integer', (c) => c.notNull().defaultTo(100))
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addUniqueConstraint('groups_product_name', ['product_id', 'name'])
    .execute();

  await db.schema
    .createTable('group_devices')
    .addColumn('group_id', 'uuid', (c) => c.notNull().references('groups.id').onDelete('cascade'))
    .addColumn('device_id', 'uuid', (c) => c.notNull().references('devices.id').onDelete('cascade'))
    .addColumn('added_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addPrimaryKeyConstraint('group_devices_pk', ['group_id', 'device_id'])
    .execute();
  await db.schema.createIndex('group_devices_device_idx').on('group_devices').column('device_id').execute();

  await db.schema
    .createTable('firmware')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('org_id', 'uuid', (c) => c.notNull().references('orgs.id').onDelete('cascade'))
    .addColumn('product_id', 'uuid', (c) => c.notNull().references('products.id').onDelete('cascade'))
    // The software component this image installs: `firmware` by default; Main Server extensions use their name.
    .addColumn('component', 'text', (c) => c.notNull().defaultTo('firmware'))
    .addColumn('version', 'text', (c) => c.notNull())
    .addColumn('platform', 'text')
    .addColumn('architecture', 'text')
    // Package format: raw | grisp | main-server-zip (edges define theirs).
    .addColumn('format', 'text', (c) => c.notNull().defaultTo('raw'))
    .addColumn('sha256', 'text')
    .addColumn('size', 'bigint')
    .addColumn('signature', 'text')
    .addColumn('metadata', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    // False for firmware only known from a device's join report (no blob stored).
    .addColumn('has_blob', 'boolean', (c) => c.notNull().defaultTo(false))
    .addColumn('uploaded_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addUniqueConstraint('firmware_product_component_version', ['product_id', 'component', 'version'])
    .execute();

  await db.schema
    .createTable('targets')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('org_id', 'uuid', (c) => c.notNull().references('orgs.id').onDelete('cascade'))
    .addColumn('group_id', 'uuid', (c) => c.references('groups.id').onDelete('cascade'))
    .addColumn('device_id', 'uuid', (c) => c.references('devices.id').onDelete('cascade'))
    .addColumn('component', 'text', (c) => c.notNull().defaultTo('firmware'))
    .addColumn('firmware_id', 'uuid', (c) => c.notNull().references('firmware.id'))
    .addColumn('set_by', 'text')
    .addColumn('set_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addCheckConstraint('targets_one_scope', sql`(group_id IS NULL) <> (device_id IS NULL)`)
    .execute();
  await db.schema
    .createIndex('targets_group_component')
    .unique()
    .on('targets')
    .columns(['group_id', 'component'])
    .where('group_id', 'is not', null)
    .execute();
  await db.schema
    .createIndex('targets_device_component')
    .unique()
    .on('targets')
    .columns(['device_id', 'component'])
    .where('device_id', 'is not', null)
    .execute();

  await db.schema
    .createTable('device_components')
    .addColumn('device_id', 'uuid', (c) => c.notNull().references('devices.id').onDelete('cascade'))
    .addColumn('component', 'text', (c) => c.notNull())
    .addColumn('version', 'text')
    .addColumn('firmware_id', 'uuid', (c) => c.references('firmware.id').onDelete('set null'))
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addPrimaryKeyConstraint('device_components_pk', ['device_id', 'component'])
    .execute();

  await db.schema
    .createTable('update_attempts')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('org_id', 'uuid', (c) => c.notNull().references('orgs.id').onDelete('cascade'))
    .addColumn('device_id', 'uuid', (c) => c.notNull().references('devices.id').onDelete('cascade'))
    .addColumn('firmware_id', 'uuid', (c) => c.notNull().references('firmware.id'))
    .addColumn('component', 'text', (c) => c.notNull().defaultTo('firmware'))
    .addColumn('from_version', 'text')
    .addColumn('to_version', 'text', (c) => c.notNull())
    // queued | sent | begun | downloading | finished | succeeded | failed | rolled_back | timed_out | cancelled
    .addColumn('state', 'text', (c) => c.notNull())
    .addColumn('percent', 'integer')
    .addColumn('bytes', 'bigint')
    .addColumn('total', 'bigint')
    .addColumn('errors', 'jsonb', (c) => c.notNull().defaultTo(sql`'[]'::jsonb`))
    .addColumn('via', 'text') // group:<id> | device | rollout:<id> | edge:<name>
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('sent_at', 'timestamptz')
    .addColumn('begun_at', 'timestamptz')
    .addColumn('finished_at', 'timestamptz')
    .addColumn('completed_at', 'timestamptz')
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();
  await db.schema
    .createIndex('update_attempts_device_idx')
    .on('update_attempts')
    .columns(['device_id', 'created_at'])
    .execute();
  await db.schema.createIndex('update_attempts_state_idx').on('update_attempts').columns(['org_id', 'state']).execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['update_attempts', 'device_components', 'targets', 'firmware', 'group_devices', 'groups']) {
    await db.schema.dropTable(table).execute();
  }
}
