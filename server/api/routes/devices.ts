/** Devices: list with filters, show, create, update, delete, certificates, own target, update history. */
import type { FastifyInstance } from 'fastify';
import type { ConnectionStatus, DeviceApproval, DeviceProtocol, UpdateState } from '../../db/schema.ts';
import { approveDevice, revokeDevice } from '../../fleet/edge-devices.ts';
import {
  createDevice,
  deleteDevice,
  listDevices,
  updateDevice,
  getProduct,
  listUpdateAttempts,
  publishCertificateRevoked,
  UPDATE_STATES,
} from '../../fleet/index.ts';
import {
  addDeviceCertificate,
  listDeviceCertificates,
  revokeDeviceCertificate,
} from '../../identity/device-certificates.ts';
import { requireRole } from '../auth.ts';
import { ApiError } from '../../http/errors.ts';
import {
  authErrors,
  conflictError,
  orgParam,
  pageOf,
  paginationQuery,
  ref,
  page,
  pageQuery,
} from '../../http/schemas.ts';
import type { RouteDeps } from '../index.ts';
import { resolveDevice, resolveOrg } from '../../http/resolve.ts';
import { snakeKeys } from './common.ts';

type OrgParams = { org: string };
type DeviceParams = { org: string; device: string };
const orgParams = { type: 'object', required: ['org'], properties: orgParam } as const;
export const deviceParams = {
  type: 'object',
  required: ['org', 'device'],
  properties: {
    ...orgParam,
    device: { type: 'string', minLength: 1, description: 'device id or identifier (serial)' },
  },
} as const;

