/** Organizations, products, signer CAs and the audit log. */
import type { FastifyInstance } from 'fastify';
import {
  listAuditLog,
  createOrg,
  createProduct,
  getProduct,
  listOrgs,
  listProducts,
  updateProduct,
  MAX_UPDATE_TIMEOUT_S,
} from '../../fleet/index.ts';
import { addSignerCa, listSignerCas, removeSignerCa } from '../../identity/signer-cas.ts';
import { requireRole } from '../auth.ts';
import { ApiError } from '../../http/errors.ts';
import {
  authErrors,
  conflictError,
  emptyOk,
  orgParam,
  pageOf,
  paginationQuery,
  ref,
  page,
  pageQuery,
} from '../../http/schemas.ts';
import type { RouteDeps } from '../index.ts';
import { resolveOrg } from '../../http/resolve.ts';
import { snakeKeys } from './common.ts';

type OrgParams = { org: string };
const orgParams = { type: 'object', required: ['org'], properties: orgParam } as const;

export async function registerOrgRoutes(api: FastifyInstance, deps: RouteDeps): Promise<void> {
  const { fleet, db } = deps;

  api.get(
    '/orgs',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listOrgs',
        tags: ['orgs'],
        summary: 'Organizations you can see',
        querystring: pageQuery,
        response: { 200: pageOf('Org'), ...authErrors },
      },
    },
    async (request) => {
      const p = request.operator;
      const orgs = await listOrgs(fleet);
      return page(
        orgs.filter((o) => p.orgId === null || o.id === p.orgId),
        request.query,
      );
    },
  );

  api.post<{ Body: { name: string } }>(
    '/orgs',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'createOrg',
        tags: ['orgs'],
        summary: 'Create an organization (instance admins)',
        body: {
          type: 'object',
          required: ['name'],
          additionalProperties: false,
          properties: { name: { type: 'string', minLength: 1, maxLength: 63 } },
        },
        response: { 201: ref('Org'), ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      if (request.operator.orgId !== null)
        throw new ApiError(403, 'forbidden', 'only instance admins (users without an org) create organizations');
      return reply.status(201).send(await createOrg(fleet, request.operator.actor, { name: request.body.name }));
    },
  );

  api.get<{ Params: OrgParams }>(
    '/orgs/:org',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getOrg',
        tags: ['orgs'],
        summary: 'One organization',
        params: orgParams,
        response: { 200: ref('Org'), ...authErrors },
      },
    },
    async (request) => resolveOrg(fleet, request.operator, request.params.org),
  );

  // ---- products

  api.get<{ Params: OrgParams }>(
    '/orgs/:org/products',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listProducts',
        tags: ['products'],
        summary: 'Products of an organization',
        params: orgParams,
        querystring: pageQuery,
        response: { 200: pageOf('Product'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return page(await listProducts(fleet, org.id), request.query);
    },
  );

  api.post<{ Params: OrgParams; Body: { name: string; requires_signature?: boolean } }>(
    '/orgs/:org/products',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'createProduct',
        tags: ['products'],
        summary: 'Create a product',
        params: orgParams,
        body: {
          type: 'object',
          required: ['name'],
          additionalProperties: false,
          properties: {
            name: { type: 'string', minLength: 1, maxLength: 63 },
            requires_signature: { type: 'boolean' },
          },
        },
        response: { 201: ref('Product'), ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const product = await createProduct(fleet, request.operator.actor, {
        orgId: org.id,
        name: request.body.name,
        requiresSignature: request.body.requires_signature,
      });
      return reply.status(201).send(product);
    },
  );

  const productParams = {
    type: 'object',
    required: ['org', 'product'],
    properties: { ...orgParam, product: { type: 'string', minLength: 1, description: 'product id or name' } },
  } as const;

  api.get<{ Params: OrgParams & { product: string } }>(
    '/orgs/:org/products/:product',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getProduct',
        tags: ['products'],
        summary: 'One product',
        params: productParams,
        response: { 200: ref('Product'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return getProduct(fleet, org.id, request.params.product);
    },
  );

  api.patch<{
    Params: OrgParams & { product: string };
    Body: { requires_signature?: boolean; update_timeout_seconds?: number | null };
  }>(
    '/orgs/:org/products/:product',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'updateProduct',
        tags: ['products'],
        summary: 'Change whether firmware uploads must be signed, and the in-flight update timeout',
        params: productParams,
        body: {
          type: 'object',
          additionalProperties: false,
          minProperties: 1,
          properties: {
            requires_signature: { type: 'boolean' },
            update_timeout_seconds: {
              type: ['integer', 'null'],
              minimum: 60,
              maximum: MAX_UPDATE_TIMEOUT_S,
              description: 'seconds an update may go without a word from its device; null: the server default',
            },
          },
        },
        response: { 200: ref('Product'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const product = await getProduct(fleet, org.id, request.params.product);
      return updateProduct(fleet, request.operator.actor, org.id, product.id, {
        requiresSignature: request.body.requires_signature,
        updateTimeoutSeconds: request.body.update_timeout_seconds,
      });
    },
  );

  // ---- signer CAs (admin): devices whose certificate one of these signed register just in time

  api.get<{ Params: OrgParams; Querystring: { product?: string } }>(
    '/orgs/:org/signer-cas',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listSignerCas',
        tags: ['signer CAs'],
        summary: 'Signer CAs of an organization',
        params: orgParams,
        querystring: {
          type: 'object',
          properties: { ...paginationQuery, product: { type: 'string', description: 'product id or name' } },
        },
        response: { 200: pageOf('SignerCa'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const productId = request.query.product ? (await getProduct(fleet, org.id, request.query.product)).id : undefined;
      return page((await listSignerCas(db, { orgId: org.id, productId })).map(snakeKeys), request.query);
    },
  );

  api.post<{ Params: OrgParams; Body: { product: string; pem: string; description?: string } }>(
    '/orgs/:org/signer-cas',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'addSignerCa',
        tags: ['signer CAs'],
        summary: 'Register a signer CA certificate (PEM) for a product',
        params: orgParams,
        body: {
          type: 'object',
          required: ['product', 'pem'],
          additionalProperties: false,
          properties: {
            product: { type: 'string', minLength: 1, description: 'product id or name' },
            pem: { type: 'string', minLength: 1, maxLength: 65536 },
            description: { type: 'string', maxLength: 500 },
          },
        },
        response: { 201: ref('SignerCa'), ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const product = await getProduct(fleet, org.id, request.body.product);
      const ca = await addSignerCa(db, request.operator.actor, {
        orgId: org.id,
        productId: product.id,
        pem: request.body.pem,
        description: request.body.description,
      });
      await signerCasChanged(deps, request.log);
      return reply.status(201).send(snakeKeys(ca));
    },
  );

  api.delete<{ Params: OrgParams & { id: string } }>(
    '/orgs/:org/signer-cas/:id',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'removeSignerCa',
        tags: ['signer CAs'],
        summary: 'Remove a signer CA; the device listener stops trusting it',
        params: {
          type: 'object',
          required: ['org', 'id'],
          properties: { ...orgParam, id: { type: 'string', format: 'uuid' } },
        },
        response: { 200: emptyOk, ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      await removeSignerCa(db, request.operator.actor, request.params.id, { orgId: org.id });
      await signerCasChanged(deps, request.log);
      return { ok: true };
    },
  );

  // ---- audit log

  const auditQuery = {
    type: 'object',
    properties: {
      resource_type: { type: 'string' },
      resource_id: { type: 'string' },
      action: { type: 'string' },
      ...paginationQuery,
    },
  } as const;
  type AuditQuery = { resource_type?: string; resource_id?: string; action?: string; limit: number; offset: number };

  api.get<{ Params: OrgParams; Querystring: AuditQuery }>(
    '/orgs/:org/audit',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listOrgAudit',
        tags: ['audit'],
        summary: 'Audit log of an organization, newest first',
        params: orgParams,
        querystring: auditQuery,
        response: { 200: pageOf('AuditEntry'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return listAuditLog(fleet, { orgId: org.id, ...auditFilter(request.query) });
    },
  );

  api.get<{ Querystring: AuditQuery }>(
    '/audit',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'listAudit',
        tags: ['audit'],
        summary: 'Audit log of the whole instance (instance admins)',
        querystring: auditQuery,
        response: { 200: pageOf('AuditEntry'), ...authErrors },
      },
    },
    async (request) => {
      if (request.operator.orgId !== null)
        throw new ApiError(
          403,
          'forbidden',
          'the instance audit log is for instance admins; use /api/v1/orgs/<org>/audit',
        );
      return listAuditLog(fleet, auditFilter(request.query));
    },
  );
}

async function signerCasChanged(deps: RouteDeps, log: { error(obj: unknown, msg: string): void }): Promise<void> {
  try {
    await deps.onSignerCasChanged?.();
  } catch (err) {
    // The change is committed; a listener that fails to refresh must not turn it into an error.
    log.error({ err }, 'refreshing the device listener trust store failed');
  }
}

function auditFilter(q: {
  resource_type?: string;
  resource_id?: string;
  action?: string;
  limit: number;
  offset: number;
}) {
  return {
    resourceType: q.resource_type,
    resourceId: q.resource_id,
    action: q.action,
    limit: q.limit,
    offset: q.offset,
  };
}
