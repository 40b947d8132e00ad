import type { Selectable } from 'kysely';
import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { OrgsTable, ProductsTable } from '../db/schema.ts';
import { inTransaction, type FleetContext } from './context.ts';
import { FleetError, isUniqueViolation, isUuid, notFound, validName } from './errors.ts';

export type Org = Selectable<OrgsTable>;
export type Product = Selectable<ProductsTable>;

/** Creates an organization; `conflict` when the name is taken. */
export async function createOrg(ctx: FleetContext, actor: Actor, input: { name: string }): Promise<Org> {
  const name = validName('organization', input.name);
  try {
    return await inTransaction(ctx, async (trx) => {
      const org = await trx.insertInto('orgs').values({ name }).returningAll().executeTakeFirstOrThrow();
      await audit(trx, actor, {
        orgId: org.id,
        action: 'org.create',
        resourceType: 'org',
        resourceId: org.id,
        details: { name },
      });
      return org;
    });
  } catch (err) {
    if (isUniqueViolation(err))
      throw new FleetError('conflict', `organization ${JSON.stringify(name)} already exists; choose another name`, {
        field: 'name',
      });
    throw err;
  }
}

export async function listOrgs(ctx: FleetContext): Promise<Org[]> {
  return ctx.db.selectFrom('orgs').selectAll().orderBy('name').execute();
}

/** An organization by id or by name. */
export async function getOrg(ctx: FleetContext, ref: string): Promise<Org> {
  const org = await ctx.db
    .selectFrom('orgs')
    .selectAll()
    .where((eb) => (isUuid(ref) ? eb.or([eb('id', '=', ref), eb('name', '=', ref)]) : eb('name', '=', ref)))
    .executeTakeFirst();
  if (!org) throw notFound('organization', ref);
  return org;
}

/** Creates a product in an organization; `requiresSignature` makes uploads without a signature fail. */
export async function createProduct(
  ctx: FleetContext,
  actor: Actor,
  input: { orgId: string; name: string; requiresSignature?: boolean },
): Promise<Product> {
  const name = validName('product', input.name);
  await getOrg(ctx, input.orgId);
  try {
    return await inTransaction(ctx, async (trx) => {
      const product = await trx
        .insertInto('products')
        .values({ org_id: input.orgId, name, requires_signature: input.requiresSignature ?? false })
        .returningAll()
        .executeTakeFirstOrThrow();
      await audit(trx, actor, {
        orgId: input.orgId,
        action: 'product.create',
        resourceType: 'product',
        resourceId: product.id,
        details: { name, requires_signature: product.requires_signature },
      });
      return product;
    });
  } catch (err) {
    if (isUniqueViolation(err))
      throw new FleetError('conflict', `product ${JSON.stringify(name)} already exists in this organization`, {
        field: 'name',
      });
    throw err;
  }
}

export async function listProducts(ctx: FleetContext, orgId: string): Promise<Product[]> {
  return ctx.db.selectFrom('products').selectAll().where('org_id', '=', orgId).orderBy('name').execute();
}

/** A product of `orgId` by id or by name. */
export async function getProduct(ctx: FleetContext, orgId: string, ref: string): Promise<Product> {
  const product = await productQuery(ctx.db, orgId, ref);
  if (!product) throw notFound('product', ref);
  return product;
}

/**
 * A product by org and product (ids or names), resolved once and then cached: where the edges
 * register devices that name no tenant themselves. A failed lookup is not cached.
 */
export function productResolver(ctx: FleetContext, org = 'default', product = 'default'): () => Promise<Product> {
  let cached: Product | undefined;
  return async () => {
    if (cached) return cached;
    const o = await getOrg(ctx, org);
    cached = await getProduct(ctx, o.id, product);
    return cached;
  };
}

/** Longest in-flight timeout a product may set (seconds): 30 days. */
export const MAX_UPDATE_TIMEOUT_S = 30 * 86_400;

export interface ProductPatch {
  requiresSignature?: boolean;
  /** In-flight timeout of update attempts in seconds (60 s to 30 days); null: the server's default. */
  updateTimeoutSeconds?: number | null;
}

/** Changes whether a product's firmware must be signed, and its in-flight update timeout. */
export async function updateProduct(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  productId: string,
  patch: ProductPatch,
): Promise<Product> {
  const product = await getProduct(ctx, orgId, productId);
  const timeout = patch.updateTimeoutSeconds;
  if (
    timeout !== undefined &&
    timeout !== null &&
    (!Number.isInteger(timeout) || timeout < 60 || timeout > MAX_UPDATE_TIMEOUT_S)
  )
    throw new FleetError(
      'invalid',
      `update_timeout_seconds must be an integer from 60 to ${MAX_UPDATE_TIMEOUT_S}, or null`,
      {
        field: 'update_timeout_seconds',
      },
    );
  const set = {
    ...(patch.requiresSignature !== undefined ? { requires_signature: patch.requiresSignature } : {}),
    ...(timeout !== undefined ? { update_timeout_seconds: timeout } : {}),
  };
  if (Object.keys(set).length === 0) return product;
  return inTransaction(ctx, async (trx) => {
    const updated = await trx
      .updateTable('products')
      .set(set)
      .where('id', '=', product.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId,
      action: 'product.update',
      resourceType: 'product',
      resourceId: product.id,
      details: set,
    });
    return updated;
  });
}

function productQuery(db: Db, orgId: string, ref: string): Promise<Product | undefined> {
  if (!isUuid(orgId)) return Promise.resolve(undefined);
  return db
    .selectFrom('products')
    .selectAll()
    .where('org_id', '=', orgId)
    .where((eb) => (isUuid(ref) ? eb.or([eb('id', '=', ref), eb('name', '=', ref)]) : eb('name', '=', ref)))
    .executeTakeFirst();
}
