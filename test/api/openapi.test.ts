/**
 * The OpenAPI document a started server serves at /api/docs/json: both linters pass (Redocly
 * `recommended`: 0 errors and only the warnings listed below, each with its reason; Spectral
 * `spectral:oas`: 0 errors, 0 warnings), and the conventions a generated client relies on hold
 * for every operation — a unique operationId, named component schemas, one error schema, the same
 * paging parameters and envelope on every list, a request body for every upload.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { redoclyLint, spectralLint } from '../helpers/openapi-lint.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import type { Items } from './harness.ts';

/** Redocly warnings the document keeps on purpose: `rule pointer` → why. */
const ACCEPTED_WARNINGS: Record<string, string> = {
  'operation-4xx-response #/paths/~1healthz/get/responses':
    'the health probe takes no input and needs no credentials: it answers 200 or 503, never a 4xx',
  'operation-4xx-response #/paths/~1readyz/get/responses': 'the readiness probe, as /healthz: 200 or 503, never a 4xx',
  'operation-4xx-response #/paths/~1livez/get/responses': 'the liveness probe answers 200 while the process serves',
};

/**
 * Response schemas that may leave some of their properties out of `required`: `schema` → why.
 * Every other schema a success response uses requires each of its properties.
 */
const PARTIAL_RESPONSE_SCHEMAS: Record<string, string> = {
  // The deployment schemas are being reworked in a change of their own, which settles which of
  // their fields are always present; until then they keep the required lists they have.
  Deployment: 'reworked with phased deployments',
  DeploymentSummary: 'reworked with phased deployments',
  DeploymentStage: 'reworked with phased deployments',
  DeploymentDevice: 'reworked with phased deployments',
  DeploymentThreshold: 'exactly one of count and percent, never both',
};

type Operation = {
  operationId?: string;
  parameters?: Array<{ name: string; in: string }>;
  requestBody?: { content: Record<string, unknown> };
  responses: Record<string, { content?: Record<string, { schema: Schema }> }>;
};

/** The parts of a JSON schema these tests read. */
interface Schema {
  type?: string;
  required?: string[];
  format?: string;
  $ref?: string;
  properties: Record<string, Schema>;
}

/** The parts of the OpenAPI document these tests read. */
interface OpenApiDocument {
  servers: Array<{ url: string }>;
  paths: Record<string, Record<string, Operation>>;
  components: { schemas: Record<string, Schema> };
}

