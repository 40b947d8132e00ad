/**
 * Operator routes for the Main Server edge inside `/api/v1` (an `ApiPlugin`): approval queue,
 * approve / revoke, token rotation and pre-provisioning (tokens shown once), and package upload
 * (a ZIP with `device_update.json`, validated, then stored through the firmware store).
 */
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { assertOrgAccess, requireRole } from '../../http/auth.ts';
import { ApiError } from '../../http/errors.ts';
import { binaryBody, documentedUpload, page, pageOfItems, pageQuery, paginationQuery } from '../../http/schemas.ts';
import { passThroughStream, uploadStream } from '../../http/upload.ts';
import type { Device } from '../../db/schema.ts';
import type { BlobStore } from '../../firmware/blob-store.ts';
import { DEFAULT_MAX_IMAGE_BYTES, FirmwareError, ingestFirmware } from '../../firmware/ingest.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { findProductDevice, listProductDevices } from '../../fleet/devices.ts';
import { approveDevice, revokeDevice } from '../../fleet/edge-devices.ts';
import type { Product } from '../../fleet/orgs.ts';
import { PackageError, PACKAGE_FORMAT, readPackageFile } from '../../../shared/main-server-package.ts';
import { PROTOCOL, provisionDevice, validDeviceId } from './service.ts';
import { clearDeviceToken, deviceDetails, ensureExtensions, issueDeviceToken, listExtensions } from './store.ts';

export interface MainServerAdminDeps {
  fleet: FleetContext;
  blobs: BlobStore;
  tenant: () => Promise<Product>;
  maxPackageBytes?: number;
}

const err = { $ref: 'ApiErrorBody#' };
const deviceParams = {
  type: 'object',
  required: ['device'],
  properties: { device: { type: 'string', description: 'device_id (identifier) or fleet UUID' } },
} as const;
const deviceJson = {
  type: 'object',
  properties: {
    id: { type: 'string' },
    device_id: { type: 'string' },
    name: { type: ['string', 'null'] },
    ip: { type: ['string', 'null'] },
    approval: { type: 'string' },
    status: { type: 'string' },
    has_token: { type: 'boolean' },
    token_issued_at: { type: ['string', 'null'], format: 'date-time' },
    last_seen_at: { type: ['string', 'null'], format: 'date-time' },
  },
} as const;
const withToken = {
  type: 'object',
  properties: { device: deviceJson, device_token: { type: 'string' }, message: { type: 'string' } },
} as const;

