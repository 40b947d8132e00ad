import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { sql } from 'kysely';
import { analyzeChangedTables } from '../../server/db/analyze.ts';
import type { DatabaseHandle } from '../../server/db/index.ts';
import { createTestDatabase } from '../helpers/db.ts';
import { until } from '../helpers/until.ts';

// PGlite has no autovacuum: fleethub analyzes the tables a bulk change touched, so the planner
// sees thousands of devices as thousands, not as the empty table the migrations made.
let handle: DatabaseHandle;
before(async () => {
  handle = await createTestDatabase();
});
after(() => handle.close());

async function estimatedRows(): Promise<number> {
  const { rows } = await sql<{ 'QUERY PLAN': string }>`EXPLAIN SELECT * FROM devices`.execute(handle.db);
  return Number(/rows=(\d+)/.exec(rows[0]!['QUERY PLAN'])![1]);
}

// PostgreSQL runs autovacuum itself; startAutoAnalyze does nothing there.
test('a bulk insert of devices is analyzed on PGlite', { skip: Boolean(process.env.DATABASE_URL) }, async () => {
  const { id: orgId } = await handle.db
    .insertInto('orgs')
    .values({ name: `analyze-${Date.now()}` })
    .returning('id')
    .executeTakeFirstOrThrow();
  const { id: productId } = await handle.db
    .insertInto('products')
    .values({ org_id: orgId, name: 'p' })
    .returning('id')
    .executeTakeFirstOrThrow();
  await handle.db
    .insertInto('devices')
    .values(Array.from({ length: 3000 }, (_, i) => ({ org_id: orgId, product_id: productId, identifier: `d-${i}` })))
    .execute();
  // The statistics of the insert reach pg_stat_user_tables a moment after it.
  const analyzed = await until(async () => {
    const tables = await analyzeChangedTables(handle);
    return tables.includes('devices') && tables;
  }, 'devices among the analyzed tables');
  assert.ok(analyzed.includes('devices'));
  const estimate = await estimatedRows();
  assert.ok(estimate >= 2900 && estimate <= 3100, `planner estimates ${estimate} devices`);
  // Nothing changed since: nothing to analyze.
  assert.deepEqual(await analyzeChangedTables(handle), []);
});