describe('OpenAPI document', () => {
  let server: TestServer;
  let doc: OpenApiDocument;
  const operations: Array<{ method: string; path: string; op: Operation }> = [];

  before(async () => {
    server = await startTestServer();
    const res = await fetch(`${server.apiUrl}/api/docs/json`);
    assert.equal(res.status, 200);
    doc = (await res.json()) as OpenApiDocument;
    for (const [path, item] of Object.entries(doc.paths))
      for (const [method, op] of Object.entries(item)) operations.push({ method, path, op });
  });
  after(() => server?.close());

  test('Redocly lint (recommended): 0 errors, only the accepted warnings', async () => {
    const problems = await redoclyLint(doc);
    const errors = problems.filter((p) => p.severity === 'error');
    assert.deepEqual(errors, [], 'Redocly errors');
    const unexpected = problems.filter((p) => !(`${p.rule} ${p.where}` in ACCEPTED_WARNINGS));
    assert.deepEqual(unexpected, [], 'Redocly warnings nobody gave a reason for');
    assert.ok(problems.length <= Object.keys(ACCEPTED_WARNINGS).length);
  });

  test('Spectral lint (spectral:oas): 0 errors and 0 warnings', async () => {
    const problems = await spectralLint(doc);
    assert.deepEqual(
      problems.filter((p) => p.severity === 'error' || p.severity === 'warn'),
      [],
    );
  });

  test('servers names the server that serves the document', () => {
    assert.deepEqual(
      doc.servers.map((s) => s.url),
      [server.apiUrl],
    );
  });

  test('every operation has a unique operationId', () => {
    const ids = operations.map(({ op }) => op.operationId);
    assert.ok(operations.length > 70, `${operations.length} operations`);
    for (const { method, path, op } of operations)
      assert.match(op.operationId ?? '', /^[a-z][A-Za-z]+$/, `${method} ${path}`);
    assert.equal(new Set(ids).size, ids.length, 'duplicate operationIds');
  });

  test('component schemas are named, and every $ref resolves to one', () => {
    const names = Object.keys(doc.components.schemas);
    assert.ok(names.includes('Device') && names.includes('ApiErrorBody') && names.includes('Webhook'), names.join());
    assert.deepEqual(
      names.filter((n) => /^def-\d+$/.test(n)),
      [],
    );
    const refs = JSON.stringify(doc.paths).match(/"\$ref":"[^"]+"/g) ?? [];
    for (const ref of new Set(refs)) {
      const name = ref.slice('"$ref":"#/components/schemas/'.length, -1);
      assert.ok(ref.startsWith('"$ref":"#/components/schemas/') && names.includes(name), ref);
    }
  });

  test('every error response is the one ApiErrorBody schema', () => {
    let checked = 0;
    for (const { method, path, op } of operations) {
      for (const [status, response] of Object.entries(op.responses)) {
        // The health probes' 503 is their readiness answer `{status: unavailable}`, not an error.
        if (Number(status) < 400 || ['/healthz', '/readyz', '/livez'].includes(path)) continue;
        const schema = response.content?.['application/json']?.schema;
        assert.deepEqual(schema, { $ref: '#/components/schemas/ApiErrorBody' }, `${method} ${path} ${status}`);
        checked++;
      }
    }
    assert.ok(checked > 200, `${checked} error responses`);
  });

  test('every list takes limit and offset and answers {items, total?}', () => {
    const lists = operations.filter(({ op }) => {
      const schema = op.responses['200']?.content?.['application/json']?.schema;
      return schema?.properties?.items?.type === 'array' || schema?.type === 'array';
    });
    assert.ok(lists.length >= 21, `${lists.length} lists: ${lists.map((l) => l.path).join()}`);
    for (const { method, path, op } of lists) {
      const where = `${method} ${path}`;
      const schema = op.responses['200']!.content!['application/json']!.schema;
      assert.equal(schema.type, 'object', `${where}: a bare array`);
      assert.deepEqual(Object.keys(schema.properties).sort(), ['items', 'total'], where);
      const query = (op.parameters ?? []).filter((p) => p.in === 'query').map((p) => p.name);
      assert.ok(query.includes('limit') && query.includes('offset'), `${where}: ${query.join()}`);
    }
  });

  test('uploads have a request body naming the content types they take', () => {
    const upload = (path: string) =>
      (doc.paths[path]!.post!.requestBody?.content ?? {}) as Record<string, { schema: Schema }>;
    assert.deepEqual(Object.keys(upload('/api/v1/firmware')).sort(), ['application/json', 'application/octet-stream']);
    assert.deepEqual(upload('/api/v1/firmware')['application/octet-stream']!.schema, {
      type: 'string',
      format: 'binary',
    });
    assert.deepEqual(Object.keys(upload('/api/v1/grisp/firmware')), ['application/octet-stream']);
    assert.deepEqual(Object.keys(upload('/api/v1/main-server/packages')).sort(), [
      'application/octet-stream',
      'application/zip',
    ]);
  });

  test('paging: limit and offset pick a page, total counts every match', async () => {
    for (const name of ['page-a', 'page-b', 'page-c'])
      await server.call('POST', '/api/v1/orgs/default/groups', { product: 'default', name });
    const all = await server.call<Items<{ name: string }>>('GET', '/api/v1/orgs/default/groups');
    const page = await server.call<Items<{ name: string }>>('GET', '/api/v1/orgs/default/groups?limit=2&offset=1');
    assert.equal(all.total, 3);
    assert.equal(page.total, 3);
    assert.deepEqual(
      page.items.map((g) => g.name),
      all.items.slice(1, 3).map((g) => g.name),
    );
    const tooMany = await fetch(`${server.apiUrl}/api/v1/orgs/default/groups?limit=1001`, {
      headers: { authorization: `Bearer ${server.adminToken}` },
    });
    assert.equal(tooMany.status, 400);
    assert.equal(((await tooMany.json()) as { error: { code: string } }).error.code, 'invalid');
  });

  test('response fields that are always present are required, so a client types them as present', async () => {
    // Every component schema a success response uses, directly or through another schema.
    const refsIn = (value: unknown) =>
      [...JSON.stringify(value).matchAll(/"\$ref":"#\/components\/schemas\/([^"]+)"/g)].map((m) => m[1]!);
    const used = new Set(
      operations.flatMap(({ op }) =>
        Object.entries(op.responses)
          .filter(([status]) => status.startsWith('2'))
          .flatMap(([, response]) => refsIn(response)),
      ),
    );
    for (const name of used) for (const inner of refsIn(doc.components.schemas[name])) used.add(inner);
    for (const name of ['User', 'ApiToken', 'SignerCa', 'DeviceCertificate', 'Webhook', 'AuditEntry', 'Deployment'])
      assert.ok(used.has(name), `${name} is a response schema`);
    // Rows the API answers whole: every field is present (null where the column is), always.
    for (const name of used) {
      const schema = doc.components.schemas[name]!;
      if (name in PARTIAL_RESPONSE_SCHEMAS || !schema.properties) continue;
      assert.deepEqual(
        [...(schema.required ?? [])].sort(),
        Object.keys(schema.properties).sort(),
        `${name}: every property required (or a reason in PARTIAL_RESPONSE_SCHEMAS)`,
      );
    }
    // Everywhere: what is required is a property, and every list envelope requires its items.
    for (const [name, schema] of Object.entries(doc.components.schemas))
      for (const field of schema.required ?? [])
        assert.ok(!schema.properties || field in schema.properties, `${name}.${field} is required but not a property`);
    // And real answers carry them: a group, a firmware record and the org hold every required field.
    await server.call('POST', '/api/v1/orgs/default/groups', { product: 'default', name: 'required-fields' });
    const upload = await fetch(`${server.apiUrl}/api/v1/firmware?org=default&product=default&version=9.9.9`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/octet-stream' },
      body: Buffer.alloc(64, 1),
    });
    assert.equal(upload.status, 201);
    const answers: Array<[string, Record<string, unknown>]> = [
      ['Group', (await server.call<Items<Record<string, unknown>>>('GET', '/api/v1/orgs/default/groups')).items[0]!],
      [
        'Firmware',
        (await server.call<Items<Record<string, unknown>>>('GET', '/api/v1/orgs/default/firmware')).items[0]!,
      ],
      ['Org', await server.call<Record<string, unknown>>('GET', '/api/v1/orgs/default')],
      ['User', (await server.call<Items<Record<string, unknown>>>('GET', '/api/v1/users')).items[0]!],
      [
        'AuditEntry',
        (await server.call<Items<Record<string, unknown>>>('GET', '/api/v1/orgs/default/audit')).items[0]!,
      ],
      [
        'Webhook',
        await server.call<Record<string, unknown>>('POST', '/api/v1/orgs/default/webhooks', {
          url: 'http://127.0.0.1:9/hooks',
          events: ['target.changed'],
        }),
      ],
    ];
    for (const [name, body] of answers)
      for (const field of doc.components.schemas[name]!.required!) assert.ok(field in body, `${name}.${field}`);
  });
});
