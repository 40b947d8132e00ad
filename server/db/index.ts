import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { Kysely, PostgresDialect, type PostgresPool, sql } from 'kysely';
import pg from 'pg';
import type { Database } from './schema.ts';
import { lockDataDir } from './data-dir-lock.ts';
import { PGlitePool } from './pglite-pool.ts';

// Same JavaScript types on both databases: int8 (counts, bigserial ids) and numeric as numbers.
pg.types.setTypeParser(pg.types.builtins.INT8, (v) => Number(v));
pg.types.setTypeParser(pg.types.builtins.NUMERIC, (v) => Number(v));

export type Db = Kysely<Database>;

export interface DatabaseOptions {
  /** `postgres://...` to use PostgreSQL; absent to use embedded PGlite. */
  databaseUrl?: string;
  /** Directory for PGlite's files (`<dataDir>/pglite`); `memory://` keeps it in memory. */
  dataDir: string;
  /** PostgreSQL schema to use (created when missing); tests use one per run. */
  schema?: string;
  /** Pool size for PostgreSQL. */
  poolSize?: number;
  /**
   * A PGlite data directory as a tarball (`dumpDataDir`) to start an in-memory database from,
   * instead of creating an empty one: tests start from a migrated template.
   */
  pgliteImage?: Blob;
}

export interface DatabaseHandle {
  db: Db;
  kind: 'postgres' | 'pglite';
  /** A `pg` connection string for LISTEN/NOTIFY, when running on PostgreSQL. */
  databaseUrl?: string;
  schema?: string;
  /** The PGlite instance, when embedded (it supports LISTEN/NOTIFY in-process). */
  pglite?: PGlitePool['pglite'];
  /** Set `onWait` to be told how long each query waited for a pooled connection (metrics). */
  poolObserver: PoolObserver;
  close(): Promise<void>;
}

export interface PoolObserver {
  onWait?: (seconds: number) => void;
}

/** The pool as Kysely sees it, timing every wait for a connection. */
function timedPool(pool: PostgresPool, observer: PoolObserver): PostgresPool {
  return {
    async connect() {
      const startedAt = performance.now();
      const client = await pool.connect();
      observer.onWait?.((performance.now() - startedAt) / 1000);
      return client;
    },
    end: () => pool.end(),
  };
}

/** Opens the database chosen by configuration: `pg` when a URL is given, PGlite otherwise. */
export async function openDatabase(options: DatabaseOptions): Promise<DatabaseHandle> {
  if (options.databaseUrl) {
    const schema = options.schema;
    if (schema) {
      // Create the schema on a throwaway connection so every pooled connection can use it.
      const client = new pg.Client({ connectionString: options.databaseUrl });
      await client.connect();
      try {
        await client.query(`CREATE SCHEMA IF NOT EXISTS ${quoteIdent(schema)}`);
      } finally {
        await client.end();
      }
    }
    const pool = new pg.Pool({
      connectionString: options.databaseUrl,
      max: options.poolSize ?? 10,
      ...(schema ? { options: `-c search_path=${schema}` } : {}),
    });
    const poolObserver: PoolObserver = {};
    const db = new Kysely<Database>({ dialect: new PostgresDialect({ pool: timedPool(pool, poolObserver) }) });
    return {
      db,
      kind: 'postgres',
      databaseUrl: options.databaseUrl,
      schema,
      poolObserver,
      close: () => db.destroy(),
    };
  }
  if (options.dataDir === 'memory://') {
    const pool = await PGlitePool.open('memory://', options.pgliteImage);
    const poolObserver: PoolObserver = {};
    const db = new Kysely<Database>({ dialect: new PostgresDialect({ pool: timedPool(pool, poolObserver) }) });
    return { db, kind: 'pglite', pglite: pool.pglite, poolObserver, close: () => db.destroy() };
  }
  const dir = path.join(options.dataDir, 'pglite');
  mkdirSync(dir, { recursive: true });
  const unlock = await lockDataDir(dir);
  try {
    const pool = await PGlitePool.open(dir);
    const poolObserver: PoolObserver = {};
    const db = new Kysely<Database>({ dialect: new PostgresDialect({ pool: timedPool(pool, poolObserver) }) });
    return {
      db,
      kind: 'pglite',
      pglite: pool.pglite,
      poolObserver,
      async close() {
        try {
          await db.destroy();
        } finally {
          await unlock();
        }
      },
    };
  } catch (err) {
    await unlock();
    throw err;
  }
}

/** Drops a schema created for a test run (PostgreSQL only). */
export async function dropSchema(databaseUrl: string, schema: string): Promise<void> {
  const client = new pg.Client({ connectionString: databaseUrl });
  await client.connect();
  try {
    await client.query(`DROP SCHEMA IF EXISTS ${quoteIdent(schema)} CASCADE`);
  } finally {
    await client.end();
  }
}

function quoteIdent(name: string): string {
  if (!/^[a-z_][a-z0-9_]*$/i.test(name)) throw new Error(`invalid schema name ${JSON.stringify(name)}`);
  return `"${name}"`;
}

export { sql };
