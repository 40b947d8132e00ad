import { PGlite, types } from '@electric-sql/pglite';
import type { PostgresPool, PostgresPoolClient, PostgresQueryResult } from 'kysely';

/**
 * Presents embedded PGlite as the small `pg`-style pool that Kysely's own PostgresDialect
 * drives, so both databases go through one dialect and one query compiler.
 *
 * PGlite is a single connection: `connect()` hands it out to one holder at a time (a FIFO
 * queue), which keeps Kysely transactions isolated from concurrent queries.
 */
export class PGlitePool implements PostgresPool {
  readonly #db: PGlite;
  #holder: Promise<void> = Promise.resolve();

  constructor(db: PGlite) {
    this.#db = db;
  }

  /** Opens (creating when missing) a PGlite database in `dataDir`, or in memory for `memory://`. */
  static async open(dataDir: string): Promise<PGlitePool> {
    const db = await PGlite.create(dataDir, {
      // Same JavaScript types as our `pg` set-up: int8 and numeric as numbers.
      parsers: {
        [types.INT8]: (v: string) => Number(v),
        [types.NUMERIC]: (v: string) => Number(v),
      },
    });
    return new PGlitePool(db);
  }

  get pglite(): PGlite {
    return this.#db;
  }

  async connect(): Promise<PostgresPoolClient> {
    let release!: () => void;
    const previous = this.#holder;
    this.#holder = new Promise<void>((resolve) => (release = resolve));
    await previous;
    const db = this.#db;
    let released = false;
    const client = {
      async query(sql: string, parameters: ReadonlyArray<unknown>): Promise<PostgresQueryResult<unknown>> {
        const result = await db.query(sql, parameters as unknown[]);
        return { command: commandOf(sql), rowCount: result.affectedRows ?? result.rows.length, rows: result.rows };
      },
      release() {
        if (released) return;
        released = true;
        release();
      },
    };
    return client as unknown as PostgresPoolClient;
  }

  async end(): Promise<void> {
    await this.#holder;
    if (!this.#db.closed) await this.#db.close();
  }
}

const WRITE = /\b(insert|update|delete|merge)\b/i;

/** The statement kind Kysely uses to decide whether `numAffectedRows` is meaningful. */
function commandOf(sql: string): PostgresQueryResult<unknown>['command'] {
  const first = /^\s*(\w+)/.exec(sql)?.[1]?.toUpperCase();
  if (first === 'INSERT' || first === 'UPDATE' || first === 'DELETE' || first === 'MERGE') return first;
  if (first === 'WITH') {
    const write = WRITE.exec(sql.slice(sql.lastIndexOf(')') + 1))?.[1]?.toUpperCase();
    if (write === 'INSERT' || write === 'UPDATE' || write === 'DELETE' || write === 'MERGE') return write;
  }
  return 'SELECT';
}
