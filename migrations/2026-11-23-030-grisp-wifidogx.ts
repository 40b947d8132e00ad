import { type Kysely, sql } from 'kysely';

// Edges for GRiSP and WiFiDogX: per-device protocol state, GRiSP device
// logs and linking tokens, WiFiDogX operator commands and their responses. Frozen in time.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('grisp_devices')
    .addColumn('device_id', 'uuid', (c) => c.primaryKey().references('devices.id').onDelete('cascade'))
    .addColumn('serial', 'text')
    .addColumn('hardware_serial', 'text')
    .addColumn('relname', 'text')
    .addColumn('relvsn', 'text')
    .addColumn('update_status', 'text')
    .addColumn('update_message', 'text')
    .addColumn('action_required', 'text')
    .addColumn('system_info', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    .addColumn('linked_at', 'timestamptz')
    .addColumn('linked_by', 'text')
    // Highest log sequence number stored, and the device's dropped-events count acknowledged.
    .addColumn('log_seq', 'bigint')
    .addColumn('log_dropped', 'bigint', (c) => c.notNull().defaultTo(0))
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();

  await db.schema
    .createTable('grisp_log_events')
    .addColumn('id', 'bigserial', (c) => c.primaryKey())
    .addColumn('device_id', 'uuid', (c) => c.notNull().references('devices.id').onDelete('cascade'))
    .addColumn('seq', 'bigint', (c) => c.notNull())
    .addColumn('time_us', 'bigint')
    .addColumn('level', 'text')
    .addColumn('msg', 'jsonb')
    .addColumn('meta', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    .addColumn('received_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();
  await db.schema
    .createIndex('grisp_log_events_device_idx')
    .on('grisp_log_events')
    .columns(['device_id', 'id'])
    .execute();

  await db.schema
    .createTable('grisp_link_tokens')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('org_id', 'uuid', (c) => c.notNull().references('orgs.id').onDelete('cascade'))
    .addColumn('token_hash', 'text', (c) => c.notNull().unique())
    .addColumn('created_by', 'text')
    .addColumn('expires_at', 'timestamptz', (c) => c.notNull())
    .addColumn('used_at', 'timestamptz')
    .addColumn('used_by_device', 'uuid', (c) => c.references('devices.id').onDelete('set null'))
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();

  await db.schema
    .createTable('wifidogx_gateways')
    .addColumn('device_id', 'uuid', (c) => c.primaryKey().references('devices.id').onDelete('cascade'))
    .addColumn('device_info', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    // The gateways as the device last reported them.
    .addColumn('gateways', 'jsonb', (c) => c.notNull().defaultTo(sql`'[]'::jsonb`))
    // Operator settings: { "<gw_id>": <auth_mode integer> }.
    .addColumn('auth_modes', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    .addColumn('firmware_info', 'jsonb')
    .addColumn('last_heartbeat_at', 'timestamptz')
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();

  await db.schema
    .createTable('wifidogx_commands')
    .addColumn('id', 'uuid', (c) => c.primaryKey().defaultTo(sql`gen_random_uuid()`))
    .addColumn('org_id', 'uuid', (c) => c.notNull().references('orgs.id').onDelete('cascade'))
    .addColumn('device_id', 'uuid', (c) => c.notNull().references('devices.id').onDelete('cascade'))
    .addColumn('req_id', 'text', (c) => c.notNull())
    .addColumn('type', 'text', (c) => c.notNull())
    .addColumn('payload', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    // queued | sent | succeeded | failed | refused
    .addColumn('status', 'text', (c) => c.notNull())
    .addColumn('response', 'jsonb')
    .addColumn('error', 'text')
    .addColumn('created_by', 'text')
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('sent_at', 'timestamptz')
    .addColumn('completed_at', 'timestamptz')
    .execute();
  await db.schema
    .createIndex('wifidogx_commands_device_idx')
    .on('wifidogx_commands')
    .columns(['device_id', 'created_at'])
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of [
    'wifidogx_commands',
    'wifidogx_gateways',
    'grisp_link_tokens',
    'grisp_log_events',
    'grisp_devices',
  ]) {
    await db.schema.dropTable(table).execute();
  }
}
