import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { DeviceCertificate } from '../db/schema.ts';
import { IdentityError, parseCertificatePem } from './certificate.ts';
import { inTransaction } from './signer-cas.ts';

/** A certificate registered to a device; the device is whoever presents it over mutual TLS. */
export interface DeviceCertificateRecord {
  id: string;
  deviceId: string;
  fingerprint: string;
  serial: string;
  subject: string;
  issuer: string;
  notBefore: Date;
  notAfter: Date;
  pem: string | null;
  revokedAt: Date | null;
  lastUsedAt: Date | null;
  createdAt: Date;
}

/** Registers a certificate (PEM, RSA or EC) to an existing device; audited. */
export async function addDeviceCertificate(db: Db, actor: Actor, deviceId: string, pem: string): Promise<DeviceCertificateRecord> {
  const cert = parseCertificatePem(pem, 'device certificate');
  if (cert.isCa) {
    throw new IdentityError('invalid', `"${cert.subject}" is a CA certificate; register it as a signer CA instead of a device certificate`);
  }
  return inTransaction(db, async (trx) => {
    const device = await trx.selectFrom('devices').select(['id', 'org_id']).where('id', '=', deviceId).executeTakeFirst();
    if (!device) throw new IdentityError('not_found', `device ${deviceId} does not exist`);
    const inserted = await trx
      .insertInto('device_certificates')
      .values({
        device_id: deviceId,
        fingerprint_sha256: cert.fingerprint,
        serial: cert.serialNumber,
        subject: cert.subject,
        issuer: cert.issuer,
        not_before: cert.notBefore,
        not_after: cert.notAfter,
        pem: cert.pem,
      })
      .onConflict((oc) => oc.column('fingerprint_sha256').doNothing())
      .returningAll()
      .executeTakeFirst();
    if (!inserted) {
      const owner = await trx.selectFrom('device_certificates').select(['device_id']).where('fingerprint_sha256', '=', cert.fingerprint).executeTakeFirst();
      throw new IdentityError('conflict', `certificate sha256 ${cert.fingerprint} is already registered to device ${owner?.device_id ?? '(unknown)'}; a certificate identifies one device`, {
        fingerprint: cert.fingerprint,
        device_id: owner?.device_id,
      });
    }
    await audit(trx, actor, {
      orgId: device.org_id,
      action: 'device_certificate.added',
      resourceType: 'device',
      resourceId: deviceId,
      details: { certificate_id: inserted.id, fingerprint: cert.fingerprint, subject: cert.subject, issuer: cert.issuer },
    });
    return toRecord(inserted);
  });
}

/** A device's certificates, newest first. */
export async function listDeviceCertificates(db: Db, deviceId: string): Promise<DeviceCertificateRecord[]> {
  const rows = await db
    .selectFrom('device_certificates')
    .selectAll()
    .where('device_id', '=', deviceId)
    .orderBy('created_at', 'desc')
    .orderBy('id')
    .execute();
  return rows.map(toRecord);
}

/**
 * Revokes a certificate: the next connection presenting it is refused with 403. Idempotent (a
 * second call keeps the first revocation time); audited once. `scope.orgId` limits it to an org.
 */
export async function revokeDeviceCertificate(db: Db, actor: Actor, id: string, scope: { orgId?: string } = {}): Promise<DeviceCertificateRecord> {
  return inTransaction(db, async (trx) => {
    let query = trx
      .selectFrom('device_certificates')
      .innerJoin('devices', 'devices.id', 'device_certificates.device_id')
      .selectAll('device_certificates')
      .select(['devices.org_id'])
      .where('device_certificates.id', '=', id);
    if (scope.orgId) query = query.where('devices.org_id', '=', scope.orgId);
    const found = await query.executeTakeFirst();
    if (!found) throw new IdentityError('not_found', `device certificate ${id} does not exist`);
    if (found.revoked_at) return toRecord(found);
    const revoked = await trx
      .updateTable('device_certificates')
      .set({ revoked_at: new Date() })
      .where('id', '=', id)
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId: found.org_id,
      action: 'device_certificate.revoked',
      resourceType: 'device',
      resourceId: found.device_id,
      details: { certificate_id: id, fingerprint: found.fingerprint_sha256, subject: found.subject },
    });
    return toRecord(revoked);
  });
}

export function toRecord(row: DeviceCertificate): DeviceCertificateRecord {
  return {
    id: row.id,
    deviceId: row.device_id,
    fingerprint: row.fingerprint_sha256,
    serial: row.serial,
    subject: row.subject,
    issuer: row.issuer,
    notBefore: row.not_before,
    notAfter: row.not_after,
    pem: row.pem,
    revokedAt: row.revoked_at,
    lastUsedAt: row.last_used_at,
    createdAt: row.created_at,
  };
}
