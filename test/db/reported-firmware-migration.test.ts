import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { DatabaseHandle } from '../../server/db/index.ts';
import { migrateToLatest, migrator } from '../../server/db/migrate.ts';
import { createTestDatabase, DATABASE_KIND } from '../helpers/db.ts';

const MIGRATION = '2026-12-01-100-reported-firmware';

/** Migration 100 on data the old joins and edge reports left behind. */
describe(`migration ${MIGRATION} (${DATABASE_KIND})`, () => {
  let handle: DatabaseHandle;
  before(async () => {
    handle = await createTestDatabase();
    const names = (await migrator(handle.db, handle.schema).getMigrations()).map((m) => m.name);
    const previous = names[names.indexOf(MIGRATION) - 1]!;
    const { error } = await migrator(handle.db, handle.schema).migrateTo(previous);
    if (error) throw error;
  });
  after(async () => {
    await handle?.close();
  });

  test("deletes firmware rows devices created that nothing references, keeps the rest, and clears edge devices' links to them", async () => {
    const db = handle.db;
    const org = await db.insertInto('orgs').values({ name: 'legacy' }).returning('id').executeTakeFirstOrThrow();
    const product = await db
      .insertInto('products')
      .values({ org_id: org.id, name: 'legacy' })
      .returning('id')
      .executeTakeFirstOrThrow();
    const fw = async (version: string, hasBlob: boolean, metadata: Record<string, unknown>) =>
      (
        await db
          .insertInto('firmware')
          .values({
            org_id: org.id,
            product_id: product.id,
            version,
            has_blob: hasBlob,
            metadata: JSON.stringify(metadata),
            ...(hasBlob ? { sha256: 'a'.repeat(64), size: 1 } : {}),
          })
          .returning('id')
          .executeTakeFirstOrThrow()
      ).id;
    const joined = await fw('0.1.0', false, { reported_by: 'x' });
    const edgeReported = await fw('0.2.0', false, { reported_by: 'y', protocol: 'wifidogx' });
    const inHistory = await fw('0.3.0', false, { reported_by: 'z' });
    const uploaded = await fw('1.0.0', true, {});
    const metadataOnly = await fw('1.1.0', false, {});

    const phoenix = await db
      .insertInto('devices')
      .values({
        org_id: org.id,
        product_id: product.id,
        identifier: 'p',
        firmware_uuid: joined,
        firmware_version: '0.1.0',
      })
      .returning('id')
      .executeTakeFirstOrThrow();
    const gateway = await db
      .insertInto('devices')
      .values({
        org_id: org.id,
        product_id: product.id,
        identifier: 'g',
        protocol: 'wifidogx',
        firmware_uuid: edgeReported,
        firmware_version: '0.2.0',
      })
      .returning('id')
      .executeTakeFirstOrThrow();
    await db
      .insertInto('device_components')
      .values([
        { device_id: phoenix.id, component: 'firmware', version: '0.1.0', firmware_id: joined },
        { device_id: gateway.id, component: 'firmware', version: '1.0.0', firmware_id: uploaded },
      ])
      .execute();
    await db
      .insertInto('update_attempts')
      .values({
        org_id: org.id,
        device_id: phoenix.id,
        firmware_id: inHistory,
        to_version: '0.3.0',
        state: 'cancelled',
      })
      .execute();

    await migrateToLatest(db, handle.schema);

    const left = (await db.selectFrom('firmware').select('id').where('org_id', '=', org.id).execute())
      .map((r) => r.id)
      .sort();
    assert.deepEqual(left, [inHistory, uploaded, metadataOnly].sort());
    const devices = await db
      .selectFrom('devices')
      .select(['identifier', 'firmware_uuid', 'firmware_version'])
      .where('org_id', '=', org.id)
      .orderBy('identifier')
      .execute();
    assert.deepEqual(devices, [
      { identifier: 'g', firmware_uuid: null, firmware_version: '0.2.0' },
      { identifier: 'p', firmware_uuid: joined, firmware_version: '0.1.0' },
    ]);
    const components = await db
      .selectFrom('device_components')
      .select(['device_id', 'firmware_id', 'audited_firmware_id'])
      .where('device_id', 'in', [phoenix.id, gateway.id])
      .execute();
    assert.deepEqual(
      components.find((c) => c.device_id === phoenix.id),
      { device_id: phoenix.id, firmware_id: null, audited_firmware_id: null },
    );
    assert.deepEqual(
      components.find((c) => c.device_id === gateway.id),
      { device_id: gateway.id, firmware_id: uploaded, audited_firmware_id: uploaded },
    );
  });
});
