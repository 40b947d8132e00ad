import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import type { DetailedPeerCertificate } from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { SYSTEM, type Actor } from '../../server/audit.ts';
import type { DatabaseHandle } from '../../server/db/index.ts';
import {
  addDeviceCertificate,
  addSignerCa,
  IdentityError,
  listDeviceCertificates,
  listSignerCas,
  onSignerCasChanged,
  removeSignerCa,
  resolveDeviceIdentity,
  revokeDeviceCertificate,
  trustedCaPems,
} from '../../server/identity/index.ts';
import { createTestDatabase, DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, deviceCertFromCa, getTestPki, otherCa, type PkiMaterial } from '../helpers/pki.ts';

const operator: Actor = { type: 'operator', id: 'op-1' };

/** The shape Node's `getPeerCertificate(true)` gives for a leaf and its chain (only what we read). */
function peerOf(...pems: string[]): DetailedPeerCertificate {
  const certs = pems.map((pem) => ({ raw: new X509Certificate(pem).raw }) as DetailedPeerCertificate);
  for (const [i, c] of certs.entries()) c.issuerCertificate = certs[i + 1] ?? c;
  return certs[0]!;
}

describe(`identity: signer CAs, device certificates, resolution (${DATABASE_KIND})`, () => {
  let handle: DatabaseHandle;
  let pki: PkiMaterial;
  let orgId: string;
  let productId: string;
  let otherOrgId: string;

  before(async () => {
    handle = await createTestDatabase();
    pki = await getTestPki();
    const [org, other] = await handle.db
      .insertInto('orgs')
      .values([{ name: 'acme' }, { name: 'globex' }])
      .returning('id')
      .execute();
    orgId = org!.id;
    otherOrgId = other!.id;
    productId = (
      await handle.db
        .insertInto('products')
        .values({ org_id: orgId, name: 'sensor' })
        .returning('id')
        .executeTakeFirstOrThrow()
    ).id;
  });

  after(async () => {
    await handle?.close();
  });

  async function auditActions(resourceId: string): Promise<string[]> {
    const rows = await handle.db
      .selectFrom('audit_log')
      .select('action')
      .where('resource_id', '=', resourceId)
      .orderBy('id')
      .execute();
    return rows.map((r) => r.action);
  }

  async function rejects(promise: Promise<unknown>, code: string, message: RegExp): Promise<void> {
    await assert.rejects(promise, (err: unknown) => {
      assert.ok(err instanceof IdentityError, `expected IdentityError, got ${String(err)}`);
      assert.equal(err.code, code);
      assert.match(err.message, message);
      return true;
    });
  }

  test('adding a signer CA stores its fingerprint and subject, audits it and notifies subscribers', async () => {
    let notified = 0;
    const unsubscribe = onSignerCasChanged(() => void notified++);
    try {
      const ca = await addSignerCa(handle.db, operator, {
        orgId,
        productId,
        pem: pki.signerCa.certPem,
        description: 'factory line 1',
      });
      assert.equal(
        ca.fingerprint,
        new X509Certificate(pki.signerCa.certPem).fingerprint256.replaceAll(':', '').toLowerCase(),
      );
      assert.match(ca.subject, /CN=fleethub development device signer CA/);
      assert.equal(ca.description, 'factory line 1');
      assert.equal(notified, 1);
      assert.deepEqual(await auditActions(ca.id), ['signer_ca.added']);
      assert.deepEqual(
        (await listSignerCas(handle.db, { orgId })).map((c) => c.id),
        [ca.id],
      );
      assert.deepEqual(await listSignerCas(handle.db, { orgId: otherOrgId }), []);
      assert.deepEqual(await trustedCaPems(handle.db), [ca.pem]);
    } finally {
      unsubscribe();
    }
  });

  test('a device certificate cannot be registered as a signer CA', async () => {
    const leaf = await deviceCert('NOT-A-CA');
    await rejects(
      addSignerCa(handle.db, operator, { orgId, productId, pem: leaf.certPem }),
      'invalid',
      /not a CA certificate/,
    );
  });

  test('text that is not one PEM certificate is rejected as a signer CA', async () => {
    await rejects(
      addSignerCa(handle.db, operator, { orgId, productId, pem: 'hello' }),
      'invalid',
      /exactly one PEM certificate/,
    );
    const two = pki.signerCa.certPem + pki.rootCa.certPem;
    await rejects(addSignerCa(handle.db, operator, { orgId, productId, pem: two }), 'invalid', /got 2/);
  });

  test('registering the same signer CA twice is a conflict', async () => {
    await rejects(
      addSignerCa(handle.db, operator, { orgId, productId, pem: pki.signerCa.certPem }),
      'conflict',
      /already registered/,
    );
  });

  test('a signer CA for a product of another org is refused', async () => {
    await rejects(
      addSignerCa(handle.db, operator, { orgId: otherOrgId, productId, pem: otherCa().certPem }),
      'not_found',
      /does not exist in org/,
    );
  });

  test('removing a signer CA audits it and stops trusting it', async () => {
    const ca = otherCa('short-lived CA');
    const added = await addSignerCa(handle.db, operator, { orgId, productId, pem: ca.certPem });
    assert.equal((await trustedCaPems(handle.db)).length, 2);
    await rejects(removeSignerCa(handle.db, operator, added.id, { orgId: otherOrgId }), 'not_found', /does not exist/);
    await removeSignerCa(handle.db, operator, added.id);
    assert.equal((await trustedCaPems(handle.db)).length, 1);
    assert.deepEqual(await auditActions(added.id), ['signer_ca.added', 'signer_ca.removed']);
  });

  test('resolving without a certificate answers 401', async () => {
    assert.deepEqual(await resolveDeviceIdentity(handle.db, {} as DetailedPeerCertificate), {
      ok: false,
      status: 401,
      reason: 'no client certificate presented',
    });
  });

  test('a certificate signed by a registered signer CA registers the device in its product with the protocol asked for', async () => {
    const cred = await deviceCert('GRISP-1');
    const result = await resolveDeviceIdentity(handle.db, peerOf(cred.certPem, pki.signerCa.certPem), {
      protocol: 'grisp',
    });
    assert.ok(result.ok);
    assert.equal(result.created, true);
    const device = await handle.db
      .selectFrom('devices')
      .selectAll()
      .where('id', '=', result.identity.deviceId)
      .executeTakeFirstOrThrow();
    assert.equal(device.protocol, 'grisp');
    assert.equal(device.identifier, 'GRISP-1');
    assert.equal(device.product_id, productId);
    const audit = await handle.db
      .selectFrom('audit_log')
      .selectAll()
      .where('resource_id', '=', device.id)
      .executeTakeFirstOrThrow();
    assert.equal(audit.action, 'device.registered');
    assert.equal(audit.actor_type, SYSTEM.type);
    assert.equal(audit.actor_id, null);
    assert.equal(audit.org_id, orgId);
    const again = await resolveDeviceIdentity(handle.db, peerOf(cred.certPem, pki.signerCa.certPem));
    assert.ok(again.ok);
    assert.equal(again.created, false);
    assert.deepEqual(again.identity, result.identity);
  });

  test('concurrent resolutions of a new certificate create one device and one certificate row', async () => {
    const cred = await deviceCert('RACE-2');
    const results = await Promise.all(
      Array.from({ length: 8 }, () => resolveDeviceIdentity(handle.db, peerOf(cred.certPem, pki.signerCa.certPem))),
    );
    assert.ok(results.every((r) => r.ok));
    assert.equal(results.filter((r) => r.ok && r.created).length, 1);
    const devices = await handle.db.selectFrom('devices').select('id').where('identifier', '=', 'RACE-2').execute();
    assert.equal(devices.length, 1);
    assert.equal((await listDeviceCertificates(handle.db, devices[0]!.id)).length, 1);
    assert.deepEqual(await auditActions(devices[0]!.id), ['device.registered']);
  });

  test('a chain claiming a registered signer CA that did not sign the certificate is refused', async () => {
    const forged = await deviceCertFromCa(otherCa('impostor'), 'FORGED-1');
    const result = await resolveDeviceIdentity(handle.db, peerOf(forged.certPem, pki.signerCa.certPem));
    assert.deepEqual(result, {
      ok: false,
      status: 403,
      reason: 'certificate chain does not verify up to the registered signer CA',
    });
  });

  test('an unknown certificate whose issuer is not registered is refused with 403', async () => {
    const ca = otherCa('unregistered');
    const cred = await deviceCertFromCa(ca, 'UNREG-1');
    const result = await resolveDeviceIdentity(handle.db, peerOf(cred.certPem, ca.certPem));
    assert.equal(result.ok, false);
    assert.equal(!result.ok && result.status, 403);
  });

  test('a device certificate can be registered, listed and revoked once, each audited', async () => {
    const device = await handle.db
      .insertInto('devices')
      .values({ org_id: orgId, product_id: productId, identifier: 'MANUAL-1' })
      .returning('id')
      .executeTakeFirstOrThrow();
    const cred = await deviceCert('MANUAL-1');
    const cert = await addDeviceCertificate(handle.db, operator, device.id, cred.certPem);
    assert.match(cert.subject, /CN=MANUAL-1/);
    await rejects(
      addDeviceCertificate(handle.db, operator, device.id, cred.certPem),
      'conflict',
      /already registered to device/,
    );
    await rejects(
      addDeviceCertificate(handle.db, operator, device.id, pki.signerCa.certPem),
      'invalid',
      /CA certificate/,
    );
    assert.deepEqual(
      (await listDeviceCertificates(handle.db, device.id)).map((c) => c.id),
      [cert.id],
    );

    const resolved = await resolveDeviceIdentity(handle.db, peerOf(cred.certPem, pki.signerCa.certPem));
    assert.ok(resolved.ok && resolved.identity.certificateId === cert.id);

    const revoked = await revokeDeviceCertificate(handle.db, operator, cert.id);
    assert.ok(revoked.revokedAt);
    const again = await revokeDeviceCertificate(handle.db, operator, cert.id);
    assert.deepEqual(again.revokedAt, revoked.revokedAt);
    assert.deepEqual(await auditActions(device.id), ['device_certificate.added', 'device_certificate.revoked']);
    const refused = await resolveDeviceIdentity(handle.db, peerOf(cred.certPem, pki.signerCa.certPem));
    assert.equal(!refused.ok && refused.status, 403);
  });

  test('certificate functions report a missing device or certificate as not_found', async () => {
    const cred = await deviceCert('NOBODY');
    await rejects(
      addDeviceCertificate(handle.db, operator, '00000000-0000-0000-0000-000000000000', cred.certPem),
      'not_found',
      /device .* does not exist/,
    );
    await rejects(
      revokeDeviceCertificate(handle.db, operator, '00000000-0000-0000-0000-000000000000'),
      'not_found',
      /does not exist/,
    );
  });
});
