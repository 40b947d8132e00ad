import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Firmware } from '../db/schema.ts';
import type { FleetContext } from '../fleet/context.ts';
import { isUuid } from '../fleet/errors.ts';
import { getProduct, type Product } from '../fleet/orgs.ts';
import { BlobStoreError } from '../firmware/blob-store.ts';
import {
  FirmwareError,
  ingestFirmware,
  registerFirmwareMetadata,
  type FirmwareMetadata,
  type FirmwareStoreDeps,
} from '../firmware/ingest.ts';
import {
  addSigningKey,
  listSigningKeys,
  removeSigningKey,
  SigningKeyError,
  type ProductSigningKey,
} from '../firmware/signing-keys.ts';
import { SigningError } from '../firmware/signing.ts';
import { assertOrgAccess, requireRole, type OperatorPrincipal } from './auth.ts';
import { ApiError } from '../http/errors.ts';
import { resolveOrg } from '../http/resolve.ts';
import { passThroughStream, uploadStream } from '../http/upload.ts';
import { binaryBody, documentedUpload, page, pageOf, paginationQuery } from '../http/schemas.ts';

export type FirmwareApiDeps = FirmwareStoreDeps;

/** Metadata an upload may carry in the query string or as `X-Firmware-<Name>` headers. */
const UPLOAD_FIELDS = [
  'product',
  'org',
  'version',
  'component',
  'platform',
  'architecture',
  'format',
  'uuid',
  'signature',
] as const;
type UploadField = (typeof UPLOAD_FIELDS)[number];

const errorResponse = { $ref: 'ApiErrorBody#' };
const firmwareSchema = { $ref: 'Firmware#' };
const signingKeySchema = { $ref: 'SigningKey#' };

/** JSON metadata of firmware stored elsewhere (the upload's other body). */
const metadataBody = {
  schema: {
    type: 'object',
    required: ['product', 'version'],
    properties: {
      ...Object.fromEntries(UPLOAD_FIELDS.map((f) => [f, { type: 'string' }])),
      sha256: { type: 'string', pattern: '^[0-9a-f]{64}$' },
      size: { type: 'integer', minimum: 0 },
      metadata: { type: 'object', additionalProperties: true },
    },
  },
};

