import { X509Certificate } from 'node:crypto';
import { audit, type Actor } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { DeviceCertificate } from '../db/schema.ts';
import { IdentityError, parseCertificatePem, type ParsedCertificate } from './certificate.ts';
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

/**
 * Registers a certificate (PEM, RSA or EC) to an existing device; audited. A certificate belongs
 * to the org of its issuer: it must be signed by one of the device's org's (unexpired) signer
 * CAs, so no org can claim a device certificate another org's CA issued. A certificate already
 * registered answers `conflict`, naming its device only when that device is in the same org.
 */
export async function addDeviceCertificate(
  db: Db,
  actor: Actor,
  deviceId: string,
  pem: string,
): Promise<DeviceCertificateRecord> {
  const cert = parseCertificatePem(pem, 'device certificate');
  if (cert.isCa) {
    throw new IdentityError(
      'invalid',
      `"${cert.subject}" is a CA certificate; register it as a signer CA instead of a device certificate`,
    );
  }
  return inTransaction(db, async (trx) => {
    const device = await trx
      .selectFrom('devices')
      .select(['id', 'org_id'])
      .where('id', '=', deviceId)
      .executeTakeFirst();
    if (!device) throw new IdentityError('not_found', `device ${deviceId} does not exist`);
    const issuer = await issuingSignerCa(trx, device.org_id, cert);
    if (!issuer) {
      // One answer for "unknown issuer" and "another org's issuer": no oracle for other orgs' CAs.
      throw new IdentityError(
        'invalid',
        `certificate "${cert.subject}" (issuer "${cert.issuer}") was not issued by a signer CA of this organization; register the CA that signs your devices' certificates first (POST /api/v1/orgs/:org/signer-cas)`,
        { field: 'pem' },
      );
    }
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
    if (!inserted) throw await alreadyRegistered(trx, device.org_id, cert.fingerprint);
    await audit(trx, actor, {
      orgId: device.org_id,
      action: 'device_certificate.added',
      resourceType: 'device',
      resourceId: deviceId,
      details: {
        certificate_id: inserted.id,
        fingerprint: cert.fingerprint,
        subject: cert.subject,
        issuer: cert.issuer,
        signer_ca_id: issuer.id,
      },
    });
    return toRecord(inserted);
  });
}

/** The signer CA of `orgId` that signed `cert` (issuer name and signature both checked), if any. */
async function issuingSignerCa(db: Db, orgId: string, cert: ParsedCertificate): Promise<{ id: string } | undefined> {
  const cas = await db
    .selectFrom('signer_cas')
    .select(['id', 'pem'])
    .where('org_id', '=', orgId)
    .where('not_after', '>', new Date())
    .execute();
  return cas.find((ca) => {
    const x509 = new X509Certificate(ca.pem);
    return cert.x509.checkIssued(x509) && cert.x509.verify(x509.publicKey);
  });
}

/** The `conflict` for a certificate registered already: the device is named only within the caller's org. */
async function alreadyRegistered(db: Db, orgId: string, fingerprint: string): Promise<IdentityError> {
  const owner = await db
    .selectFrom('device_certificates')
    .innerJoin('devices', 'devices.id', 'device_certificates.device_id')
    .select(['devices.id', 'devices.org_id', 'devices.identifier'])
    .where('device_certificates.fingerprint_sha256', '=', fingerprint)
    .executeTakeFirst();
  if (owner?.org_id === orgId) {
    return new IdentityError(
      'conflict',
      `certificate sha256 ${fingerprint} is already registered to device ${owner.identifier} (${owner.id}); a certificate identifies one device`,
      {
        fingerprint,
        device_id: owner.id,
      },
    );
  }
  return new IdentityError(
    'conflict',
    `certificate sha256 ${fingerprint} is already registered to another device; a certificate identifies one device, issue this device its own`,
    { fingerprint },
  );
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
export async function revokeDeviceCertificate(
  db: Db,
  actor: Actor,
  id: string,
  scope: { orgId?: string } = {},
): Promise<DeviceCertificateRecord> {
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
