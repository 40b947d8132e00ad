import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Migrator, type Migration, type MigrationProvider, type MigrationResultSet } from 'kysely';
import type { Db } from './index.ts';

const MIGRATIONS_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../migrations');

/**
 * Loads every migration file: `migrations/*.ts` from the sources, `dist/migrations/*.js` in the
 * compiled build (either way named without the extension, so both see the same history); names
 * sort by their date-and-number prefix.
 */
class DirectoryMigrationProvider implements MigrationProvider {
  async getMigrations(): Promise<Record<string, Migration>> {
    const ext = path.extname(fileURLToPath(import.meta.url));
    const files = (await readdir(MIGRATIONS_DIR)).filter((f) => /^\d/.test(f) && path.extname(f) === ext).sort();
    const migrations: Record<string, Migration> = {};
    for (const file of files) {
      if (file.endsWith('.d.ts')) continue;
      const mod = (await import(pathToFileURL(path.join(MIGRATIONS_DIR, file)).href)) as Migration;
      migrations[file.slice(0, -ext.length)] = mod;
    }
    return migrations;
  }
}

/**
 * The migrator for `schema` (default `public`). The schema must be explicit: without it Kysely
 * finds its bookkeeping tables in ANY schema of the database (other test runs' schemas, say).
 */
export function migrator(db: Db, schema = 'public'): Migrator {
  return new Migrator({
    db,
    provider: new DirectoryMigrationProvider(),
    migrationTableName: 'fleethub_migrations',
    migrationLockTableName: 'fleethub_migrations_lock',
    migrationTableSchema: schema,
  });
}

function check({ error, results }: MigrationResultSet): MigrationResultSet {
  if (error) {
    const failed = results?.find((r) => r.status === 'Error');
    throw new Error(
      `migration ${failed?.migrationName ?? '(unknown)'} failed: ${error instanceof Error ? error.message : String(error)}`,
      { cause: error },
    );
  }
  return { error, results };
}

/** Applies every pending migration. */
export async function migrateToLatest(db: Db, schema?: string): Promise<MigrationResultSet> {
  return check(await migrator(db, schema).migrateToLatest());
}

/** Reverts the most recent migration. */
export async function migrateDown(db: Db, schema?: string): Promise<MigrationResultSet> {
  return check(await migrator(db, schema).migrateDown());
}

/** Lists every migration with the time it was applied, if it was. */
export async function migrationStatus(db: Db, schema?: string): Promise<{ name: string; executedAt?: Date }[]> {
  const list = await migrator(db, schema).getMigrations();
  return list.map((m) => ({ name: m.name, executedAt: m.executedAt }));
}