/** Registers `POST /firmware` and `/products/:id/signing-keys` on the `/api/v1` scope. */
export async function firmwareApiRoutes(api: FastifyInstance, deps: FirmwareApiDeps): Promise<void> {
  // Own scope: the pass-through octet-stream parser must not leak to other routes.
  await api.register(async (scope) => {
    // JSON (metadata) or the raw image; any other type is 415 (text/plain would reach the store as a string).
    scope.removeContentTypeParser('text/plain');
    // Hand the raw request stream to the route: no buffering, and no body limit (the store has one).
    scope.addContentTypeParser('application/octet-stream', passThroughStream);

    scope.post(
      '/firmware',
      {
        onRequest: requireRole('operator'),
        config: documentedUpload(
          'The image, streamed (`application/octet-stream`, metadata in the query or `X-Firmware-<Name>` headers), or JSON metadata of firmware stored elsewhere',
          { 'application/octet-stream': binaryBody, 'application/json': metadataBody },
        ),
        schema: {
          operationId: 'uploadFirmware',
          tags: ['firmware'],
          summary: 'Upload a firmware image (streamed) or register firmware metadata',
          description:
            'Send the image as `application/octet-stream` with metadata in the query string (`product`, `version`, `org`, `component`, `platform`, `architecture`, `format`, `uuid`, `signature`) or as `X-Firmware-<Name>` headers. ' +
            "The server computes sha256 and size while streaming, verifies the ed25519 signature (over the raw sha256 digest) against the product's signing keys, and answers 201 (created), 200 (identical image already uploaded) or 409 (same version, different bytes). " +
            'A JSON body `{product, version, sha256?, size?, ...}` registers firmware stored elsewhere (no image).',
          querystring: {
            type: 'object',
            properties: Object.fromEntries(UPLOAD_FIELDS.map((f) => [f, { type: 'string' }])),
          },
          response: {
            200: firmwareSchema,
            201: firmwareSchema,
            400: errorResponse,
            401: errorResponse,
            403: errorResponse,
            404: errorResponse,
            409: errorResponse,
            413: errorResponse,
            415: errorResponse,
          },
        },
      },
      async (request, reply) => {
        const principal = request.operator;
        try {
          if (isJson(request)) {
            const body = (request.body ?? {}) as Record<string, unknown>;
            const product = await resolveProduct(deps.fleet, principal, str(body.product), str(body.org));
            const firmware = await registerFirmwareMetadata(deps, principal.actor, product, {
              ...metadataFrom((f) => str(body[f])),
              sha256: str(body.sha256) ?? null,
              size: body.size === undefined || body.size === null ? null : Number(body.size),
              metadata: isRecord(body.metadata) ? body.metadata : undefined,
            });
            return reply.status(201).send(firmwareJson(firmware));
          }
          const field = (f: UploadField) =>
            str((request.query as Record<string, unknown>)[f]) ?? str(request.headers[`x-firmware-${f}`]);
          const product = await resolveProduct(deps.fleet, principal, field('product'), field('org'));
          const meta = metadataFrom(field);
          const { firmware, created } = await ingestFirmware(
            deps,
            principal.actor,
            product,
            meta,
            uploadStream(request, 'image', 'application/octet-stream (or JSON metadata as application/json)'),
          );
          request.log.info(
            {
              firmware_id: firmware.id,
              version: firmware.version,
              sha256: firmware.sha256,
              size: firmware.size,
              created,
            },
            'firmware uploaded',
          );
          return reply.status(created ? 201 : 200).send(firmwareJson(firmware));
        } catch (err) {
          throw toApiError(err);
        }
      },
    );
  });

  api.get(
    '/products/:id/signing-keys',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listSigningKeys',
        tags: ['firmware'],
        summary: "List a product's firmware signing keys (ed25519 public keys)",
        params: { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] },
        querystring: { type: 'object', properties: { ...paginationQuery, org: { type: 'string' } } },
        response: { 200: pageOf('SigningKey'), 400: errorResponse, 401: errorResponse, 404: errorResponse },
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const product = await resolveProduct(deps.fleet, request.operator, id, (request.query as { org?: string }).org);
      return page((await listSigningKeys(deps.fleet.db, product.id)).map(signingKeyJson), request.query);
    },
  );

  api.post(
    '/products/:id/signing-keys',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'addSigningKey',
        tags: ['firmware'],
        summary: 'Register a firmware signing key for a product',
        params: { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] },
        querystring: { type: 'object', properties: { org: { type: 'string' } } },
        body: {
          type: 'object',
          required: ['name', 'public_key_pem'],
          properties: {
            name: { type: 'string', minLength: 1, maxLength: 100 },
            public_key_pem: { type: 'string', minLength: 1 },
          },
        },
        response: {
          201: signingKeySchema,
          400: errorResponse,
          401: errorResponse,
          403: errorResponse,
          404: errorResponse,
          409: errorResponse,
        },
      },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      const body = request.body as { name: string; public_key_pem: string };
      const product = await resolveProduct(deps.fleet, request.operator, id, (request.query as { org?: string }).org);
      try {
        const key = await addSigningKey(deps.fleet.db, request.operator.actor, product.id, {
          name: body.name,
          publicKeyPem: body.public_key_pem,
        });
        return reply.status(201).send(signingKeyJson(key));
      } catch (err) {
        throw toApiError(err);
      }
    },
  );

  api.delete(
    '/products/:id/signing-keys/:key',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'removeSigningKey',
        tags: ['firmware'],
        summary: 'Remove a firmware signing key (by id or name)',
        params: {
          type: 'object',
          properties: { id: { type: 'string' }, key: { type: 'string' } },
          required: ['id', 'key'],
        },
        querystring: { type: 'object', properties: { org: { type: 'string' } } },
        response: { 200: signingKeySchema, 401: errorResponse, 403: errorResponse, 404: errorResponse },
      },
    },
    async (request) => {
      const { id, key } = request.params as { id: string; key: string };
      const product = await resolveProduct(deps.fleet, request.operator, id, (request.query as { org?: string }).org);
      try {
        return signingKeyJson(await removeSigningKey(deps.fleet.db, request.operator.actor, product.id, key));
      } catch (err) {
        throw toApiError(err);
      }
    },
  );
}

