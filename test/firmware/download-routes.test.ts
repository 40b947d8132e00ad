/**
 * One table run across every download route (docs/firmware-downloads.md): Phoenix devices,
 * GRiSP package members, WiFiDogX gateways, keyauth clients and Main Server Pis. The whole server
 * runs in-process with the API listener on TLS, so every request below is a real HTTPS request
 * on its own socket (with the device certificate where the route wants one). Each route must
 * answer the same HTTP semantics (full GET, HEAD, Range, suffix and clamped ranges, several or
 * invalid ranges, 416, If-Range by tag and date, If-None-Match, If-Modified-Since, ETag,
 * cache-control), refuse expired and tampered URLs with a clear error, and close the blob when
 * the client goes away mid-stream.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { rename } from 'node:fs/promises';
import https from 'node:https';
import { after, before, describe, it } from 'node:test';
import { buildGrispPackage } from '../../device-client/simulators/grisp.ts';
import { grispEdgeOf } from '../../server/edges/grisp/index.ts';
import { keyauthDownloadUrl } from '../../server/edges/keyauth/index.ts';
import { wifidogxEdgeOf } from '../../server/edges/wifidogx/index.ts';
import type { BlobReader } from '../../server/firmware/blob-store.ts';
import { type DownloadGrant, signDownload, signDownloadUrl } from '../../server/firmware/signing.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { type CertifiedKey, deviceCert, getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';

const ROUTES = ['phoenix', 'grisp', 'wifidogx', 'keyauth', 'main-server'] as const;
type RouteName = (typeof ROUTES)[number];

/** Large enough that a client aborting after its first chunk leaves most of it unread by the server. */
const SIZE = 8 * 1024 * 1024;
const HOUR = 3600_000;

interface Refusal {
  what: string;
  url: string;
  headers?: Record<string, string>;
  status: number;
  /** The error the body must carry, in the route's own error format. */
  message: RegExp;
}

interface RouteCase {
  /** The entity the route serves. */
  bytes: Buffer;
  /** The stored blob the entity is read from (a GRiSP member is a slice of its package's). */
  blob: string;
  /** The error the route answers when that blob is gone (404, in the route's own error format). */
  missing: RegExp;
  url: string;
  /** A client certificate (device listener routes) and headers (Main Server's bearer token). */
  cert?: CertifiedKey;
  headers?: Record<string, string>;
  /** The policy the route documents. */
  cacheControl: RegExp;
  refusals: Refusal[];
}

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

let server: TestServer;
let ca: string;
const cases = {} as Record<RouteName, RouteCase>;
/** Every blob reader the server opened, with what it read and whether it was closed. */
const readers: Array<{ bytesRead: number; closed: boolean }> = [];
/** Set by a test: the next open of this blob finds it deleted (moved away), after the route looked it up. */
let deleteBeforeOpen: string | undefined;

/** One HTTPS request on a fresh socket; `abortAfter` destroys it once that many body bytes arrived. */
function fetchRoute(
  r: RouteCase,
  o: { method?: string; headers?: Record<string, string>; url?: string; abortAfter?: number } = {},
): Promise<Answer & { aborted: boolean }> {
  return new Promise((resolve, reject) => {
    const req = https.request(o.url ?? r.url, {
      method: o.method ?? 'GET',
      headers: { ...r.headers, ...o.headers },
      ca,
      ...(r.cert ? { cert: r.cert.certPem, key: r.cert.keyPem } : {}),
      agent: false,
    });
    req.once('error', reject);
    req.once('response', (res) => {
      const chunks: Buffer[] = [];
      let received = 0;
      const answer = (aborted: boolean) =>
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), aborted });
      res.on('data', (chunk: Buffer) => {
        chunks.push(chunk);
        received += chunk.length;
        if (o.abortAfter !== undefined && received >= o.abortAfter) {
          req.destroy();
          answer(true);
        }
      });
      res.once('error', reject);
      res.once('end', () => answer(false));
    });
    req.end();
  });
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const json = (a: Answer) => JSON.parse(a.body.toString()) as unknown;

/** The URL with the last hex digit of its 64-hex signature changed. */
function tampered(url: string): string {
  return url.replace(/([0-9a-f]{63})([0-9a-f])(?=\/|$|&)/, (_m, head: string, last: string) =>
    last === '0' ? `${head}1` : `${head}0`,
  );
}

const expiredUrl = (baseUrl: string, grant: DownloadGrant) =>
  signDownloadUrl({ baseUrl, secret: server.secret, grant, expiresAt: new Date(Date.now() - 60_000) });

