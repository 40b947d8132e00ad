/**
 * The firmware parts of the server, for real: a migrated database, the operator API with the
 * firmware routes (plain HTTP on an ephemeral port), the mutual-TLS device listener with the
 * download route (ephemeral port), a local blob store in a temp dir, and two products, each with
 * its own signer CA so devices of each product can be minted.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { registerApi } from '../../server/api/index.ts';
import { firmwareApiRoutes } from '../../server/api/firmware.ts';
import { createPubSub } from '../../server/channels/index.ts';
import type { DatabaseHandle } from '../../server/db/index.ts';
import { LocalBlobStore } from '../../server/firmware/blob-store.ts';
import { createFirmwareUrlSigner, registerFirmwareDownload } from '../../server/firmware/download.ts';
import {
  createOrg,
  createProduct,
  pubsubBus,
  SYSTEM,
  type FleetContext,
  type Org,
  type Product,
} from '../../server/fleet/index.ts';
import { addSignerCa } from '../../server/identity/index.ts';
import { createDeviceListener, type DeviceListener } from '../../server/listeners/device.ts';
import { createLogger } from '../../server/log.ts';
import { createUser } from '../../server/api/operators.ts';
import type { Role } from '../../server/db/schema.ts';
import { createTestDatabase } from '../helpers/db.ts';
import {
  deviceCert,
  deviceCertFromCa,
  getTestPki,
  otherCa,
  type CertifiedKey,
  type PkiMaterial,
} from '../helpers/pki.ts';

export interface FirmwareHarness {
  handle: DatabaseHandle;
  fleet: FleetContext;
  blobs: LocalBlobStore;
  pki: PkiMaterial;
  apiUrl: string;
  deviceUrl: string;
  secret: string;
  org: Org;
  /** Devices from `deviceFor('a', ...)` belong here (the test signer CA). */
  productA: Product;
  /** Devices from `deviceFor('b', ...)` belong here (an unrelated CA). */
  productB: Product;
  signUrl: (firmwareId: string, ttlSeconds?: number) => string;
  token(role: Role): Promise<string>;
  deviceFor(product: 'a' | 'b', serial: string): Promise<CertifiedKey>;
  /** An HTTPS GET/HEAD with a device certificate; the body is counted and digested, its first MiB kept. */
  fetchAsDevice(
    cred: CertifiedKey,
    url: string,
    opts?: { method?: string; headers?: Record<string, string> },
  ): Promise<{
    status: number;
    headers: Record<string, string | string[] | undefined>;
    bytes: number;
    body: Buffer;
    sha256: string;
  }>;
  close(): Promise<void>;
}

export async function startFirmwareHarness(): Promise<FirmwareHarness> {
  const handle = await createTestDatabase();
  const log = createLogger({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });
  const pubsub = createPubSub({ log });
  const dir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-blobs-'));
  const blobs = new LocalBlobStore(dir);
  const secret = randomBytes(32).toString('base64url');
  const pki = await getTestPki();

  let deviceUrl = '';
  const fleet: FleetContext = {
    db: handle.db,
    bus: pubsubBus(pubsub),
    log,
    nodeName: 'test-node',
    firmwareUrl: (f) => createFirmwareUrlSigner({ baseUrl: deviceUrl, secret, ttlSeconds: 3600 })(f),
  };

  const api: FastifyInstance = Fastify({ logger: false });
  await registerApi(api, { fleet, db: handle.db, log, pubsub, secret }, [
    (scope) => firmwareApiRoutes(scope, { fleet, blobs }),
  ]);
  await api.listen({ port: 0, host: '127.0.0.1' });
  const apiUrl = `http://127.0.0.1:${(api.server.address() as AddressInfo).port}`;

  const org = await createOrg(fleet, SYSTEM, { name: `org-${randomBytes(3).toString('hex')}` });
  const productA = await createProduct(fleet, SYSTEM, { orgId: org.id, name: 'sensor' });
  const productB = await createProduct(fleet, SYSTEM, { orgId: org.id, name: 'gateway' });
  const caB = otherCa('product B signer CA');
  await addSignerCa(handle.db, SYSTEM, { orgId: org.id, productId: productA.id, pem: pki.signerCa.certPem });
  await addSignerCa(handle.db, SYSTEM, { orgId: org.id, productId: productB.id, pem: caB.certPem });

  const listener: DeviceListener = await createDeviceListener({ db: handle.db, log, tls: pki.server });
  registerFirmwareDownload(listener.app, { db: handle.db, blobs, secret });
  await listener.app.listen({ port: 0, host: '127.0.0.1' });
  deviceUrl = `https://127.0.0.1:${(listener.app.server.address() as AddressInfo).port}`;

  const users = new Map<Role, string>();
  return {
    handle,
    fleet,
    blobs,
    pki,
    apiUrl,
    deviceUrl,
    secret,
    org,
    productA,
    productB,
    signUrl: (firmwareId, ttlSeconds = 3600) =>
      createFirmwareUrlSigner({ baseUrl: deviceUrl, secret, ttlSeconds })({ id: firmwareId }),
    async token(role) {
      const existing = users.get(role);
      if (existing) return existing;
      const email = `${role}-${randomBytes(3).toString('hex')}@example.test`;
      const password = 'correct horse battery staple';
      await createUser(handle.db, { email, password, role, orgId: null });
      const res = await fetch(`${apiUrl}/api/v1/auth/login`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ email, password }),
      });
      const token = ((await res.json()) as { token: string }).token;
      users.set(role, token);
      return token;
    },
    deviceFor: (product, serial) => (product === 'a' ? deviceCert(serial) : deviceCertFromCa(caB, serial)),
    fetchAsDevice(cred, url, opts = {}) {
      return new Promise((resolve, reject) => {
        const req = https.request(url, {
          method: opts.method ?? 'GET',
          headers: opts.headers,
          cert: cred.certPem,
          key: cred.keyPem,
          ca: pki.rootCa.certPem,
          agent: false,
        });
        req.once('error', reject);
        req.once('response', (res) => {
          let bytes = 0;
          const kept: Buffer[] = [];
          const digest = createHash('sha256');
          res.on('data', (chunk: Buffer) => {
            bytes += chunk.length;
            digest.update(chunk);
            if (bytes <= 1024 * 1024) kept.push(chunk);
          });
          res.once('error', reject);
          res.once('end', () =>
            resolve({
              status: res.statusCode ?? 0,
              headers: res.headers,
              bytes,
              body: Buffer.concat(kept),
              sha256: digest.digest('hex'),
            }),
          );
        });
        req.end();
      });
    },
    async close() {
      await listener.close();
      await api.close();
      await pubsub.close();
      await handle.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A deterministic pseudo-random image of `size` bytes, produced in chunks (never whole in memory). */
export async function* imageChunks(size: number, seed = 1, chunk = 1024 * 1024): AsyncGenerator<Buffer> {
  let x = seed >>> 0 || 1;
  for (let offset = 0; offset < size; offset += chunk) {
    const n = Math.min(chunk, size - offset);
    const buf = Buffer.allocUnsafe(n);
    for (let i = 0; i + 4 <= n; i += 4) {
      // xorshift32: cheap, and no two seeds give the same image.
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      buf.writeUInt32LE(x >>> 0, i);
    }
    for (let i = n - (n % 4); i < n; i++) buf[i] = i & 0xff;
    yield buf;
  }
}
