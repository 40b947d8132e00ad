/** Operator REST routes of the GRiSP edge (mounted inside /api/v1). */
import type { FastifyInstance } from 'fastify';
import { requireRole } from '../../http/auth.ts';
import { ApiError } from '../../http/errors.ts';
import { passThroughStream, uploadStream } from '../../http/upload.ts';
import { resolveDevice, resolveOrg } from '../../http/resolve.ts';
import {
  authErrors,
  binaryBody,
  documentedUpload,
  orgParam,
  pageOfItems,
  paginationQuery,
} from '../../http/schemas.ts';
import { getProduct, type FleetContext } from '../../fleet/index.ts';
import type { BlobStore } from '../../firmware/blob-store.ts';
import { deleteFirmwareAndBlob, FirmwareError, ingestFirmware } from '../../firmware/ingest.ts';
import type { GrispConnection } from './connection.ts';
import { GRISP_FORMAT, GrispPackageError, indexGrispPackage } from './package.ts';
import { createLinkToken, getGrispState, listLogEvents, unlinkDevice } from './store.ts';

export interface GrispRouteDeps {
  fleet: FleetContext;
  blobs: BlobStore;
  connections: Map<string, GrispConnection>;
}

const errorRef = { $ref: 'ApiErrorBody#' } as const;
const deviceParams = {
  type: 'object',
  required: ['org', 'device'],
  properties: { ...orgParam, device: { type: 'string', minLength: 1, description: 'device id or identifier' } },
} as const;
const logEvent = {
  type: 'object',
  properties: {
    id: { type: 'string' },
    seq: { type: ['integer', 'null'], description: "null: the board's log_drop event" },
    time: { type: ['string', 'null'] },
    level: { type: ['string', 'null'] },
    msg: {},
    meta: { type: 'object', additionalProperties: true },
    received_at: { type: 'string' },
  },
} as const;

