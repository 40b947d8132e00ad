import { loadConfig } from '../config.ts';
import { openDatabase } from '../db/index.ts';
import { migrateDown, migrateToLatest, migrationStatus } from '../db/migrate.ts';
import type { CliIo } from './client.ts';

/** `fleethub migrate up|down|status` against the configured database (declared in server/cli/index.ts). */
export async function runMigrate(
  action: 'up' | 'down' | 'status',
  flags: { dataDir?: string; databaseUrl?: string },
  io: CliIo,
): Promise<number> {
  const config = loadConfig([], io.env, {
    ...(flags.dataDir ? { dataDir: flags.dataDir } : {}),
    ...(flags.databaseUrl ? { databaseUrl: flags.databaseUrl } : {}),
  });
  const handle = await openDatabase({ databaseUrl: config.databaseUrl, dataDir: config.dataDir });
  try {
    switch (action) {
      case 'up': {
        const { results } = await migrateToLatest(handle.db);
        for (const r of results ?? []) io.out(`${r.status === 'Success' ? 'applied' : r.status}  ${r.migrationName}\n`);
        if (!results?.length) io.out('database is up to date\n');
        return 0;
      }
      case 'down': {
        const { results } = await migrateDown(handle.db);
        for (const r of results ?? []) io.out(`reverted  ${r.migrationName}\n`);
        if (!results?.length) io.out('nothing to revert\n');
        return 0;
      }
      case 'status':
        for (const m of await migrationStatus(handle.db))
          io.out(`${m.executedAt ? m.executedAt.toISOString() : 'pending                 '}  ${m.name}\n`);
        return 0;
    }
  } finally {
    await handle.close();
  }
}