async function uploadFirmware(version: string, image: Buffer): Promise<{ id: string }> {
  const q = `product=${server.productId}&org=${server.orgId}&version=${version}`;
  const res = await server.fetch(`${server.apiUrl}/api/v1/firmware?${q}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
    body: new Uint8Array(image),
  });
  assert.equal(res.status, 201, await res.clone().text());
  return (await res.json()) as { id: string };
}

async function uploadGrispPackage(version: string, block: Buffer): Promise<{ id: string }> {
  const body = await buildGrispPackage({ version, blocks: [block] });
  const q = `product=${server.productId}&org=${server.orgId}&version=${version}`;
  const res = await server.fetch(`${server.apiUrl}/api/v1/grisp/firmware?${q}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
    body: new Uint8Array(body),
  });
  assert.equal(res.status, 201, await res.clone().text());
  return (await res.json()) as { id: string };
}

/** A pre-registered device of the default product (approved, as pre-registered devices are). */
async function newDevice(name: string): Promise<{ id: string }> {
  const device = await server.call<{ id: string; approval: string }>('POST', `/api/v1/orgs/${server.orgId}/devices`, {
    product: server.productId,
    identifier: `${name}-${randomBytes(3).toString('hex')}`,
  });
  assert.equal(device.approval, 'approved');
  return device;
}

const revoke = (deviceId: string) => server.call('POST', `/api/v1/orgs/${server.orgId}/devices/${deviceId}/revoke`);

