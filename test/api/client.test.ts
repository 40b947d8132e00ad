/**
 * `fleethub/client`, the client generated from the OpenAPI document: the committed types match
 * what the running server's document renders to (so a route change without `npm run
 * generate:client` fails here), and a rollout round-trips through it against a real server —
 * create a group, stream a firmware image up, set the group's target, read the group's status.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { renderClientSchema, SCHEMA_FILE } from '../../client/generate.ts';
import { createFleethubClient, data, FleethubApiError, listAll, type FleethubClient } from 'fleethub/client';
import { DATABASE_KIND } from '../helpers/db.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

/** fetch needs `duplex: 'half'` to send a stream body (not yet in TypeScript's RequestInit). */
const STREAMED = { duplex: 'half' } as object;

describe(`generated API client (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let api: FleethubClient;

  before(async () => {
    server = await startTestServer();
    api = createFleethubClient({ url: server.apiUrl, token: server.adminToken });
  });
  after(() => server?.close());

  test('client/schema.ts is what the served document renders to (else: npm run generate:client)', async () => {
    const document = (await (await fetch(`${server.apiUrl}/api/docs/json`)).json()) as object;
    const expected = await renderClientSchema(document);
    const committed = readFileSync(SCHEMA_FILE, 'utf8');
    assert.ok(committed === expected, 'client/schema.ts is stale: run `npm run generate:client` and commit it');
  });

  test('round trip: create a group, upload firmware, set the target, read the status', async () => {
    const org = 'default';
    const group = await data(
      api.POST('/api/v1/orgs/{org}/groups', {
        params: { path: { org } },
        body: { product: 'default', name: 'canary', priority: 10 },
      }),
    );
    assert.equal(group.name, 'canary');

    const image = randomBytes(256 * 1024);
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < image.length; i += 64 * 1024) controller.enqueue(image.subarray(i, i + 64 * 1024));
        controller.close();
      },
    });
    const firmware = await data(
      api.POST('/api/v1/firmware', {
        params: { query: { org, product: 'default', version: '3.1.0' } },
        body: stream,
        bodySerializer: (body) => body as BodyInit,
        headers: { 'content-type': 'application/octet-stream' },
        ...STREAMED,
      }),
    );
    assert.equal(firmware.version, '3.1.0');
    assert.equal(firmware.size, image.length);

    const change = await data(
      api.PUT('/api/v1/orgs/{org}/groups/{group}/target', {
        params: { path: { org, group: 'canary' } },
        body: { version: '3.1.0' },
      }),
    );
    assert.equal(change.target?.firmware_id, firmware.id);

    const status = await data(
      api.GET('/api/v1/orgs/{org}/groups/{group}/status', { params: { path: { org, group: group.id } } }),
    );
    assert.equal(status.devices, 0);
    assert.equal(status.target?.firmware_id, firmware.id);

    const groups = await listAll((page) =>
      api.GET('/api/v1/orgs/{org}/groups', { params: { path: { org }, query: page } }),
    );
    assert.deepEqual(
      groups.map((g) => g.name),
      ['canary'],
    );
  });

  test('an error answer becomes a FleethubApiError with the server code and message', async () => {
    const error = await data(
      api.GET('/api/v1/orgs/{org}/groups/{group}', { params: { path: { org: 'default', group: 'nope' } } }),
    ).catch((err: unknown) => err);
    assert.ok(error instanceof FleethubApiError);
    assert.equal(error.status, 404);
    assert.equal(error.code, 'not_found');
    assert.match(error.message, /group "nope" not found/);

    const anonymous = createFleethubClient({ url: server.apiUrl });
    const refused = await data(anonymous.GET('/api/v1/orgs')).catch((err: unknown) => err);
    assert.ok(refused instanceof FleethubApiError);
    assert.equal(refused.status, 401);
  });
});
