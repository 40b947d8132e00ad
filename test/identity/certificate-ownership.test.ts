import assert from 'node:assert/strict';
import { createHash, randomUUID, X509Certificate } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { createUser } from '../../server/api/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, openSocket } from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import type { ErrorAnswer, Items } from '../api/harness.ts';

/**
 * A device certificate belongs to the org whose signer CA issued it. The `default` org of the test
 * server holds the test PKI's signer CA; org "rival" has none, and its admin tries to claim a
 * default-org device's certificate before the device first connects.
 */
function fingerprintOf(certPem: string): string {
  return createHash('sha256').update(new X509Certificate(certPem).raw).digest('hex');
}

describe(`device certificates belong to their issuer's org (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let rival: { orgId: string; productId: string; token: string };

  before(async () => {
    server = await startTestServer();
    const org = await server.call<{ id: string }>('POST', '/api/v1/orgs', {
      name: `rival-${randomUUID().slice(0, 6)}`,
    });
    const product = await server.call<{ id: string }>('POST', `/api/v1/orgs/${org.id}/products`, { name: 'gadget' });
    const email = `rival-admin-${randomUUID().slice(0, 6)}@example.com`;
    await createUser(server.database.db, { email, password: 'rival-password-123456', role: 'admin', orgId: org.id });
    const login = await fetch(`${server.apiUrl}/api/v1/auth/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email, password: 'rival-password-123456' }),
    });
    rival = { orgId: org.id, productId: product.id, token: ((await login.json()) as { token: string }).token };
  });
  after(async () => {
    await server?.close();
  });

  /** An API call as `token`, answering status and parsed body (never throws on 4xx). */
  async function call<T = ErrorAnswer>(
    token: string,
    method: string,
    url: string,
    body?: unknown,
  ): Promise<{ status: number; body: T; text: string }> {
    const res = await fetch(`${server.apiUrl}${url}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : undefined, text };
  }

  async function createDevice(
    token: string,
    orgId: string,
    productId: string,
    identifier: string,
  ): Promise<{ id: string }> {
    const res = await call<{ id: string }>(token, 'POST', `/api/v1/orgs/${orgId}/devices`, {
      product: productId,
      identifier,
    });
    assert.equal(res.status, 201, res.text);
    return res.body;
  }

  /** Connects over mutual TLS with `cred`, joins `device:<uuid>` and answers the device row the server attached. */
  async function connectAndJoin(
    cred: Awaited<ReturnType<typeof deviceCert>>,
  ): Promise<{ id: string; org_id: string; identifier: string; connection_status: string }> {
    const socket = await openSocket(`${server.deviceUrl}/socket`, {
      tls: await deviceTlsOptions(cred),
      reconnectAfterMs: () => 60_000,
    });
    try {
      await joinChannel(socket.channel(`device:${randomUUID()}`, { version: '1.0.0' }));
      return await server.database.db
        .selectFrom('device_certificates')
        .innerJoin('devices', 'devices.id', 'device_certificates.device_id')
        .select(['devices.id', 'devices.org_id', 'devices.identifier', 'devices.connection_status'])
        .where('device_certificates.fingerprint_sha256', '=', fingerprintOf(cred.certPem))
        .executeTakeFirstOrThrow();
    } finally {
      await disconnectSocket(socket).catch(() => undefined);
    }
  }

  test('another org cannot register a certificate its signer CAs did not issue, and the real device then connects into its own org', async () => {
    const cred = await deviceCert(`victim-${randomUUID().slice(0, 8)}`);
    const decoy = await createDevice(rival.token, rival.orgId, rival.productId, 'decoy-1');
    const refused = await call(rival.token, 'POST', `/api/v1/orgs/${rival.orgId}/devices/${decoy.id}/certificates`, {
      pem: cred.certPem,
    });
    assert.equal(refused.status, 400, refused.text);
    assert.equal(refused.body.error.code, 'invalid');
    assert.match(refused.body.error.message, /not issued by a signer CA of this organization/);
    assert.equal(
      (await call<Items<unknown>>(rival.token, 'GET', `/api/v1/orgs/${rival.orgId}/devices/${decoy.id}/certificates`))
        .body.items.length,
      0,
    );

    const device = await connectAndJoin(cred);
    assert.equal(device.org_id, server.orgId, 'the device registers in the org of its signer CA');
    assert.notEqual(device.id, decoy.id);
  });

  test("a certificate already registered in another org answers 409 without that org's identifiers", async () => {
    const cred = await deviceCert(`planted-${randomUUID().slice(0, 8)}`);
    // A claim planted before this rule existed: the certificate row points at the rival's device.
    const planted = await createDevice(
      rival.token,
      rival.orgId,
      rival.productId,
      `planted-${randomUUID().slice(0, 6)}`,
    );
    const x509 = new X509Certificate(cred.certPem);
    await server.database.db
      .insertInto('device_certificates')
      .values({
        device_id: planted.id,
        fingerprint_sha256: fingerprintOf(cred.certPem),
        serial: x509.serialNumber.toLowerCase(),
        subject: x509.subject,
        issuer: x509.issuer,
        not_before: new Date(x509.validFrom),
        not_after: new Date(x509.validTo),
        pem: x509.toString(),
      })
      .execute();

    const own = await createDevice(
      server.adminToken,
      server.orgId,
      server.productId,
      `own-${randomUUID().slice(0, 6)}`,
    );
    const conflict = await call(
      server.adminToken,
      'POST',
      `/api/v1/orgs/${server.orgId}/devices/${own.id}/certificates`,
      { pem: cred.certPem },
    );
    assert.equal(conflict.status, 409, conflict.text);
    assert.match(conflict.body.error.message, /already registered to another device/);
    for (const foreign of [planted.id, rival.orgId, rival.productId])
      assert.ok(!conflict.text.includes(foreign), `the 409 reveals ${foreign}: ${conflict.text}`);
  });

  test('a same-org registration works, its 409 names the device, and the device connects as that device', async () => {
    const cred = await deviceCert(`cn-${randomUUID().slice(0, 8)}`);
    const own = await createDevice(
      server.adminToken,
      server.orgId,
      server.productId,
      `pre-${randomUUID().slice(0, 6)}`,
    );
    const added = await call(server.adminToken, 'POST', `/api/v1/orgs/${server.orgId}/devices/${own.id}/certificates`, {
      pem: cred.certPem,
    });
    assert.equal(added.status, 201, added.text);
    const again = await call(server.adminToken, 'POST', `/api/v1/orgs/${server.orgId}/devices/${own.id}/certificates`, {
      pem: cred.certPem,
    });
    assert.equal(again.status, 409, again.text);
    assert.equal(again.body.error.details.device_id, own.id);

    const device = await connectAndJoin(cred);
    assert.equal(device.id, own.id);
    assert.equal(device.org_id, server.orgId);
  });
});
