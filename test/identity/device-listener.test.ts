import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import https from 'node:https';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { SYSTEM } from '../../server/audit.ts';
import type { DatabaseHandle } from '../../server/db/index.ts';
import {
  addSignerCa,
  removeSignerCa,
  revokeDeviceCertificate,
  addDeviceCertificate,
  type DeviceIdentity,
} from '../../server/identity/index.ts';
import { createDeviceListener, deviceIdentityOf, type DeviceListener } from '../../server/listeners/device.ts';
import { Writable } from 'node:stream';
import pino from 'pino';
import { REDACT_PATHS } from '../../server/log.ts';
import { createTestDatabase, DATABASE_KIND } from '../helpers/db.ts';
import {
  caLeafCert,
  deviceCert,
  deviceCertFromCa,
  expiredDeviceCert,
  getTestPki,
  otherCa,
  selfSignedCert,
  type PkiMaterial,
} from '../helpers/pki.ts';
import { wsAttempt } from './tls-client.ts';

const EXPIRY_SWEEP_MS = 200;

describe(`device listener over mutual TLS (${DATABASE_KIND})`, () => {
  let handle: DatabaseHandle;
  let pki: PkiMaterial;
  let listener: DeviceListener;
  let url: string;
  let orgId: string;
  let productId: string;
  let upgrades = 0;
  const logLines: string[] = [];

  before(async () => {
    handle = await createTestDatabase();
    pki = await getTestPki();
    const org = await handle.db.insertInto('orgs').values({ name: 'acme' }).returning('id').executeTakeFirstOrThrow();
    const product = await handle.db
      .insertInto('products')
      .values({ org_id: org.id, name: 'sensor' })
      .returning('id')
      .executeTakeFirstOrThrow();
    orgId = org.id;
    productId = product.id;
    // Started with no signer CA at all: the listener must still come up (placeholder trust).
    const sink = new Writable({
      write: (chunk: Buffer, _enc, done) => {
        logLines.push(String(chunk));
        done();
      },
    });
    const log = pino({ level: 'info', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, sink);
    listener = await createDeviceListener({
      db: handle.db,
      log,
      tls: pki.server,
      handleProtocols: (offered) => (offered.has('grisp-io-v1') ? 'grisp-io-v1' : false),
      expirySweepMs: EXPIRY_SWEEP_MS,
    });
    listener.app.get('/socket/websocket', { websocket: true }, (socket, request) => {
      upgrades++;
      socket.send(JSON.stringify({ fastify: request.deviceIdentity, raw: deviceIdentityOf(request.raw) }));
    });
    listener.app.get('/whoami', async (request) => request.deviceIdentity);
    await listener.app.listen({ port: 0, host: '127.0.0.1' });
    url = `wss://127.0.0.1:${(listener.app.server.address() as AddressInfo).port}/socket/websocket`;
    await addSignerCa(handle.db, SYSTEM, { orgId, productId, pem: pki.signerCa.certPem, description: 'dev signer' });
  });

  after(async () => {
    await listener?.close();
    await handle?.close();
  });

  async function countDevices(identifier: string): Promise<number> {
    const row = await handle.db
      .selectFrom('devices')
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .where('identifier', '=', identifier)
      .executeTakeFirstOrThrow();
    return Number(row.n);
  }

  function httpsGet(
    pathname: string,
    cred?: { certPem: string; keyPem: string },
  ): Promise<{ status: number; body: string }> {
    const { port } = listener.app.server.address() as AddressInfo;
    return new Promise((resolve, reject) => {
      https
        .get(
          {
            host: '127.0.0.1',
            port,
            path: pathname,
            agent: false,
            ca: pki.rootCa.certPem,
            ...(cred ? { cert: cred.certPem, key: cred.keyPem } : {}),
          },
          (res) => {
            let body = '';
            res.setEncoding('utf8');
            res.on('data', (chunk: string) => (body += chunk));
            res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
          },
        )
        .on('error', reject);
    });
  }

  async function refusedBeforeUpgrade(cred: Parameters<typeof wsAttempt>[2], expected: 401 | 403): Promise<string> {
    const before = upgrades;
    const attempt = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(attempt.status, expected, `expected ${expected}, got ${attempt.status} ${attempt.body ?? ''}`);
    assert.equal(upgrades, before, 'the WebSocket route must not run');
    return attempt.body ?? '';
  }

  test('a connection without a client certificate is refused with 401 before the upgrade', async () => {
    const body = await refusedBeforeUpgrade(undefined, 401);
    assert.match(body, /no client certificate/);
  });

  test('a refused connection is logged once with its status and reason and no key material', async () => {
    logLines.length = 0;
    const cred = await deviceCertFromCa(otherCa('log test CA'), 'LOGGED-1');
    await refusedBeforeUpgrade(cred, 403);
    const refusals = logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((l) => l.msg === 'device connection refused');
    assert.equal(refusals.length, 1);
    assert.equal(refusals[0]!.status, 403);
    assert.equal(refusals[0]!.subject_cn, 'LOGGED-1');
    assert.match(String(refusals[0]!.reason), /not a registered signer CA/);
    assert.doesNotMatch(logLines.join(''), /PRIVATE KEY|BEGIN CERTIFICATE/);
  });

  test('a self-signed client certificate is refused with 403 before the upgrade', async () => {
    const body = await refusedBeforeUpgrade(selfSignedCert('SELF-1'), 403);
    assert.match(body, /self-signed/);
    assert.equal(await countDevices('SELF-1'), 0);
  });

  test('a certificate from an unregistered CA is refused with 403 before the upgrade', async () => {
    const body = await refusedBeforeUpgrade(await deviceCertFromCa(otherCa('rogue CA'), 'ROGUE-1'), 403);
    assert.match(body, /not a registered signer CA/);
    assert.equal(await countDevices('ROGUE-1'), 0);
  });

  test('an expired certificate from the registered signer CA is refused with 403 before the upgrade', async () => {
    const body = await refusedBeforeUpgrade(await expiredDeviceCert('OLD-1'), 403);
    assert.match(body, /expired/);
    assert.equal(await countDevices('OLD-1'), 0);
  });

  test('a certificate from a registered signer CA is accepted and registers its device once', async () => {
    const cred = await deviceCert('SN-0001');
    const first = await wsAttempt(url, pki.rootCa.certPem, cred);
    const second = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(first.status, 101);
    assert.equal(second.status, 101);
    const { fastify, raw } = first.message as { fastify: DeviceIdentity; raw: DeviceIdentity };
    assert.equal(fastify.identifier, 'SN-0001');
    assert.equal(fastify.orgId, orgId);
    assert.equal(fastify.productId, productId);
    assert.deepEqual(raw, fastify, 'deviceIdentityOf(raw request) matches request.deviceIdentity');
    assert.deepEqual(second.message, first.message);
    assert.equal(await countDevices('SN-0001'), 1);
    const audits = await handle.db
      .selectFrom('audit_log')
      .selectAll()
      .where('action', '=', 'device.registered')
      .where('resource_id', '=', fastify.deviceId)
      .execute();
    assert.equal(audits.length, 1);
    assert.equal(audits[0]!.actor_type, 'system');
  });

  test('concurrent first connects of one device create a single device', async () => {
    const cred = await deviceCert('SN-RACE');
    const attempts = await Promise.all(Array.from({ length: 6 }, () => wsAttempt(url, pki.rootCa.certPem, cred)));
    assert.deepEqual(
      attempts.map((a) => a.status),
      [101, 101, 101, 101, 101, 101],
    );
    const ids = new Set(attempts.map((a) => (a.message as { fastify: DeviceIdentity }).fastify.deviceId));
    assert.equal(ids.size, 1);
    assert.equal(await countDevices('SN-RACE'), 1);
    const certs = await handle.db
      .selectFrom('device_certificates')
      .select('id')
      .where('device_id', '=', [...ids][0]!)
      .execute();
    assert.equal(certs.length, 1);
  });

  test('plain HTTPS requests are authenticated too, including requests for unknown routes', async () => {
    assert.equal((await httpsGet('/no-such-route')).status, 401);
    const cred = await deviceCert('SN-HTTP');
    const whoami = await httpsGet('/whoami', cred);
    assert.equal(whoami.status, 200);
    assert.equal((JSON.parse(whoami.body) as DeviceIdentity).identifier, 'SN-HTTP');
  });

  test('the WebSocket subprotocol is chosen by the handleProtocols function the caller passed', async () => {
    const attempt = await wsAttempt(url, pki.rootCa.certPem, await deviceCert('SN-GRISP'), undefined, ['grisp-io-v1']);
    assert.equal(attempt.status, 101);
    assert.equal(attempt.protocol, 'grisp-io-v1');
  });

  test('a revoked certificate is refused with 403 before the upgrade', async () => {
    const cred = await deviceCert('SN-REVOKE');
    const ok = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(ok.status, 101);
    const { certificateId } = (ok.message as { fastify: DeviceIdentity }).fastify;
    await revokeDeviceCertificate(handle.db, SYSTEM, certificateId);
    const body = await refusedBeforeUpgrade(cred, 403);
    assert.match(body, /revoked/);
  });

  test('a device whose approval is revoked is refused with 403 before the upgrade', async () => {
    const cred = await deviceCert('SN-BANNED');
    const ok = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(ok.status, 101);
    await handle.db.updateTable('devices').set({ approval: 'revoked' }).where('identifier', '=', 'SN-BANNED').execute();
    const body = await refusedBeforeUpgrade(cred, 403);
    assert.match(body, /device .* is revoked/);
  });

  test('a certificate registered to an existing device identifies that device', async () => {
    const device = await handle.db
      .insertInto('devices')
      .values({ org_id: orgId, product_id: productId, identifier: 'PRE-PROVISIONED' })
      .returning('id')
      .executeTakeFirstOrThrow();
    const cred = await deviceCert('CN-DIFFERS-FROM-IDENTIFIER');
    await addDeviceCertificate(handle.db, SYSTEM, device.id, cred.certPem);
    const attempt = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(attempt.status, 101);
    assert.equal((attempt.message as { fastify: DeviceIdentity }).fastify.deviceId, device.id);
    assert.equal(await countDevices('CN-DIFFERS-FROM-IDENTIFIER'), 0);
  });

  test('an ECDSA P-256 certificate made with the openssl CLI from the signer CA is accepted', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-ec-'));
    try {
      const file = (name: string) => path.join(dir, name);
      writeFileSync(file('signer.pem'), pki.signerCa.certPem);
      writeFileSync(file('signer.key'), pki.signerCa.keyPem, { mode: 0o600 });
      writeFileSync(
        file('ext.cnf'),
        'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n',
      );
      const openssl = (...args: string[]) => execFileSync('openssl', args, { stdio: 'pipe' });
      openssl('genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', file('device.key'));
      openssl('req', '-new', '-key', file('device.key'), '-subj', '/CN=EC-0001', '-out', file('device.csr'));
      openssl(
        'x509',
        '-req',
        '-in',
        file('device.csr'),
        '-CA',
        file('signer.pem'),
        '-CAkey',
        file('signer.key'),
        '-set_serial',
        '4242',
        '-days',
        '30',
        '-sha256',
        '-extfile',
        file('ext.cnf'),
        '-out',
        file('device.pem'),
      );
      const cred = {
        certPem: readFileSync(file('device.pem'), 'utf8'),
        keyPem: readFileSync(file('device.key'), 'utf8'),
      };
      const attempt = await wsAttempt(url, pki.rootCa.certPem, cred);
      assert.equal(attempt.status, 101, attempt.body);
      assert.equal((attempt.message as { fastify: DeviceIdentity }).fastify.identifier, 'EC-0001');
      assert.equal(await countDevices('EC-0001'), 1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a signer CA added at runtime makes its devices accepted without a restart', async () => {
    const ca = otherCa('partner factory CA');
    const cred = await deviceCertFromCa(ca, 'PARTNER-1');
    assert.equal((await wsAttempt(url, pki.rootCa.certPem, cred)).status, 403);
    await addSignerCa(handle.db, SYSTEM, { orgId, productId, pem: ca.certPem });
    const attempt = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(attempt.status, 101, attempt.body);
    assert.equal((attempt.message as { fastify: DeviceIdentity }).fastify.identifier, 'PARTNER-1');
  });

  test('a resumed TLS session still carries the client certificate and identifies the device', async () => {
    const cred = await deviceCert('SN-RESUME');
    const first = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(first.status, 101);
    assert.equal(first.sessionReused, false);
    assert.ok(first.session, 'the server issued a session ticket');
    const second = await wsAttempt(url, pki.rootCa.certPem, cred, first.session);
    assert.equal(second.sessionReused, true);
    assert.equal(second.status, 101, second.body);
    assert.deepEqual(second.message, first.message);
  });

  test('a trust refresh keeps earlier TLS sessions resumable', async () => {
    const cred = await deviceCert('SN-RESUME-2');
    const first = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.ok(first.session);
    await listener.refreshTrust();
    const second = await wsAttempt(url, pki.rootCa.certPem, cred, first.session);
    assert.equal(second.status, 101, second.body);
    assert.equal(second.sessionReused, true);
  });

  test('a CA:TRUE certificate from the signer CA is refused with 403 and registers no device', async () => {
    const body = await refusedBeforeUpgrade(await caLeafCert('CA-LEAF-1'), 403);
    assert.match(body, /CA certificate \(basicConstraints CA:TRUE\)/);
    assert.equal(await countDevices('CA-LEAF-1'), 0);
  });

  test('a resumed TLS session is refused once the signer CA that verified it is removed', async () => {
    const ca = otherCa('retired factory CA');
    const signer = await addSignerCa(handle.db, SYSTEM, { orgId, productId, pem: ca.certPem });
    const cred = await deviceCertFromCa(ca, 'RETIRED-1');
    const first = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(first.status, 101, first.body);
    assert.ok(first.session);
    await removeSignerCa(handle.db, SYSTEM, signer.id);
    assert.equal((await wsAttempt(url, pki.rootCa.certPem, cred)).status, 403, 'a full handshake is refused');
    const resumed = await wsAttempt(url, pki.rootCa.certPem, cred, first.session);
    assert.equal(resumed.sessionReused, true, 'the session was resumed (TLS did not verify again)');
    assert.equal(resumed.status, 403, resumed.body);
    assert.match(resumed.body ?? '', /no longer chains to a registered signer CA/);
  });

  test('a resumed TLS session is refused once its certificate has expired', async () => {
    // Valid for 4 s more: long enough for the first handshake on a busy machine (the shared test key, no key generation).
    const notAfter = new Date(Math.ceil(Date.now() / 1000) * 1000 + 4000);
    const cred = await deviceCert('SHORT-LIVED-1', { notBefore: new Date(Date.now() - 3600_000), notAfter });
    const first = await wsAttempt(url, pki.rootCa.certPem, cred);
    assert.equal(first.status, 101, first.body);
    assert.ok(first.session);
    await new Promise((resolve) => setTimeout(resolve, notAfter.getTime() - Date.now() + 50));
    const resumed = await wsAttempt(url, pki.rootCa.certPem, cred, first.session);
    assert.equal(resumed.sessionReused, true, 'the session was resumed (TLS did not verify again)');
    assert.equal(resumed.status, 403, resumed.body);
    assert.match(resumed.body ?? '', /expired/);
  });

  test('a live connection is closed within the sweep interval once its certificate expires', {
    timeout: 10_000,
  }, async () => {
    const notAfter = new Date(Math.ceil(Date.now() / 1000) * 1000 + 2000);
    const cred = await deviceCert('SHORT-LIVED-LIVE-1', {
      notBefore: new Date(Date.now() - 3600_000),
      notAfter,
    });
    const ws = new WebSocket(url, { ca: pki.rootCa.certPem, cert: cred.certPem, key: cred.keyPem });
    const closed = new Promise<number>((resolve) => ws.once('close', () => resolve(Date.now())));
    await new Promise((resolve, reject) => {
      ws.once('message', resolve);
      ws.once('error', reject);
    });
    const closedAt = await closed;
    assert.ok(
      closedAt >= notAfter.getTime(),
      `closed ${notAfter.getTime() - closedAt} ms before the certificate expired`,
    );
    // One sweep interval, plus scheduling slack on a busy machine.
    assert.ok(
      closedAt - notAfter.getTime() < EXPIRY_SWEEP_MS + 800,
      `closed ${closedAt - notAfter.getTime()} ms after expiry`,
    );
    const line = logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === 'device connections closed' && l.reason === 'certificate expired');
    assert.ok(line, 'the close is logged with its reason');
    assert.equal(line.level, 30, 'at info');
  });
});
