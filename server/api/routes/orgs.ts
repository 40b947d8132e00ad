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
} from '../../fleet/index.ts';
import { addSignerCa, listSignerCas, removeSignerCa } from '../../identity/signer-cas.ts';
import { requireRole } from '../auth.ts';
import { ApiError } from '../../http/errors.ts';
import {
  authErrors,
  conflictError,
  emptyOk,
  listOf,
  orgParam,
  pageOf,
  paginationQuery,
  ref,
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
      schema: { tags: ['orgs'], summary: 'Organizations you can see', response: { 200: listOf('Org'), ...authErrors } },
    },
    async (request) => {
      const p = request.operator;
      const orgs = await listOrgs(fleet);
      return { items: orgs.filter((o) => p.orgId === null || o.id === p.orgId) };
    },
  );

  api.post<{ Body: { name: string } }>(
    '/orgs',
    {
      onRequest: requireRole('admin'),
      schema: {
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
        tags: ['products'],
        summary: 'Products of an organization',
        params: orgParams,
        response: { 200: listOf('Product'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return { items: await listProducts(fleet, org.id) };
    },
  );

  api.post<{ Params: OrgParams; Body: { name: string; requires_signature?: boolean } }>(
    '/orgs/:org/products',
    {
      onRequest: requireRole('admin'),
      schema: {
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

  api.patch<{ Params: OrgParams & { product: string }; Body: { requires_signature?: boolean } }>(
    '/orgs/:org/products/:product',
    {
      onRequest: requireRole('admin'),
      schema: {
        tags: ['products'],
        summary: 'Change whether firmware uploads must be signed',
        params: productParams,
        body: {
          type: 'object',
          additionalProperties: false,
          minProperties: 1,
          properties: { requires_signature: { type: 'boolean' } },
        },
        response: { 200: ref('Product'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const product = await getProduct(fleet, org.id, request.params.product);
      return updateProduct(fleet, request.operator.actor, org.id, product.id, {
        requiresSignature: request.body.requires_signature,
      });
    },
  );

  // ---- signer CAs (admin): devices whose certificate one of these signed register just in time

  api.get<{ Params: OrgParams; Querystring: { product?: string } }>(
    '/orgs/:org/signer-cas',
    {
      onRequest: requireRole('viewer'),
      schema: {
        tags: ['signer CAs'],
        summary: 'Signer CAs of an organization',
        params: orgParams,
        querystring: { type: 'object', properties: { product: { type: 'string', description: 'product id or name' } } },
        response: { 200: listOf('SignerCa'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const productId = request.query.product ? (await getProduct(fleet, org.id, request.query.product)).id : undefined;
      return { items: (await listSignerCas(db, { orgId: org.id, productId })).map(snakeKeys) };
    },
  );

  api.post<{ Params: OrgParams; Body: { product: string; pem: string; description?: string } }>(
    '/orgs/:org/signer-cas',
    {
      onRequest: requireRole('admin'),
      schema: {
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