export async function registerGrispRoutes(api: FastifyInstance, deps: GrispRouteDeps): Promise<void> {
  const { fleet } = deps;

  api.get<{
    Params: { org: string; device: string };
    Querystring: { limit: number; offset: number; before?: string; level?: string };
  }>(
    '/orgs/:org/devices/:device/logs',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listDeviceLogs',
        tags: ['grisp'],
        summary: "A GRiSP board's stored log events, newest first (page with offset, or before=<id> as a cursor)",
        params: deviceParams,
        querystring: {
          type: 'object',
          additionalProperties: false,
          properties: {
            ...paginationQuery,
            before: { type: 'string', pattern: '^[0-9]+$' },
            level: { type: 'string', maxLength: 20 },
          },
        },
        response: {
          200: pageOfItems(logEvent, { total: false }),
          ...authErrors,
        },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      const { limit, offset } = request.query;
      const events = await listLogEvents(fleet.db, device.id, { ...request.query, limit: limit + offset });
      return { items: events.slice(offset) };
    },
  );

  api.get<{ Params: { org: string; device: string } }>(
    '/orgs/:org/devices/:device/grisp',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getGrispDevice',
        tags: ['grisp'],
        summary: "A GRiSP board's state: system_info, update status, action required, link",
        params: deviceParams,
        response: { 200: { type: 'object', additionalProperties: true }, ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      const state = await getGrispState(fleet.db, device.id);
      if (!state)
        throw new ApiError(404, 'not_found', `device ${device.identifier} has never connected as a GRiSP board`);
      return {
        ...state,
        log_seq: state.log_seq === null ? null : Number(state.log_seq),
        log_dropped: Number(state.log_dropped),
        linked: state.linked_at !== null,
        connected_here: deps.connections.has(device.id),
      };
    },
  );

  api.post<{ Params: { org: string }; Body: { ttl_seconds?: number } }>(
    '/orgs/:org/grisp/link-tokens',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'createGrispLinkToken',
        tags: ['grisp'],
        summary: 'Create a single-use device linking token (boards send it with post device_linking_token)',
        params: { type: 'object', required: ['org'], properties: orgParam },
        body: {
          type: 'object',
          additionalProperties: false,
          properties: { ttl_seconds: { type: 'integer', minimum: 60, maximum: 30 * 86_400, default: 86_400 } },
        },
        response: {
          201: {
            type: 'object',
            properties: { id: { type: 'string' }, token: { type: 'string' }, expires_at: { type: 'string' } },
          },
          ...authErrors,
        },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const created = await createLinkToken(
        fleet.db,
        request.operator.actor,
        org.id,
        request.body?.ttl_seconds ?? 86_400,
      );
      return reply.status(201).send({ ...created, expires_at: created.expires_at.toISOString() });
    },
  );

  api.delete<{ Params: { org: string; device: string } }>(
    '/orgs/:org/devices/:device/link',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'unlinkGrispDevice',
        tags: ['grisp'],
        summary: 'Unlink a GRiSP board (it may link again with a new token)',
        params: deviceParams,
        response: { 200: { type: 'object', properties: { ok: { type: 'boolean' } } }, ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      if (!(await unlinkDevice(fleet.db, request.operator.actor, org.id, device.id)))
        throw new ApiError(404, 'not_found', `device ${device.identifier} is not linked`);
      return { ok: true };
    },
  );

  await api.register(async (scope) => {
    // The tar only: JSON or any other type is 415 before the handler runs.
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser('application/octet-stream', passThroughStream);
    scope.post<{
      Querystring: { product: string; org?: string; version: string; platform?: string; architecture?: string };
    }>(
      '/grisp/firmware',
      {
        onRequest: requireRole('operator'),
        config: documentedUpload('The uncompressed tar package, streamed', { 'application/octet-stream': binaryBody }),
        schema: {
          operationId: 'uploadGrispFirmware',
          tags: ['grisp'],
          summary: 'Upload a GRiSP update package (an uncompressed tar with MANIFEST.sealed and its block files)',
          description:
            'Body: the tar archive as application/octet-stream. The package is checked (tar layout, MANIFEST.sealed at the root, safe member paths, regular files only) before it becomes a firmware record of format `grisp`.',
          querystring: {
            type: 'object',
            required: ['product', 'version'],
            properties: {
              product: { type: 'string', minLength: 1 },
              org: { type: 'string' },
              version: { type: 'string', minLength: 1 },
              platform: { type: 'string' },
              architecture: { type: 'string' },
            },
          },
          response: {
            200: { type: 'object', additionalProperties: true },
            201: { type: 'object', additionalProperties: true },
            409: errorRef,
            413: errorRef,
            415: errorRef,
            ...authErrors,
          },
        },
      },
      async (request, reply) => {
        const q = request.query;
        const orgRef = q.org ?? request.operator.orgId;
        if (!orgRef) throw new ApiError(400, 'invalid', 'pass org=<org id or name> with the product', { field: 'org' });
        const org = await resolveOrg(fleet, request.operator, orgRef);
        const product = await getProduct(fleet, org.id, q.product);
        let result: Awaited<ReturnType<typeof ingestFirmware>>;
        try {
          result = await ingestFirmware(
            deps,
            request.operator.actor,
            product,
            {
              version: q.version,
              platform: q.platform ?? 'grisp2',
              architecture: q.architecture ?? 'arm',
              format: GRISP_FORMAT,
            },
            uploadStream(request, 'package (a tar archive)', 'application/octet-stream'),
          );
        } catch (err) {
          if (err instanceof FirmwareError) throw new ApiError(err.status, err.code, err.message, err.details);
          throw err;
        }
        const { firmware, created } = result;
        try {
          const index = await indexGrispPackage(await deps.blobs.open(firmware.sha256!));
          return reply
            .status(created ? 201 : 200)
            .send({ ...firmware, size: Number(firmware.size), members: index.size });
        } catch (err) {
          if (!(err instanceof GrispPackageError)) throw err;
          if (created) await deleteFirmwareAndBlob(deps, request.operator.actor, org.id, firmware.id);
          throw new ApiError(400, 'invalid_package', err.message);
        }
      },
    );
  });
}