describe(`every download route answers the same HTTP (${DATABASE_KIND})`, () => {
  before(async () => {
    server = await startTestServer({ apiTls: true });
    ca = (await getTestPki()).rootCa.certPem;
    // Count what the server's own blob store reads and closes (the real store underneath).
    const store = server.blobs;
    const open = store.reader!.bind(store);
    store.reader = async (sha256: string): Promise<BlobReader> => {
      if (deleteBeforeOpen === sha256) {
        deleteBeforeOpen = undefined;
        // Really gone from the store: an operator's delete landing between the route's check and the open.
        await rename(store.pathOf(sha256), `${store.pathOf(sha256)}.away`);
        try {
          return await open(sha256);
        } finally {
          await rename(`${store.pathOf(sha256)}.away`, store.pathOf(sha256));
        }
      }
      const reader = await open(sha256);
      const seen = { bytesRead: 0, closed: false };
      readers.push(seen);
      return {
        size: reader.size,
        async read(buffer, length, position) {
          const n = await reader.read(buffer, length, position);
          seen.bytesRead += n;
          return n;
        },
        async close() {
          seen.closed = true;
          await reader.close();
        },
      };
    };

    const image = randomBytes(SIZE);
    const fw = await uploadFirmware('9.0.0', image);
    const block = randomBytes(SIZE);
    const pkg = await uploadGrispPackage('9.0.1', block);
    const cert = await deviceCert(`download-routes-${process.pid}-${randomBytes(2).toString('hex')}`);
    const gateway = await newDevice('gw');
    const revokedGateway = await newDevice('gw-revoked');
    const client = await newDevice('keyauth');
    const revokedClient = await newDevice('keyauth-revoked');
    const other = await newDevice('other');
    const deviceBase = server.deviceUrl;
    const apiBase = server.apiUrl;
    const phoenixGrant = { route: 'firmware', firmwareId: fw.id } as const;
    const phoenixUrl = signDownloadUrl({
      baseUrl: deviceBase,
      secret: server.secret,
      grant: phoenixGrant,
      expiresAt: new Date(Date.now() + HOUR),
    });
    const foreign = signDownload(server.secret, { route: 'grisp', firmwareId: fw.id }, new Date(Date.now() + HOUR));
    const grispUrl = `${grispEdgeOf(server.deviceListener.app)!.packageUrl(pkg)}/blocks/0.bin`;
    const wifidogx = wifidogxEdgeOf(server.api)!;
    const gatewayUrl = wifidogx.firmwareUrl(fw, gateway.id);
    const revokedGatewayUrl = wifidogx.firmwareUrl(fw, revokedGateway.id);
    const keyauthUrl = (deviceId: string) =>
      keyauthDownloadUrl({ baseUrl: apiBase, secret: server.secret, firmwareId: fw.id, deviceId, ttlSeconds: 3600 })
        .url;
    const clientUrl = keyauthUrl(client.id);
    const revokedClientUrl = keyauthUrl(revokedClient.id);
    await revoke(revokedGateway.id);
    await revoke(revokedClient.id);
    const mainServerUrl = `${apiBase}/api/main-server/download-update?package_id=${fw.id}`;
    const badSignature = /signature is invalid/;
    const expired = /has expired/;

    const imageBlob = sha(image);
    const pkgBlob = (
      await server.database.db
        .selectFrom('firmware')
        .select('sha256')
        .where('id', '=', pkg.id)
        .executeTakeFirstOrThrow()
    ).sha256!;
    cases.phoenix = {
      bytes: image,
      blob: imageBlob,
      missing: /"code":"not_found".*not stored on the server/,
      url: phoenixUrl,
      cert,
      cacheControl: /^private, max-age=86400, immutable$/,
      refusals: [
        { what: 'an expired URL', url: expiredUrl(deviceBase, phoenixGrant), status: 403, message: expired },
        { what: 'a tampered signature', url: tampered(phoenixUrl), status: 403, message: badSignature },
        {
          what: 'a signature made for another route (GRiSP) with the same firmware and expiry',
          url: `${deviceBase}/firmware/${fw.id}?expires=${foreign.expires}&sig=${foreign.sig}`,
          status: 403,
          message: badSignature,
        },
        {
          what: 'a URL without its signature',
          url: phoenixUrl.replace(/&sig=.*$/, ''),
          status: 403,
          message: /incomplete/,
        },
      ],
    };
    cases.grisp = {
      bytes: block,
      blob: pkgBlob,
      missing: /"code":"not_found".*not a stored GRiSP package/,
      url: grispUrl,
      cert,
      cacheControl: /^private, max-age=86400, immutable$/,
      refusals: [
        {
          what: 'an expired URL',
          url: `${expiredUrl(deviceBase, { route: 'grisp', firmwareId: pkg.id })}/blocks/0.bin`,
          status: 403,
          message: expired,
        },
        { what: 'a tampered signature', url: tampered(grispUrl), status: 403, message: badSignature },
        {
          what: 'a signature that is not 64 hex digits',
          url: grispUrl.replace(/\/[0-9a-f]{64}\//, '/not-a-signature/'),
          status: 403,
          message: /malformed/,
        },
      ],
    };
    /** A route whose URL is the credential: bound to its device, which must be approved now. */
    const deviceBound = (
      route: 'wifidogx' | 'keyauth',
      url: string,
      deviceId: string,
      revoked: Refusal,
    ): RouteCase => ({
      bytes: image,
      blob: imageBlob,
      missing:
        route === 'wifidogx' ? /"code":"not_found".*not stored on the server/ : /"error":"Not found".*not stored/,
      url,
      cacheControl: /^no-store$/,
      refusals: [
        {
          what: 'an expired URL',
          url: expiredUrl(apiBase, { route, firmwareId: fw.id, deviceId }),
          status: 403,
          message: expired,
        },
        { what: 'a tampered signature', url: tampered(url), status: 403, message: badSignature },
        {
          what: "another device's id in the URL",
          url: url.replace(deviceId, other.id),
          status: 403,
          message: badSignature,
        },
        revoked,
      ],
    });
    cases.wifidogx = deviceBound('wifidogx', gatewayUrl, gateway.id, {
      what: "a revoked gateway's URL",
      url: revokedGatewayUrl,
      status: 403,
      message: /gateway is revoked/,
    });
    cases.keyauth = deviceBound('keyauth', clientUrl, client.id, {
      what: "a revoked device's URL",
      url: revokedClientUrl,
      status: 403,
      message: /may not download this firmware/,
    });
    cases['main-server'] = {
      bytes: image,
      blob: imageBlob,
      missing: /"error":.*has no uploaded image/,
      url: mainServerUrl,
      headers: { authorization: `Bearer ${server.adminToken}` },
      cacheControl: /^private, max-age=86400, immutable$/,
      refusals: [
        { what: 'no token', url: mainServerUrl, headers: { authorization: '' }, status: 401, message: /Bearer/ },
        {
          what: 'a wrong token',
          url: mainServerUrl,
          headers: { authorization: 'Bearer fhd_not-a-token' },
          status: 401,
          message: /./,
        },
      ],
    };
  });
  after(async () => {
    await server?.close();
  });

  for (const name of ROUTES) {
    describe(name, () => {
      const r = () => cases[name];
      const size = () => r().bytes.length;

      it('GET answers all bytes with a strong ETag, Last-Modified, Accept-Ranges, its cache policy', async () => {
        const res = await fetchRoute(r());
        assert.equal(res.status, 200);
        assert.equal(res.headers['content-length'], String(size()));
        assert.equal(res.body.length, size());
        assert.equal(sha(res.body), sha(r().bytes));
        assert.equal(res.headers['accept-ranges'], 'bytes');
        assert.match(String(res.headers.etag), /^"[0-9a-f]{64}(:[A-Za-z0-9._/-]+)?"$/);
        assert.ok(!Number.isNaN(Date.parse(String(res.headers['last-modified']))), 'a Last-Modified date');
        assert.match(String(res.headers['cache-control']), r().cacheControl);
      });

      it('HEAD answers the GET headers without a body, and ignores Range', async () => {
        const get = await fetchRoute(r(), { abortAfter: 1 });
        for (const headers of [{}, { range: 'bytes=0-9' }] as Record<string, string>[]) {
          const head = await fetchRoute(r(), { method: 'HEAD', headers });
          assert.equal(head.status, 200);
          assert.equal(head.body.length, 0);
          for (const h of ['content-length', 'etag', 'last-modified', 'cache-control', 'accept-ranges', 'content-type'])
            assert.equal(head.headers[h], get.headers[h], h);
        }
      });

      it('Range a-b, a- and a clamped end answer 206 with Content-Range and exactly those bytes', async () => {
        const n = size();
        for (const [header, start, end] of [
          ['bytes=10-19', 10, 19],
          [`bytes=${n - 5}-`, n - 5, n - 1],
          [`bytes=${n - 10}-${n + 1000}`, n - 10, n - 1],
          ['bytes=0-0', 0, 0],
        ] as const) {
          const res = await fetchRoute(r(), { headers: { range: header } });
          assert.equal(res.status, 206, header);
          assert.equal(res.headers['content-range'], `bytes ${start}-${end}/${n}`, header);
          assert.equal(res.headers['content-length'], String(end - start + 1), header);
          assert.deepEqual(res.body, r().bytes.subarray(start, end + 1), header);
        }
      });

      it('a suffix range answers the last bytes (and all of them when longer than the entity)', async () => {
        const n = size();
        const last = await fetchRoute(r(), { headers: { range: 'bytes=-100' } });
        assert.equal(last.status, 206);
        assert.equal(last.headers['content-range'], `bytes ${n - 100}-${n - 1}/${n}`);
        assert.deepEqual(last.body, r().bytes.subarray(n - 100));
        const all = await fetchRoute(r(), { headers: { range: `bytes=-${n * 2}` } });
        assert.equal(all.status, 206);
        assert.equal(all.headers['content-range'], `bytes 0-${n - 1}/${n}`);
        assert.equal(sha(all.body), sha(r().bytes));
      });

      it('several ranges, an invalid range or another unit answer the whole entity (200)', async () => {
        for (const range of ['bytes=0-1,5-6', 'bytes=9-2', 'bytes=abc', 'bytes=-', 'items=0-1']) {
          const res = await fetchRoute(r(), { headers: { range } });
          assert.equal(res.status, 200, range);
          assert.equal(res.headers['content-range'], undefined, range);
          assert.equal(sha(res.body), sha(r().bytes), range);
        }
      });

      it('a range past the end, or an empty suffix, answers 416 with bytes */size', async () => {
        for (const range of [`bytes=${size()}-`, `bytes=${size() + 10}-${size() + 20}`, 'bytes=-0']) {
          const res = await fetchRoute(r(), { headers: { range } });
          assert.equal(res.status, 416, range);
          assert.equal(res.headers['content-range'], `bytes */${size()}`, range);
          assert.equal(res.body.length, 0, range);
        }
      });

      it('If-Range with the current ETag serves the range; another or a weak tag serves everything', async () => {
        const { headers } = await fetchRoute(r(), { method: 'HEAD' });
        const etag = String(headers.etag);
        const match = await fetchRoute(r(), { headers: { range: 'bytes=5-9', 'if-range': etag } });
        assert.equal(match.status, 206);
        assert.deepEqual(match.body, r().bytes.subarray(5, 10));
        for (const stale of ['"0000"', `W/${etag}`]) {
          const res = await fetchRoute(r(), { headers: { range: 'bytes=5-9', 'if-range': stale } });
          assert.equal(res.status, 200, stale);
          assert.equal(sha(res.body), sha(r().bytes), stale);
        }
      });

      it('If-Range with the Last-Modified date serves the range; another date serves everything', async () => {
        const { headers } = await fetchRoute(r(), { method: 'HEAD' });
        const date = String(headers['last-modified']);
        const match = await fetchRoute(r(), { headers: { range: 'bytes=5-9', 'if-range': date } });
        assert.equal(match.status, 206);
        assert.deepEqual(match.body, r().bytes.subarray(5, 10));
        for (const other of [new Date(Date.parse(date) - HOUR).toUTCString(), 'not a date']) {
          const res = await fetchRoute(r(), { headers: { range: 'bytes=5-9', 'if-range': other } });
          assert.equal(res.status, 200, other);
          assert.equal(sha(res.body), sha(r().bytes), other);
        }
      });

      it('If-None-Match with the ETag (weak comparison, or *) answers 304, validators, no body', async () => {
        const { headers } = await fetchRoute(r(), { method: 'HEAD' });
        const etag = String(headers.etag);
        for (const inm of [etag, `W/${etag}`, `"0000", ${etag}`, '*']) {
          for (const method of ['GET', 'HEAD']) {
            const res = await fetchRoute(r(), { method, headers: { 'if-none-match': inm, range: 'bytes=0-9' } });
            assert.equal(res.status, 304, `${method} ${inm}`);
            assert.equal(res.body.length, 0);
            assert.equal(res.headers.etag, etag);
            assert.equal(res.headers['cache-control'], headers['cache-control']);
          }
        }
        const miss = await fetchRoute(r(), { headers: { 'if-none-match': '"0000"' } });
        assert.equal(miss.status, 200);
        assert.equal(sha(miss.body), sha(r().bytes));
      });

      it('If-Modified-Since: 304 from Last-Modified on, 200 before it; If-None-Match wins', async () => {
        const { headers } = await fetchRoute(r(), { method: 'HEAD' });
        const date = Date.parse(String(headers['last-modified']));
        const since = (t: number, extra: Record<string, string> = {}) =>
          fetchRoute(r(), { method: 'HEAD', headers: { 'if-modified-since': new Date(t).toUTCString(), ...extra } });
        assert.equal((await since(date)).status, 304);
        assert.equal((await since(date + HOUR)).status, 304);
        assert.equal((await since(date - HOUR)).status, 200);
        assert.equal((await since(date, { 'if-none-match': '"0000"' })).status, 200);
      });

      it('refuses expired, tampered and foreign URLs with a clear error and none of the bytes', async () => {
        for (const refusal of r().refusals) {
          for (const method of ['GET', 'HEAD']) {
            const res = await fetchRoute(r(), { method, url: refusal.url, headers: refusal.headers });
            assert.equal(res.status, refusal.status, `${method} ${refusal.what}`);
            if (method === 'HEAD') continue;
            assert.match(JSON.stringify(json(res)), refusal.message, refusal.what);
            assert.ok(res.body.length < 1000, refusal.what);
          }
        }
      });

      it("a blob deleted between the route's check and the open answers 404 in the route's format, not 500", async () => {
        for (const headers of [{}, { range: 'bytes=10-19' }] as Record<string, string>[]) {
          deleteBeforeOpen = r().blob;
          const res = await fetchRoute(r(), { headers });
          assert.equal(deleteBeforeOpen, undefined, 'the route opened the blob');
          assert.equal(res.status, 404, JSON.stringify(headers));
          assert.match(String(res.headers['content-type']), /^application\/json/);
          assert.equal(res.headers['content-range'], undefined);
          assert.equal(res.headers.etag, undefined);
          assert.match(JSON.stringify(json(res)), r().missing);
        }
        const next = await fetchRoute(r(), { headers: { range: 'bytes=10-19' } });
        assert.equal(next.status, 206, 'the blob is back: served again');
        assert.deepEqual(next.body, r().bytes.subarray(10, 20));
      });

      it('stops reading and closes the blob when the client leaves mid-stream, then serves the next', async (t) => {
        const from = readers.length;
        const res = await fetchRoute(r(), { abortAfter: 64 * 1024 });
        assert.equal(res.aborted, true);
        assert.ok(res.body.length < size());
        const reader = await until(() => (readers[from]?.closed ? readers[from] : undefined), 'the blob closed');
        assert.equal(readers.length, from + 1, 'one reader for one download');
        assert.ok(reader.bytesRead < size(), `the server read ${reader.bytesRead} of ${size()} bytes`);
        t.diagnostic(`the server read ${reader.bytesRead} of ${size()} bytes before the client went away`);
        const next = await fetchRoute(r());
        assert.equal(next.status, 200);
        assert.equal(sha(next.body), sha(r().bytes));
      });
    });
  }
});
