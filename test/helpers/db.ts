import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { dropSchema, openDatabase, type DatabaseHandle } from '../../server/db/index.ts';
import { migrateToLatest } from '../../server/db/migrate.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/**
 * A migrated database no other test can see: a fresh schema on PostgreSQL when `DATABASE_URL`
 * is set, otherwise an in-memory PGlite. `close()` drops what it created.
 *
 * A new PGlite database costs an initdb and every migration in WebAssembly (about 4 s of CPU);
 * it starts instead from a migrated template (`pgliteTemplate`), which loads in a fraction of
 * that. The migrations still run on it, and find nothing left to do.
 */
export async function createTestDatabase(): Promise<DatabaseHandle> {
  const databaseUrl = process.env.DATABASE_URL || undefined;
  const schema = databaseUrl ? `t_${randomBytes(6).toString('hex')}` : undefined;
  const pgliteImage = databaseUrl ? undefined : await pgliteTemplate();
  const handle = await openDatabase({ databaseUrl, dataDir: 'memory://', schema, poolSize: 5, pgliteImage });
  await migrateToLatest(handle.db, schema);
  return {
    ...handle,
    async close() {
      await handle.close();
      if (databaseUrl && schema) await dropSchema(databaseUrl, schema);
    },
  };
}

let template: Promise<Blob> | undefined;

/**
 * A PGlite data directory with every migration applied, as a tarball: built once per set of
 * migration files (and PGlite version) and kept in `.tmp/pglite-templates/`, so each test
 * process reads it instead of building its own. Written to a temporary name and renamed, so
 * test files started together never read half a file.
 */
function pgliteTemplate(): Promise<Blob> {
  template ??= (async () => {
    const dir = path.join(ROOT, 'migrations');
    const hash = createHash('sha256');
    hash.update(readFileSync(path.join(ROOT, 'node_modules/@electric-sql/pglite/package.json')));
    for (const file of readdirSync(dir).sort()) hash.update(file).update(readFileSync(path.join(dir, file)));
    const cacheDir = path.join(ROOT, '.tmp', 'pglite-templates');
    const file = path.join(cacheDir, `${hash.digest('hex').slice(0, 16)}.tar`);
    try {
      return new Blob([readFileSync(file)]);
    } catch {
      // Not built yet: build it below.
    }
    const handle = await openDatabase({ dataDir: 'memory://' });
    try {
      await migrateToLatest(handle.db);
      const image = await handle.pglite!.dumpDataDir('none');
      mkdirSync(cacheDir, { recursive: true });
      const partial = `${file}.${process.pid}.${randomBytes(4).toString('hex')}`;
      writeFileSync(partial, Buffer.from(await image.arrayBuffer()));
      renameSync(partial, file);
      return image;
    } finally {
      await handle.close();
    }
  })();
  return template;
}

/** Which database the suite runs on, for test names and skips. */
export const DATABASE_KIND = process.env.DATABASE_URL ? 'postgres' : 'pglite';

/**
 * For `fleethub serve` processes on PostgreSQL: a fresh database of their own (a server process
 * knows no schema setting, and its migrations keep their bookkeeping in `public`), as a URL, and
 * `drop()`. Undefined on PGlite (the processes use their data directory).
 */
export async function createProcessDatabase(
  prefix: string,
): Promise<{ url: string; drop: () => Promise<void> } | undefined> {
  const admin = process.env.DATABASE_URL;
  if (!admin) return undefined;
  const query = async (text: string) => {
    const client = new pg.Client({ connectionString: admin });
    await client.connect();
    try {
      await client.query(text);
    } finally {
      await client.end();
    }
  };
  const name = `t_${prefix}_${randomBytes(6).toString('hex')}`;
  await query(`CREATE DATABASE ${name}`);
  const url = new URL(admin);
  url.pathname = `/${name}`;
  return { url: url.toString(), drop: () => query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`) };
}