/** Registers `/main-server/...` operator routes on the `/api/v1` scope. */
export async function mainServerAdminRoutes(api: FastifyInstance, deps: MainServerAdminDeps): Promise<void> {
  const product = async (request: FastifyRequest): Promise<Product> => {
    const p = await deps.tenant();
    assertOrgAccess(request.operator, p.org_id, 'main server');
    return p;
  };
  const findDevice = async (request: FastifyRequest): Promise<Device> => {
    const p = await product(request);
    const ref = (request.params as { device: string }).device;
    const device = await findProductDevice(deps.fleet.db, p.id, PROTOCOL, ref, { byId: true });
    if (!device)
      throw new ApiError(
        404,
        'not_found',
        `Main Server device ${JSON.stringify(ref)} not found; list them with GET /api/v1/main-server/devices`,
      );
    return device;
  };
  const json = async (devices: Device[]) => {
    const details = await deviceDetails(
      deps.fleet.db,
      devices.map((d) => d.id),
    );
    return devices.map((d) => {
      const x = details.get(d.id);
      return {
        id: d.id,
        device_id: d.identifier,
        name: x?.name ?? d.description,
        ip: x?.ip ?? null,
        approval: d.approval,
        status: d.connection_status,
        has_token: x?.has_token ?? false,
        token_issued_at: x?.token_issued_at ?? null,
        last_seen_at: d.last_seen_at,
      };
    });
  };

  api.get(
    '/main-server/devices',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listMainServerDevices',
        tags: ['main-server'],
        summary: 'Main Server devices (filter approval=pending for the approval queue)',
        querystring: {
          type: 'object',
          properties: { ...paginationQuery, approval: { type: 'string', enum: ['pending', 'approved', 'revoked'] } },
        },
        response: {
          200: pageOfItems(deviceJson),
          400: err,
          401: err,
          404: err,
        },
      },
    },
    async (request) => {
      const p = await product(request);
      const { approval } = request.query as { approval?: 'pending' | 'approved' | 'revoked' };
      const devices = await listProductDevices(deps.fleet.db, p.id, {
        protocol: PROTOCOL,
        orderBy: 'created_at',
        ...(approval ? { approval } : {}),
      });
      return page(await json(devices), request.query);
    },
  );

  api.post(
    '/main-server/devices',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'createMainServerDevice',
        tags: ['main-server'],
        summary: 'Pre-provision an approved device; its token is in the answer, once',
        body: {
          type: 'object',
          required: ['device_id'],
          properties: {
            device_id: { type: 'string', minLength: 1, maxLength: 200 },
            name: { type: 'string', maxLength: 200 },
          },
        },
        response: { 201: withToken, 400: err, 401: err, 403: err, 404: err, 409: err },
      },
    },
    async (request, reply) => {
      const p = await product(request);
      const body = request.body as { device_id: string; name?: string };
      if (!validDeviceId(body.device_id))
        throw new ApiError(400, 'invalid', 'device_id must be 1-200 printable characters', { field: 'device_id' });
      const { device, token } = await provisionDevice(deps.fleet, request.operator.actor, p, {
        deviceId: body.device_id,
        name: body.name ?? null,
      });
      return reply.status(201).send({
        device: (await json([device]))[0],
        device_token: token,
        message: 'Give device_token to the device; it is not shown again.',
      });
    },
  );

  api.post(
    '/main-server/devices/:device/approve',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'approveMainServerDevice',
        tags: ['main-server'],
        summary: 'Approve a pending device; it collects its token on its next register-device with its claim_token',
        params: deviceParams,
        response: {
          200: { type: 'object', properties: { device: deviceJson, message: { type: 'string' } } },
          401: err,
          403: err,
          404: err,
        },
      },
    },
    async (request) => {
      const device = await findDevice(request);
      const approved = await approveDevice(deps.fleet, request.operator.actor, device.org_id, device.id);
      return {
        device: (await json([approved]))[0],
        message:
          'Approved. The device collects its token by repeating register-device with its claim_token; or rotate the token to provision it by hand.',
      };
    },
  );

  api.post(
    '/main-server/devices/:device/revoke',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'revokeMainServerDevice',
        tags: ['main-server'],
        summary: 'Revoke a device: its token stops working at once',
        params: deviceParams,
        response: { 200: { type: 'object', properties: { device: deviceJson } }, 401: err, 403: err, 404: err },
      },
    },
    async (request) => {
      const device = await findDevice(request);
      const revoked = await revokeDevice(deps.fleet, request.operator.actor, device.org_id, device.id);
      await clearDeviceToken(deps.fleet.db, device.id);
      return { device: (await json([revoked]))[0] };
    },
  );

  api.post(
    '/main-server/devices/:device/token',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'issueMainServerDeviceToken',
        tags: ['main-server'],
        summary: 'Rotate the device token (the old one stops working); the new one is in the answer, once',
        params: deviceParams,
        response: { 200: withToken, 401: err, 403: err, 404: err, 409: err },
      },
    },
    async (request) => {
      const device = await findDevice(request);
      if (device.approval !== 'approved')
        throw new ApiError(
          409,
          'conflict',
          `device ${device.identifier} is ${device.approval}; approve it before issuing a token`,
        );
      const token = await issueDeviceToken(deps.fleet, request.operator.actor, device, 'rotated');
      return {
        device: (await json([device]))[0],
        device_token: token,
        message: 'Give device_token to the device; it is not shown again.',
      };
    },
  );

  api.get(
    '/main-server/extensions',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listMainServerExtensions',
        tags: ['main-server'],
        summary: 'Extensions and their integer extension_id',
        querystring: pageQuery,
        response: {
          200: pageOfItems({ type: 'object', properties: { id: { type: 'integer' }, name: { type: 'string' } } }),
          400: err,
          401: err,
        },
      },
    },
    async (request) => page(await listExtensions(deps.fleet.db, (await product(request)).id), request.query),
  );

  await api.register(async (scope) => {
    // The ZIP only: JSON or any other type is 415 before the handler runs.
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser(['application/zip', 'application/octet-stream'], passThroughStream);
    scope.post(
      '/main-server/packages',
      {
        onRequest: requireRole('operator'),
        config: documentedUpload('The package ZIP, streamed', {
          'application/zip': binaryBody,
          'application/octet-stream': binaryBody,
        }),
        schema: {
          operationId: 'uploadMainServerPackage',
          tags: ['main-server'],
          summary: 'Upload an update package: a ZIP with device_update.json {extension, version, compatible_with?}',
          response: {
            200: { type: 'object', additionalProperties: true },
            201: { type: 'object', additionalProperties: true },
            400: err,
            401: err,
            403: err,
            404: err,
            409: err,
            413: err,
            415: err,
          },
        },
      },
      async (request, reply) => {
        const p = await product(request);
        const upload = uploadStream(request, 'ZIP', 'application/zip');
        const dir = await mkdtemp(path.join(os.tmpdir(), 'fleethub-package-'));
        const file = path.join(dir, 'package.zip');
        try {
          const max = deps.maxPackageBytes ?? DEFAULT_MAX_IMAGE_BYTES;
          let size = 0;
          await pipeline(
            upload,
            async function* limit(chunks: AsyncIterable<Buffer>) {
              for await (const c of chunks) {
                size += c.length;
                if (size > max) throw new ApiError(413, 'payload_too_large', `the package is larger than ${max} bytes`);
                yield c;
              }
            },
            createWriteStream(file),
          );
          const manifest = await readPackageFile(file).catch((e: unknown) => {
            if (e instanceof PackageError) throw new ApiError(400, e.code, e.message);
            throw e;
          });
          const { firmware, created } = await ingestFirmware(
            { fleet: deps.fleet, blobs: deps.blobs, maxImageBytes: max },
            request.operator.actor,
            p,
            {
              version: manifest.version,
              component: manifest.extension,
              format: PACKAGE_FORMAT,
              metadata: { manifest, compatible_with: manifest.compatible_with },
            },
            createReadStream(file),
          ).catch((e: unknown) => {
            if (e instanceof FirmwareError) throw new ApiError(e.status, e.code, e.message, e.details);
            throw e;
          });
          // A package recorded without an image (metadata registered earlier) gets its image attached: record the manifest too.
          if (!created && !firmware.metadata?.manifest) {
            await deps.fleet.db
              .updateTable('firmware')
              .set({
                metadata: JSON.stringify({ ...firmware.metadata, manifest, compatible_with: manifest.compatible_with }),
              })
              .where('id', '=', firmware.id)
              .execute();
          }
          const ids = await ensureExtensions(deps.fleet.db, p, [manifest.extension]);
          return reply.status(created ? 201 : 200).send({
            package_id: firmware.id,
            extension_id: ids.get(manifest.extension),
            extension: manifest.extension,
            version: firmware.version,
            compatible_with: manifest.compatible_with,
            sha256: firmware.sha256,
            size: firmware.size === null ? null : Number(firmware.size),
            format: firmware.format,
          });
        } finally {
          await rm(dir, { recursive: true, force: true });
        }
      },
    );
  });
}
