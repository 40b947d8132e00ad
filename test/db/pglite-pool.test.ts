import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { Kysely, PostgresDialect, sql } from 'kysely';
import { PGlitePool } from '../../server/db/pglite-pool.ts';

// The embedded database's pool runs data statements as named prepared statements; these specify
// that this is invisible to callers (PGlite in memory, whatever DATABASE_URL says).
interface TestDb {
  items: { id: number; name: string; size: number | null };
}

let pool: PGlitePool;
let db: Kysely<TestDb>;

before(async () => {
  pool = await PGlitePool.open('memory://');
  db = new Kysely<TestDb>({ dialect: new PostgresDialect({ pool }) });
  await sql`CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, size int8)`.execute(db);
});
after(async () => {
  await db.destroy();
});

const prepared = async () =>
  Number((await pool.pglite.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_prepared_statements')).rows[0]!.n);

describe('PGlite pool: prepared data statements', () => {
  test('rows, parameters and affected-row counts are those of a plain query', async () => {
    for (let i = 1; i <= 20; i++)
      await db
        .insertInto('items')
        .values({ id: i, name: `item-${i}`, size: i * 1000 })
        .execute();
    const viaPool = await db.selectFrom('items').selectAll().where('id', '<=', 5).orderBy('id').execute();
    const plain = await pool.pglite.query('SELECT * FROM items WHERE id <= $1 ORDER BY id', [5]);
    assert.deepEqual(viaPool, plain.rows);
    assert.equal(typeof viaPool[0]!.size, 'number', 'int8 parsed as a number as configured');
    const updated = await db
      .updateTable('items')
      .set({ name: 'renamed' })
      .where('id', 'in', [1, 2, 3])
      .executeTakeFirst();
    assert.equal(updated.numUpdatedRows, 3n);
    const none = await db.updateTable('items').set({ name: 'x' }).where('id', '=', -1).executeTakeFirst();
    assert.equal(none.numUpdatedRows, 0n);
    const nulls = await db
      .selectFrom('items')
      .select('id')
      .where(sql<boolean>`${null}::text IS NULL`)
      .where('id', '=', 4)
      .execute();
    assert.deepEqual(nulls, [{ id: 4 }]);
    const arrays = await sql<{ id: number }>`SELECT id FROM items WHERE id = ANY(${[6, 7]}::int[]) ORDER BY id`.execute(
      db,
    );
    assert.deepEqual(arrays.rows, [{ id: 6 }, { id: 7 }]);
  });

  test('the same text is prepared once and reused', async () => {
    const before = await prepared();
    for (let i = 1; i <= 10; i++) await db.selectFrom('items').select('name').where('id', '=', i).execute();
    assert.equal(await prepared(), before + 1);
  });

  test('errors keep their SQLSTATE, and a failed statement aborts its transaction as usual', async () => {
    await assert.rejects(
      db.insertInto('items').values({ id: 1, name: 'dup' }).execute(),
      (e: unknown) => (e as { code?: string }).code === '23505',
    );
    await assert.rejects(
      db.transaction().execute(async (trx) => {
        await trx.insertInto('items').values({ id: 100, name: 'in-tx' }).execute();
        await trx.insertInto('items').values({ id: 1, name: 'dup' }).execute();
      }),
      (e: unknown) => (e as { code?: string }).code === '23505',
    );
    assert.equal((await db.selectFrom('items').select('id').where('id', '=', 100).execute()).length, 0, 'rolled back');
    assert.equal(
      (await db.selectFrom('items').select('id').where('id', '=', 2).execute()).length,
      1,
      'the connection still works',
    );
  });

  test('a schema change through the pool drops cached plans, so the same text sees the new shape', async () => {
    const query = () => sql<Record<string, unknown>>`SELECT * FROM items WHERE id = ${5}`.execute(db);
    assert.deepEqual(Object.keys((await query()).rows[0]!), ['id', 'name', 'size']);
    await sql`ALTER TABLE items ADD COLUMN color text DEFAULT 'red'`.execute(db);
    assert.deepEqual((await query()).rows[0], { id: 5, name: 'item-5', size: 5000, color: 'red' });
  });

  test('more distinct statements than the cache holds keep working, with a bounded number prepared', async () => {
    for (let i = 0; i < 300; i++) {
      const rows = await sql<{
        n: number;
      }>`SELECT ${sql.lit(i)}::int AS n, count(*)::int AS c FROM items WHERE id > ${0}`.execute(db);
      assert.equal(rows.rows[0]!.n, i);
    }
    assert.ok((await prepared()) <= 256, 'least recently used statements are closed');
  });
});