/**
 * The product a request names: a product UUID, or a name together with `org` (or the caller's
 * own org). Other orgs' products answer 404.
 */
async function resolveProduct(
  fleet: FleetContext,
  principal: OperatorPrincipal,
  ref: string | undefined,
  orgRef: string | undefined,
): Promise<Product> {
  if (!ref)
    throw new ApiError(
      400,
      'invalid',
      'name the product: pass product=<id or name> (with org=<org> when using a name)',
      { field: 'product' },
    );
  let orgId: string | undefined;
  if (orgRef) orgId = (await resolveOrg(fleet, principal, orgRef)).id;
  else if (principal.orgId) orgId = principal.orgId;
  else if (isUuid(ref)) {
    orgId = (await fleet.db.selectFrom('products').select('org_id').where('id', '=', ref).executeTakeFirst())?.org_id;
    if (!orgId) throw new ApiError(404, 'not_found', `product ${ref} not found`);
  } else {
    throw new ApiError(
      400,
      'invalid',
      `product ${JSON.stringify(ref)} is a name: also pass org=<org id or name>, or use the product id`,
      { field: 'org' },
    );
  }
  assertOrgAccess(principal, orgId, 'product');
  return getProduct(fleet, orgId, ref);
}

function metadataFrom(field: (f: UploadField) => string | undefined): FirmwareMetadata {
  const version = field('version');
  if (!version) throw new ApiError(400, 'invalid', 'pass the firmware version (version=1.2.3)', { field: 'version' });
  const uuid = field('uuid');
  if (uuid !== undefined && !isUuid(uuid))
    throw new ApiError(400, 'invalid', "uuid must be a UUID (the firmware's meta-uuid)", { field: 'uuid' });
  return {
    version,
    component: field('component'),
    platform: field('platform') ?? null,
    architecture: field('architecture') ?? null,
    format: field('format'),
    uuid,
    signature: field('signature') ?? null,
  };
}

/** Maps the firmware module's errors to the API's error shape (FleetError passes through). */
function toApiError(err: unknown): unknown {
  if (err instanceof FirmwareError) return new ApiError(err.status, err.code, err.message, err.details);
  if (err instanceof SigningError) return new ApiError(400, err.code.toLowerCase(), err.message);
  if (err instanceof SigningKeyError) {
    const status = err.code === 'SIGNING_KEY_EXISTS' ? 409 : 404;
    return new ApiError(status, status === 409 ? 'conflict' : 'not_found', err.message);
  }
  if (err instanceof BlobStoreError)
    return new ApiError(err.code === 'BLOB_TOO_LARGE' ? 413 : 400, err.code.toLowerCase(), err.message);
  return err;
}

/** A firmware row as the API shows it. */
export function firmwareJson(firmware: Firmware): Record<string, unknown> {
  return { ...firmware, size: firmware.size === null ? null : Number(firmware.size) };
}

function signingKeyJson(key: ProductSigningKey): Record<string, unknown> {
  return { ...key };
}

function isJson(request: FastifyRequest): boolean {
  return /^application\/json\b/i.test(request.headers['content-type'] ?? '');
}

function str(value: unknown): string | undefined {
  if (Array.isArray(value)) value = value[0];
  return typeof value === 'string' && value.trim() !== '' ? value.trim() : undefined;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
