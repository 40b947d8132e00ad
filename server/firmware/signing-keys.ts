import type { ColumnType, Generated, Selectable } from 'kysely';
import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import { parseSigningPublicKey } from './signing.ts';

declare module '../db/schema.ts' {
  interface Database {
    product_signing_keys: ProductSigningKeysTable;
  }
}

export interface ProductSigningKeysTable {
  id: Generated<string>;
  product_id: string;
  name: string;
  public_key_pem: string;
  fingerprint: string;
  created_at: ColumnType<Date, Date | string | undefined, never>;
}

export type ProductSigningKey = Selectable<ProductSigningKeysTable>;

export class SigningKeyError extends Error {
  constructor(
    readonly code: 'SIGNING_KEY_EXISTS' | 'SIGNING_KEY_NOT_FOUND' | 'PRODUCT_NOT_FOUND',
    message: string,
  ) {
    super(message);
    this.name = 'SigningKeyError';
  }
}

/** Registers an ed25519 public key firmware of `productId` may be signed with. */
export async function addSigningKey(
  db: Db,
  actor: Actor,
  productId: string,
  input: { name: string; publicKeyPem: string },
): Promise<ProductSigningKey> {
  const key = parseSigningPublicKey(input.publicKeyPem);
  return db.transaction().execute(async (trx) => {
    const product = await trx
      .selectFrom('products')
      .select(['id', 'org_id'])
      .where('id', '=', productId)
      .executeTakeFirst();
    if (!product) throw new SigningKeyError('PRODUCT_NOT_FOUND', `product ${productId} does not exist`);
    const clash = await trx
      .selectFrom('product_signing_keys')
      .select(['name', 'fingerprint'])
      .where('product_id', '=', productId)
      .where((eb) => eb.or([eb('name', '=', input.name), eb('fingerprint', '=', key.fingerprint)]))
      .executeTakeFirst();
    if (clash) {
      throw new SigningKeyError(
        'SIGNING_KEY_EXISTS',
        clash.fingerprint === key.fingerprint
          ? `this key is already registered for the product as "${clash.name}"`
          : `a signing key named "${input.name}" already exists; pick another name or remove it first`,
      );
    }
    const row = await trx
      .insertInto('product_signing_keys')
      .values({ product_id: productId, name: input.name, public_key_pem: key.pem, fingerprint: key.fingerprint })
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId: product.org_id,
      action: 'signing_key.add',
      resourceType: 'product',
      resourceId: productId,
      details: { name: row.name, fingerprint: row.fingerprint },
    });
    return row;
  });
}

/** The product's signing keys, oldest first. */
export async function listSigningKeys(db: Db, productId: string): Promise<ProductSigningKey[]> {
  return db
    .selectFrom('product_signing_keys')
    .selectAll()
    .where('product_id', '=', productId)
    .orderBy('created_at')
    .orderBy('name')
    .execute();
}

/** Removes one key (by id or name); SIGNING_KEY_NOT_FOUND when the product has no such key. */
export async function removeSigningKey(
  db: Db,
  actor: Actor,
  productId: string,
  idOrName: string,
): Promise<ProductSigningKey> {
  return db.transaction().execute(async (trx) => {
    const isUuid = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(idOrName);
    const row = await trx
      .deleteFrom('product_signing_keys')
      .where('product_id', '=', productId)
      .where(isUuid ? 'id' : 'name', '=', idOrName)
      .returningAll()
      .executeTakeFirst();
    if (!row)
      throw new SigningKeyError(
        'SIGNING_KEY_NOT_FOUND',
        `the product has no signing key ${JSON.stringify(idOrName)}; list them with "fleethub firmware keys list"`,
      );
    const product = await trx.selectFrom('products').select('org_id').where('id', '=', productId).executeTakeFirst();
    await audit(trx, actor, {
      orgId: product?.org_id ?? null,
      action: 'signing_key.remove',
      resourceType: 'product',
      resourceId: productId,
      details: { name: row.name, fingerprint: row.fingerprint },
    });
    return row;
  });
}

/** PEMs of every key a signature for `productId` may verify against. */
export async function signingKeyPems(db: Db, productId: string): Promise<string[]> {
  const rows = await db
    .selectFrom('product_signing_keys')
    .select('public_key_pem')
    .where('product_id', '=', productId)
    .execute();
  return rows.map((r) => r.public_key_pem);
}
