/** Operator routes for keyauth client keys inside `/api/v1` (list, approve, revoke by fingerprint). */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { assertOrgAccess, requireRole } from '../../http/auth.ts';
import { page, pageOfItems, paginationQuery } from '../../http/schemas.ts';
import type { FleetContext } from '../../fleet/context.ts';
import type { Product } from '../../fleet/orgs.ts';
import { approveClient, listClients, revokeClient, type KeyauthClient } from './clients.ts';

const err = { $ref: 'ApiErrorBody#' };
const clientJson = {
  type: 'object',
  properties: {
    fingerprint: { type: 'string' },
    device_id: { type: 'string' },
    identifier: { type: 'string' },
    name: { type: ['string', 'null'] },
    approval: { type: 'string' },
    status: { type: 'string' },
    remote_address: { type: ['string', 'null'] },
    first_seen_at: { type: 'string', format: 'date-time' },
    last_seen_at: { type: 'string', format: 'date-time' },
  },
} as const;
const params = {
  type: 'object',
  required: ['fingerprint'],
  properties: {
    fingerprint: { type: 'string', description: 'SHA-256 fingerprint (hex) or a unique prefix of at least 8 digits' },
  },
} as const;

export async function keyauthAdminRoutes(
  api: FastifyInstance,
  deps: { fleet: FleetContext; tenant: () => Promise<Product> },
): Promise<void> {
  const product = async (request: FastifyRequest): Promise<Product> => {
    const p = await deps.tenant();
    assertOrgAccess(request.operator, p.org_id, 'keyauth');
    return p;
  };
  const json = (c: KeyauthClient) => ({ ...c });

  api.get(
    '/keyauth/clients',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listKeyauthClients',
        tags: ['keyauth'],
        summary: 'Client keys of the public-key TCP protocol (approval=pending: the approval queue)',
        querystring: {
          type: 'object',
          properties: { ...paginationQuery, approval: { type: 'string', enum: ['pending', 'approved', 'revoked'] } },
        },
        response: {
          200: pageOfItems(clientJson),
          400: err,
          401: err,
          404: err,
        },
      },
    },
    async (request) => {
      const p = await product(request);
      const { approval } = request.query as { approval?: 'pending' | 'approved' | 'revoked' };
      return page((await listClients(deps.fleet.db, p.id, approval)).map(json), request.query);
    },
  );

  for (const [action, run] of [
    ['approve', approveClient],
    ['revoke', revokeClient],
  ] as const) {
    api.post(
      `/keyauth/clients/:fingerprint/${action}`,
      {
        onRequest: requireRole('operator'),
        schema: {
          operationId: `${action}KeyauthClient`,
          tags: ['keyauth'],
          summary:
            action === 'approve'
              ? 'Approve a client key: its next 101 gets 103'
              : 'Revoke a client key: its connections close, its next 101 gets 102',
          params,
          response: { 200: clientJson, 400: err, 401: err, 403: err, 404: err, 409: err },
        },
      },
      async (request) => {
        const p = await product(request);
        return json(
          await run(deps.fleet, request.operator.actor, p.id, (request.params as { fingerprint: string }).fingerprint),
        );
      },
    );
  }
}
