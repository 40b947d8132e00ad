import { randomBytes } from 'node:crypto';
import { dropSchema, openDatabase, type DatabaseHandle } from '../../server/db/index.ts';
import { migrateToLatest } from '../../server/db/migrate.ts';

/**
 * A migrated database no other test can see: a fresh schema on PostgreSQL when `DATABASE_URL`
 * is set, otherwise an in-memory PGlite. `close()` drops what it created.
 */
export async function createTestDatabase(): Promise<DatabaseHandle> {
  const databaseUrl = process.env.DATABASE_URL || undefined;
  const schema = databaseUrl ? `t_${randomBytes(6).toString('hex')}` : undefined;
  const handle = await openDatabase({ databaseUrl, dataDir: 'memory://', schema, poolSize: 5 });
  await migrateToLatest(handle.db, schema);
  return {
    ...handle,
    async close() {
      await handle.close();
      if (databaseUrl && schema) await dropSchema(databaseUrl, schema);
    },
  };
}

/** Which database the suite runs on, for test names and skips. */
export const DATABASE_KIND = process.env.DATABASE_URL ? 'postgres' : 'pglite';