export async function registerDeviceRoutes(api: FastifyInstance, deps: RouteDeps): Promise<void> {
  const { fleet, db } = deps;

  type ListQuery = {
    product?: string;
    group?: string;
    version?: string;
    status?: ConnectionStatus;
    approval?: DeviceApproval;
    protocol?: DeviceProtocol;
    tag?: string;
    q?: string;
    limit: number;
    offset: number;
  };
  api.get<{ Params: OrgParams; Querystring: ListQuery }>(
    '/orgs/:org/devices',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listDevices',
        tags: ['devices'],
        summary: 'Devices of an organization, newest first, filtered and paginated',
        params: orgParams,
        querystring: {
          type: 'object',
          additionalProperties: false,
          properties: {
            product: { type: 'string', description: 'product id or name' },
            group: { type: 'string', format: 'uuid', description: 'group id' },
            version: { type: 'string', description: 'running firmware version (exact)' },
            status: { type: 'string', enum: ['online', 'offline'] },
            approval: {
              type: 'string',
              enum: ['approved', 'pending', 'revoked'],
              description: 'pending: registered by an edge, waiting for an operator',
            },
            protocol: { type: 'string', enum: ['phoenix', 'grisp', 'wifidogx', 'main-server', 'keyauth'] },
            tag: { type: 'string' },
            q: { type: 'string', maxLength: 200, description: 'substring of identifier or description' },
            ...paginationQuery,
          },
        },
        response: { 200: pageOf('Device'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const { product, group, ...rest } = request.query;
      const productId = product ? (await getProduct(fleet, org.id, product)).id : undefined;
      return listDevices(fleet, { orgId: org.id, productId, groupId: group, ...rest });
    },
  );

  api.post<{
    Params: OrgParams;
    Body: { product: string; identifier: string; description?: string | null; tags?: string[] };
  }>(
    '/orgs/:org/devices',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'createDevice',
        tags: ['devices'],
        summary: 'Pre-register a device (devices signed by a registered signer CA register themselves)',
        params: orgParams,
        body: {
          type: 'object',
          required: ['product', 'identifier'],
          additionalProperties: false,
          properties: {
            product: { type: 'string', minLength: 1, description: 'product id or name' },
            identifier: { type: 'string', minLength: 1, maxLength: 200 },
            description: { type: ['string', 'null'], maxLength: 1000 },
            tags: { type: 'array', items: { type: 'string', minLength: 1, maxLength: 64 }, maxItems: 50 },
          },
        },
        response: { 201: ref('Device'), ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const product = await getProduct(fleet, org.id, request.body.product);
      const device = await createDevice(fleet, request.operator.actor, {
        orgId: org.id,
        productId: product.id,
        identifier: request.body.identifier,
        description: request.body.description,
        tags: request.body.tags,
      });
      return reply.status(201).send(device);
    },
  );

  api.get<{ Params: DeviceParams }>(
    '/orgs/:org/devices/:device',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getDevice',
        tags: ['devices'],
        summary: 'One device',
        params: deviceParams,
        response: { 200: ref('Device'), ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return resolveDevice(fleet, org.id, request.params.device);
    },
  );

  api.patch<{ Params: DeviceParams; Body: { description?: string | null; tags?: string[] } }>(
    '/orgs/:org/devices/:device',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'updateDevice',
        tags: ['devices'],
        summary: "Change a device's description or tags",
        params: deviceParams,
        body: {
          type: 'object',
          additionalProperties: false,
          minProperties: 1,
          properties: {
            description: { type: ['string', 'null'], maxLength: 1000 },
            tags: { type: 'array', items: { type: 'string', minLength: 1, maxLength: 64 }, maxItems: 50 },
          },
        },
        response: { 200: ref('Device'), ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      return updateDevice(fleet, request.operator.actor, org.id, device.id, request.body);
    },
  );

  api.delete<{ Params: DeviceParams }>(
    '/orgs/:org/devices/:device',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'deleteDevice',
        tags: ['devices'],
        summary: 'Delete a device with its certificates and history',
        params: deviceParams,
        response: { 204: { type: 'null' }, ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      await deleteDevice(fleet, request.operator.actor, org.id, device.id);
      return reply.status(204).send();
    },
  );

  // ---- certificates

  api.get<{ Params: DeviceParams }>(
    '/orgs/:org/devices/:device/certificates',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listDeviceCertificates',
        tags: ['devices'],
        summary: 'Certificates registered to a device',
        params: deviceParams,
        querystring: pageQuery,
        response: { 200: pageOf('DeviceCertificate'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      return page((await listDeviceCertificates(db, device.id)).map(snakeKeys), request.query);
    },
  );

  api.post<{ Params: DeviceParams; Body: { pem: string } }>(
    '/orgs/:org/devices/:device/certificates',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'addDeviceCertificate',
        tags: ['devices'],
        summary:
          "Register a certificate (PEM) to a device: one of the org's signer CAs must have issued it (400 otherwise; 409 when registered already)",
        params: deviceParams,
        body: {
          type: 'object',
          required: ['pem'],
          additionalProperties: false,
          properties: { pem: { type: 'string', minLength: 1, maxLength: 65536 } },
        },
        response: { 201: ref('DeviceCertificate'), ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      return reply
        .status(201)
        .send(snakeKeys(await addDeviceCertificate(db, request.operator.actor, device.id, request.body.pem)));
    },
  );

  api.post<{ Params: DeviceParams & { id: string } }>(
    '/orgs/:org/devices/:device/certificates/:id/revoke',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'revokeDeviceCertificate',
        tags: ['devices'],
        summary: 'Revoke a device certificate: the device is disconnected and that certificate refused from now on',
        params: {
          type: 'object',
          required: ['org', 'device', 'id'],
          properties: { ...deviceParams.properties, id: { type: 'string', format: 'uuid' } },
        },
        response: { 200: ref('DeviceCertificate'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      const certs = await listDeviceCertificates(db, device.id);
      if (!certs.some((c) => c.id === request.params.id))
        throw new ApiError(
          404,
          'not_found',
          `certificate ${request.params.id} is not registered to device ${device.identifier}`,
        );
      const revoked = await revokeDeviceCertificate(db, request.operator.actor, request.params.id, { orgId: org.id });
      // Refusal happens at the TLS/HTTP layer on the next connect; live connections are closed now, on whichever node holds them.
      await publishCertificateRevoked(fleet, device.id, request.params.id);
      return snakeKeys(revoked);
    },
  );

  // ---- approval (any protocol: pending devices of the edges, or revoking a device outright)
  for (const [action, apply, summary] of [
    ['approve', approveDevice, 'Approve a device: a pending device may now connect, receive commands and updates'],
    [
      'revoke',
      revokeDevice,
      'Revoke a device: it is disconnected, refused from now on, and its open updates are cancelled',
    ],
  ] as const) {
    api.post<{ Params: DeviceParams }>(
      `/orgs/:org/devices/:device/${action}`,
      {
        onRequest: requireRole('operator'),
        schema: {
          operationId: `${action}Device`,
          tags: ['devices'],
          summary,
          params: deviceParams,
          response: { 200: ref('Device'), ...authErrors, ...conflictError },
        },
      },
      async (request) => {
        const org = await resolveOrg(fleet, request.operator, request.params.org);
        const device = await resolveDevice(fleet, org.id, request.params.device);
        return apply(fleet, request.operator.actor, org.id, device.id);
      },
    );
  }

  // ---- update history

  api.get<{ Params: DeviceParams; Querystring: { state?: UpdateState; limit: number; offset: number } }>(
    '/orgs/:org/devices/:device/updates',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listDeviceUpdates',
        tags: ['updates'],
        summary: 'Update attempts of a device, newest first',
        params: deviceParams,
        querystring: {
          type: 'object',
          properties: { state: { type: 'string', enum: [...UPDATE_STATES] }, ...paginationQuery },
        },
        response: { 200: pageOf('UpdateAttempt'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      return listUpdateAttempts(fleet, { orgId: org.id, deviceId: device.id, ...request.query });
    },
  );
}
