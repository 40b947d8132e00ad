import { loadConfig } from '../config.ts';
import { openDatabase } from '../db/index.ts';
import { migrateDown, migrateToLatest, migrationStatus } from '../db/migrate.ts';

const HELP = `Usage: fleethub migrate [up|down|status] [--data-dir D] [--database-url URL]

  up      apply every pending migration (default)
  down    revert the most recent migration
  status  list migrations and when each was applied`;

/** `fleethub migrate up|down|status` against the configured database. */
export async function runMigrateCommand(argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    console.log(HELP);
    return 0;
  }
  const action = argv[0] && !argv[0].startsWith('--') ? argv.shift()! : 'up';
  const config = loadConfig(argv);
  const handle = await openDatabase({ databaseUrl: config.databaseUrl, dataDir: config.dataDir });
  try {
    switch (action) {
      case 'up': {
        const { results } = await migrateToLatest(handle.db);
        for (const r of results ?? [])
          console.log(`${r.status === 'Success' ? 'applied' : r.status}  ${r.migrationName}`);
        if (!results?.length) console.log('database is up to date');
        return 0;
      }
      case 'down': {
        const { results } = await migrateDown(handle.db);
        for (const r of results ?? []) console.log(`reverted  ${r.migrationName}`);
        if (!results?.length) console.log('nothing to revert');
        return 0;
      }
      case 'status': {
        for (const m of await migrationStatus(handle.db)) {
          console.log(`${m.executedAt ? m.executedAt.toISOString() : 'pending                 '}  ${m.name}`);
        }
        return 0;
      }
      default:
        console.error(`unknown migrate action ${JSON.stringify(action)}\n\n${HELP}`);
        return 2;
    }
  } finally {
    await handle.close();
  }
}
