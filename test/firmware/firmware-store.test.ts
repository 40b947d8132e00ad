import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import https from 'node:https';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { updateProduct, SYSTEM } from '../../server/fleet/index.ts';
import { generateSigningKeyPair, signDownloadUrl, signFirmwareDigest } from '../../server/firmware/signing.ts';
import { parseRange } from '../../server/firmware/serve-blob.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { imageChunks, startFirmwareHarness, type FirmwareHarness } from './harness.ts';

async function digestOf(size: number, seed: number): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of imageChunks(size, seed)) hash.update(chunk);
  return hash.digest('hex');
}

/** The upload route's answer: the firmware record, or the error. */
interface FirmwareAnswer {
  id: string;
  sha256: string;
  size: number;
  has_blob: boolean;
  platform: string;
  signature: string | null;
  error: { code: string };
}

describe(`firmware upload and download (${DATABASE_KIND})`, () => {
  let h: FirmwareHarness;
  let operator: string;
  let admin: string;

  before(async () => {
    h = await startFirmwareHarness();
    operator = await h.token('operator');
    admin = await h.token('admin');
  });
  after(async () => {
    await h.close();
  });

  async function upload(query: Record<string, string>, body: AsyncIterable<Uint8Array> | Buffer, token = operator) {
    const qs = new URLSearchParams({ product: h.productA.id, ...query });
    const res = await fetch(`${h.apiUrl}/api/v1/firmware?${qs}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' },
      body: Buffer.isBuffer(body) ? body : (Readable.from(body) as unknown as BodyInit),
      duplex: 'half',
    } as RequestInit);
    return { status: res.status, body: (await res.json()) as FirmwareAnswer };
  }

  test('an uploaded image is stored under its sha256 with the right size', async () => {
    const size = 3 * 1024 * 1024 + 17;
    const res = await upload({ version: '1.0.0', platform: 'rpi4', architecture: 'arm' }, imageChunks(size, 7));
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal(res.body.sha256, await digestOf(size, 7));
    assert.equal(res.body.size, size);
    assert.equal(res.body.has_blob, true);
    assert.equal(res.body.platform, 'rpi4');
    assert.deepEqual(await h.blobs.stat(res.body.sha256), { sha256: res.body.sha256, size });
  });

  test('metadata may come as X-Firmware headers instead of the query string', async () => {
    const res = await fetch(`${h.apiUrl}/api/v1/firmware`, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${operator}`,
        'content-type': 'application/octet-stream',
        'x-firmware-product': 'sensor',
        'x-firmware-org': h.org.name,
        'x-firmware-version': '1.0.1',
      },
      body: Buffer.from('header image'),
    });
    const body = (await res.json()) as Record<string, unknown>;
    assert.equal(res.status, 201, JSON.stringify(body));
    assert.equal(body.version, '1.0.1');
    assert.equal(body.product_id, h.productA.id);
  });

  test('uploading the same version with identical bytes answers 200 with the existing record', async () => {
    const first = await upload({ version: '1.1.0' }, imageChunks(100_000, 11));
    const again = await upload({ version: '1.1.0' }, imageChunks(100_000, 11));
    assert.equal(first.status, 201);
    assert.equal(again.status, 200);
    assert.equal(again.body.id, first.body.id);
  });

  test('uploading the same version with different bytes is a 409 and leaves no stray blob', async () => {
    await upload({ version: '1.2.0' }, imageChunks(50_000, 21));
    const clash = await upload({ version: '1.2.0' }, imageChunks(50_000, 22));
    assert.equal(clash.status, 409);
    assert.equal(clash.body.error.code, 'duplicate_version');
    assert.equal(await h.blobs.stat(await digestOf(50_000, 22)), null);
  });

  test('an empty body is refused', async () => {
    const res = await upload({ version: '1.3.0' }, Buffer.alloc(0));
    assert.equal(res.status, 400);
  });

  test('a viewer cannot upload firmware', async () => {
    const res = await upload({ version: '1.4.0' }, Buffer.from('x'), await h.token('viewer'));
    assert.equal(res.status, 403);
  });

  test('a JSON body registers firmware built elsewhere without an image', async () => {
    const res = await fetch(`${h.apiUrl}/api/v1/firmware`, {
      method: 'POST',
      headers: { authorization: `Bearer ${operator}`, 'content-type': 'application/json' },
      body: JSON.stringify({ product: h.productA.id, version: '0.9.0', sha256: 'a'.repeat(64), size: 10 }),
    });
    const body = (await res.json()) as Record<string, unknown>;
    assert.equal(res.status, 201, JSON.stringify(body));
    assert.equal(body.has_blob, false);
  });

  describe('signatures', () => {
    const keys = generateSigningKeyPair();

    before(async () => {
      await updateProduct(h.fleet, SYSTEM, h.org.id, h.productB.id, { requiresSignature: true });
    });

    test('an admin registers, lists and an operator may not add signing keys', async () => {
      const denied = await fetch(`${h.apiUrl}/api/v1/products/${h.productB.id}/signing-keys`, {
        method: 'POST',
        headers: { authorization: `Bearer ${operator}`, 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'release', public_key_pem: keys.publicKeyPem }),
      });
      assert.equal(denied.status, 403);
      const added = await fetch(`${h.apiUrl}/api/v1/products/${h.productB.id}/signing-keys`, {
        method: 'POST',
        headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'release', public_key_pem: keys.publicKeyPem }),
      });
      assert.equal(added.status, 201);
      const list = (await (
        await fetch(`${h.apiUrl}/api/v1/products/${h.productB.id}/signing-keys`, {
          headers: { authorization: `Bearer ${operator}` },
        })
      ).json()) as { items: Array<{ name: string; fingerprint: string }>; total: number };
      assert.equal(list.total, 1);
      assert.deepEqual(
        list.items.map((k) => k.name),
        ['release'],
      );
      assert.match(list.items[0]!.fingerprint, /^[0-9a-f]{64}$/);
    });

    test('a key that is not ed25519 is refused', async () => {
      const res = await fetch(`${h.apiUrl}/api/v1/products/${h.productB.id}/signing-keys`, {
        method: 'POST',
        headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'rsa', public_key_pem: h.pki.rootCa.certPem }),
      });
      assert.equal(res.status, 400);
    });

    test('a product that requires signatures refuses an unsigned image', async () => {
      const res = await upload({ product: h.productB.id, version: '2.0.0' }, imageChunks(10_000, 31));
      assert.equal(res.status, 400);
      assert.equal(res.body.error.code, 'signature_required');
    });

    test('a signature made with an unregistered key is refused', async () => {
      const sha = await digestOf(10_000, 32);
      const signature = signFirmwareDigest(sha, generateSigningKeyPair().privateKeyPem);
      const res = await upload({ product: h.productB.id, version: '2.0.1', signature }, imageChunks(10_000, 32));
      assert.equal(res.status, 400);
      assert.equal(res.body.error.code, 'signature_invalid');
    });

    test('a signature of other bytes is refused', async () => {
      const signature = signFirmwareDigest(await digestOf(10_000, 99), keys.privateKeyPem);
      const res = await upload({ product: h.productB.id, version: '2.0.2', signature }, imageChunks(10_000, 33));
      assert.equal(res.status, 400);
      assert.equal(res.body.error.code, 'signature_invalid');
    });

    test('a correctly signed image is accepted and keeps its signature', async () => {
      const signature = signFirmwareDigest(await digestOf(10_000, 34), keys.privateKeyPem);
      const res = await upload({ product: h.productB.id, version: '2.0.3', signature }, imageChunks(10_000, 34));
      assert.equal(res.status, 201, JSON.stringify(res.body));
      assert.equal(res.body.signature, signature);
    });

    test('an admin removes a signing key by name', async () => {
      const res = await fetch(`${h.apiUrl}/api/v1/products/${h.productB.id}/signing-keys/release`, {
        method: 'DELETE',
        headers: { authorization: `Bearer ${admin}` },
      });
      assert.equal(res.status, 200);
      const list = (await (
        await fetch(`${h.apiUrl}/api/v1/products/${h.productB.id}/signing-keys`, {
          headers: { authorization: `Bearer ${admin}` },
        })
      ).json()) as { items: unknown[]; total: number };
      assert.deepEqual(list, { items: [], total: 0 });
    });
  });

  describe('download on the mutual-TLS listener', () => {
    const size = 2 * 1024 * 1024 + 5;
    let firmwareId: string;
    let sha256: string;

    before(async () => {
      const res = await upload({ version: '3.0.0' }, imageChunks(size, 41));
      assert.equal(res.status, 201);
      firmwareId = res.body.id;
      sha256 = res.body.sha256;
    });

    test('a device of the product downloads the whole image with Content-Length and a quoted sha256 ETag', async () => {
      const cred = await h.deviceFor('a', 'dl-full');
      const res = await h.fetchAsDevice(cred, h.signUrl(firmwareId));
      assert.equal(res.status, 200);
      assert.equal(res.bytes, size);
      assert.equal(res.headers['content-length'], String(size));
      assert.equal(res.headers.etag, `"${sha256}"`);
      assert.equal(res.headers['accept-ranges'], 'bytes');
    });

    test('a Range request answers 206 with exactly those bytes and a Content-Range', async () => {
      const cred = await h.deviceFor('a', 'dl-range');
      const res = await h.fetchAsDevice(cred, h.signUrl(firmwareId), { headers: { range: 'bytes=100-199' } });
      assert.equal(res.status, 206);
      assert.equal(res.headers['content-range'], `bytes 100-199/${size}`);
      assert.equal(res.bytes, 100);
      let expected: Buffer = Buffer.alloc(0);
      for await (const chunk of imageChunks(size, 41)) {
        expected = chunk.subarray(100, 200);
        break;
      }
      assert.deepEqual(res.body, expected);
    });

    test('the whole image and a range across read-chunk boundaries arrive byte for byte', async () => {
      const cred = await h.deviceFor('a', 'dl-bytes');
      const whole = await h.fetchAsDevice(cred, h.signUrl(firmwareId));
      assert.equal(whole.sha256, sha256);
      const part = await h.fetchAsDevice(cred, h.signUrl(firmwareId), { headers: { range: 'bytes=262000-800000' } });
      assert.equal(part.status, 206);
      assert.deepEqual(part.body, whole.body.subarray(262000, 800001));
      const tail = await h.fetchAsDevice(cred, h.signUrl(firmwareId), {
        headers: { range: `bytes=${size - 300000}-` },
      });
      let image = Buffer.alloc(0);
      for await (const chunk of imageChunks(size, 41)) image = Buffer.concat([image, chunk]);
      assert.equal(
        tail.sha256,
        createHash('sha256')
          .update(image.subarray(size - 300000))
          .digest('hex'),
      );
    });

    test('a download the device abandons mid-stream leaves the listener serving the next one', async () => {
      const cred = await h.deviceFor('a', 'dl-abandon');
      const received = await new Promise<number>((resolve, reject) => {
        const req = https.request(h.signUrl(firmwareId), {
          cert: cred.certPem,
          key: cred.keyPem,
          ca: h.pki.rootCa.certPem,
          agent: false,
        });
        req.once('error', reject);
        req.once('response', (res) => {
          res.once('data', (chunk: Buffer) => {
            req.destroy();
            resolve(chunk.length);
          });
        });
        req.end();
      });
      assert.ok(received > 0 && received < size);
      const again = await h.fetchAsDevice(cred, h.signUrl(firmwareId));
      assert.equal(again.status, 200);
      assert.equal(again.sha256, sha256);
    });

    test('an open-ended Range resumes to the end', async () => {
      const cred = await h.deviceFor('a', 'dl-tail');
      const res = await h.fetchAsDevice(cred, h.signUrl(firmwareId), { headers: { range: `bytes=${size - 10}-` } });
      assert.equal(res.status, 206);
      assert.equal(res.bytes, 10);
    });

    test('a Range past the end answers 416 with the size', async () => {
      const cred = await h.deviceFor('a', 'dl-416');
      const res = await h.fetchAsDevice(cred, h.signUrl(firmwareId), { headers: { range: `bytes=${size}-` } });
      assert.equal(res.status, 416);
      assert.equal(res.headers['content-range'], `bytes */${size}`);
    });

    test('an If-Range with another ETag gets the whole image', async () => {
      const cred = await h.deviceFor('a', 'dl-ifrange');
      const res = await h.fetchAsDevice(cred, h.signUrl(firmwareId), {
        headers: { range: 'bytes=10-', 'if-range': '"stale"' },
      });
      assert.equal(res.status, 200);
      assert.equal(res.bytes, size);
    });

    test('HEAD answers the headers without a body', async () => {
      const cred = await h.deviceFor('a', 'dl-head');
      const res = await h.fetchAsDevice(cred, h.signUrl(firmwareId), { method: 'HEAD' });
      assert.equal(res.status, 200);
      assert.equal(res.headers['content-length'], String(size));
      assert.equal(res.headers.etag, `"${sha256}"`);
      assert.equal(res.bytes, 0);
    });

    test('an expired URL is refused with 403', async () => {
      const cred = await h.deviceFor('a', 'dl-expired');
      const url = signDownloadUrl({
        baseUrl: h.deviceUrl,
        secret: h.secret,
        grant: { route: 'firmware', firmwareId },
        expiresAt: new Date(Date.now() - 1000),
      });
      const res = await h.fetchAsDevice(cred, url);
      assert.equal(res.status, 403);
      assert.match(res.body.toString(), /expired/);
    });

    test('a tampered URL is refused with 403', async () => {
      const cred = await h.deviceFor('a', 'dl-tampered');
      const url = h.signUrl(firmwareId).replace(/expires=(\d+)/, (_m, e: string) => `expires=${Number(e) + 3600}`);
      assert.equal((await h.fetchAsDevice(cred, url)).status, 403);
      const otherId = h.signUrl(firmwareId).replace(firmwareId, '00000000-0000-4000-8000-000000000000');
      assert.equal((await h.fetchAsDevice(cred, otherId)).status, 403);
    });

    test('a device of another product is refused with 403 even with a valid URL', async () => {
      const cred = await h.deviceFor('b', 'dl-other-product');
      const res = await h.fetchAsDevice(cred, h.signUrl(firmwareId));
      assert.equal(res.status, 403);
    });

    test('a URL signed with another secret is refused with 403', async () => {
      const cred = await h.deviceFor('a', 'dl-secret');
      const url = signDownloadUrl({
        baseUrl: h.deviceUrl,
        secret: 'not the server secret',
        grant: { route: 'firmware', firmwareId },
        expiresAt: new Date(Date.now() + 60_000),
      });
      assert.equal((await h.fetchAsDevice(cred, url)).status, 403);
    });
  });

  test('Range parsing covers suffix, open, clamped and unsatisfiable ranges', () => {
    assert.deepEqual(parseRange('bytes=0-9', 100), { start: 0, end: 9 });
    assert.deepEqual(parseRange('bytes=90-', 100), { start: 90, end: 99 });
    assert.deepEqual(parseRange('bytes=-10', 100), { start: 90, end: 99 });
    assert.deepEqual(parseRange('bytes=50-500', 100), { start: 50, end: 99 });
    assert.equal(parseRange('bytes=100-', 100), 'unsatisfiable');
    assert.equal(parseRange('bytes=0-1,5-6', 100), undefined);
    assert.equal(parseRange('items=0-1', 100), undefined);
  });
});
