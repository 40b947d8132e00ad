import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { SignerCa } from '../db/schema.ts';
import { IdentityError, parseCertificatePem } from './certificate.ts';

/** A registered signer CA: devices whose certificate it signed are registered just in time. */
export interface SignerCaRecord {
  id: string;
  orgId: string;
  productId: string;
  fingerprint: string;
  subject: string;
  pem: string;
  notAfter: Date;
  description: string | null;
  createdAt: Date;
}

export interface AddSignerCaInput {
  orgId: string;
  productId: string;
  pem: string;
  description?: string;
}

type SignerCasListener = () => void | Promise<void>;
const listeners = new Set<SignerCasListener>();

/**
 * Calls `listener` after a signer CA is added or removed in this process, so TLS listeners can
 * refresh their trust store; `addSignerCa`/`removeSignerCa` resolve once every listener has.
 * Returns the unsubscribe function. (Other nodes will learn through PubSub.)
 */
export function onSignerCasChanged(listener: SignerCasListener): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/** Tells subscribers the set of signer CAs changed (also for callers relaying a PubSub message). */
export async function notifySignerCasChanged(): Promise<void> {
  // A failing subscriber must not fail the operator's request nor starve the other subscribers;
  // subscribers log their own failures.
  await Promise.allSettled([...listeners].map(async (listener) => listener()));
}

/**
 * Registers a CA certificate for an org's product after checking it is a CA; audited.
 * Subscribers are notified after commit; inside a caller's transaction, the caller calls
 * `notifySignerCasChanged()` once it has committed. The same holds for `removeSignerCa`.
 */
export async function addSignerCa(db: Db, actor: Actor, input: AddSignerCaInput): Promise<SignerCaRecord> {
  const cert = parseCertificatePem(input.pem, 'signer CA');
  if (!cert.isCa) {
    throw new IdentityError(
      'invalid',
      `"${cert.subject}" is not a CA certificate (basicConstraints CA:TRUE is required); upload the CA that signs device certificates, not a device certificate`,
    );
  }
  if (cert.notAfter.getTime() <= Date.now()) {
    throw new IdentityError(
      'invalid',
      `signer CA "${cert.subject}" expired on ${cert.notAfter.toISOString()}; upload a valid CA certificate`,
    );
  }
  const product = await db
    .selectFrom('products')
    .select(['id'])
    .where('id', '=', input.productId)
    .where('org_id', '=', input.orgId)
    .executeTakeFirst();
  if (!product) {
    throw new IdentityError('not_found', `product ${input.productId} does not exist in org ${input.orgId}`);
  }
  const row = await inTransaction(db, async (trx) => {
    const inserted = await trx
      .insertInto('signer_cas')
      .values({
        org_id: input.orgId,
        product_id: input.productId,
        fingerprint_sha256: cert.fingerprint,
        subject: cert.subject,
        pem: cert.pem,
        not_after: cert.notAfter,
        description: input.description ?? null,
      })
      .onConflict((oc) => oc.column('fingerprint_sha256').doNothing())
      .returningAll()
      .executeTakeFirst();
    if (!inserted) {
      throw new IdentityError(
        'conflict',
        `signer CA "${cert.subject}" (sha256 ${cert.fingerprint}) is already registered; remove it first to move it to another product`,
        {
          fingerprint: cert.fingerprint,
        },
      );
    }
    await audit(trx, actor, {
      orgId: input.orgId,
      action: 'signer_ca.added',
      resourceType: 'signer_ca',
      resourceId: inserted.id,
      details: { fingerprint: cert.fingerprint, subject: cert.subject, product_id: input.productId },
    });
    return inserted;
  });
  if (!db.isTransaction) await notifySignerCasChanged();
  return toRecord(row);
}

/** Signer CAs, optionally of one org and/or product, oldest first. */
export async function listSignerCas(
  db: Db,
  filter: { orgId?: string; productId?: string } = {},
): Promise<SignerCaRecord[]> {
  let query = db.selectFrom('signer_cas').selectAll().orderBy('created_at').orderBy('id');
  if (filter.orgId) query = query.where('org_id', '=', filter.orgId);
  if (filter.productId) query = query.where('product_id', '=', filter.productId);
  return (await query.execute()).map(toRecord);
}

/**
 * Removes a signer CA (within `scope.orgId` when given); audited. Devices it registered keep
 * their certificate rows, but the TLS layer stops trusting the CA at the next refresh.
 */
export async function removeSignerCa(
  db: Db,
  actor: Actor,
  id: string,
  scope: { orgId?: string } = {},
): Promise<SignerCaRecord> {
  const row = await inTransaction(db, async (trx) => {
    let query = trx.deleteFrom('signer_cas').where('id', '=', id);
    if (scope.orgId) query = query.where('org_id', '=', scope.orgId);
    const deleted = await query.returningAll().executeTakeFirst();
    if (!deleted)
      throw new IdentityError('not_found', `signer CA ${id} does not exist; list them with GET /api/v1/signer-cas`);
    await audit(trx, actor, {
      orgId: deleted.org_id,
      action: 'signer_ca.removed',
      resourceType: 'signer_ca',
      resourceId: deleted.id,
      details: { fingerprint: deleted.fingerprint_sha256, subject: deleted.subject },
    });
    return deleted;
  });
  if (!db.isTransaction) await notifySignerCasChanged();
  return toRecord(row);
}

/** The CA certificates (PEM) the device listener trusts for client certificates. */
export async function trustedCaPems(db: Db): Promise<string[]> {
  const rows = await db
    .selectFrom('signer_cas')
    .select(['pem'])
    .where('not_after', '>', new Date())
    .orderBy('created_at')
    .execute();
  return rows.map((r) => r.pem);
}

/** Runs `fn` in a transaction, or inside the caller's when `db` already is one. */
export async function inTransaction<T>(db: Db, fn: (trx: Db) => Promise<T>): Promise<T> {
  if (db.isTransaction) return fn(db);
  return db.transaction().execute(fn);
}

function toRecord(row: SignerCa): SignerCaRecord {
  return {
    id: row.id,
    orgId: row.org_id,
    productId: row.product_id,
    fingerprint: row.fingerprint_sha256,
    subject: row.subject,
    pem: row.pem,
    notAfter: row.not_after,
    description: row.description,
    createdAt: row.created_at,
  };
}
