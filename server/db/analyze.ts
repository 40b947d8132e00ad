import { sql } from 'kysely';
import type { Logger } from 'pino';
import type { DatabaseHandle } from './index.ts';

/**
 * PGlite has no autovacuum daemon, so nothing ever runs ANALYZE: the planner keeps the row
 * counts of the empty tables the migrations created and, once devices number in thousands,
 * picks nested loops over whole tables (a 2,000-member retarget spent 1.4 s of 1.5 s scanning
 * `devices` once per member). This analyzes, as autovacuum would, every table whose rows changed
 * by more than 50 + 10 % since it was last analyzed. Returns the tables analyzed.
 */
export async function analyzeChangedTables(handle: DatabaseHandle): Promise<string[]> {
  const { rows } = await sql<{ schema: string; name: string }>`
    SELECT s.schemaname AS schema, s.relname AS name
    FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
    WHERE s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0)
      AND s.schemaname = coalesce(${handle.schema ?? null}::text, current_schema())
    ORDER BY s.relname`.execute(handle.db);
  for (const { schema, name } of rows) await sql`ANALYZE ${sql.table(`${schema}.${name}`)}`.execute(handle.db);
  return rows.map((r) => r.name);
}

/**
 * On PGlite: analyzes the changed tables now (after the migrations: a restarted server plans
 * with its tables' real sizes) and, when `intervalMs` is given, every `intervalMs` (PGlite's
 * statistics lag a second or so behind writes, so a bulk change is analyzed at the next check).
 * The server does not check periodically: on the bench, a check every 10 s made a 2,000-retarget
 * 2× faster but the connect storm 3× slower (12 against 39 connects/s), cause not found yet.
 * PostgreSQL runs its own autovacuum: nothing to do. Returns a function that stops the checks.
 */
export async function startAutoAnalyze(
  handle: DatabaseHandle,
  log: Logger,
  intervalMs?: number,
): Promise<() => Promise<void>> {
  if (handle.kind !== 'pglite') return async () => {};
  const run = async () => {
    const tables = await analyzeChangedTables(handle);
    if (tables.length) log.debug({ tables }, 'analyzed changed tables');
  };
  await run();
  if (!intervalMs) return async () => {};
  let running: Promise<void> | undefined;
  const timer = setInterval(() => {
    running ??= run()
      .catch((err: unknown) => log.warn({ err }, 'could not analyze changed tables'))
      .finally(() => {
        running = undefined;
      });
  }, intervalMs);
  timer.unref();
  return async () => {
    clearInterval(timer);
    await running;
  };
}
