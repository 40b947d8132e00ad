/**
 * Webhooks of an org: subscribe a receiver URL to fleet events (admins; the signing secret is in
 * the create answer only), list and change them, and read each one's delivery log (operators).
 */
import type { FastifyInstance } from 'fastify';
import { isUuid } from '../../fleet/errors.ts';
import type { WebhookService } from '../../webhooks/index.ts';
import {
  createWebhook,
  type DeliveryState,
  deleteWebhook,
  getWebhook,
  listDeliveries,
  listWebhooks,
  updateWebhook,
  WEBHOOK_EVENTS,
  type Webhook,
} from '../../webhooks/store.ts';
import { requireRole } from '../auth.ts';
import { ApiError } from '../../http/errors.ts';
import type { RouteDeps } from '../index.ts';
import { authErrors, orgParam, page, pageOf, paginationQuery, ref, type PageQuery } from '../../http/schemas.ts';
import { resolveOrg } from '../../http/resolve.ts';

type OrgParams = { org: string };
type HookParams = { org: string; id: string };
const orgParams = { type: 'object', required: ['org'], properties: orgParam } as const;
const hookParams = {
  type: 'object',
  required: ['org', 'id'],
  properties: { ...orgParam, id: { type: 'string', format: 'uuid', description: 'webhook id' } },
} as const;

const urlSchema = {
  type: 'string',
  minLength: 8,
  maxLength: 2000,
  pattern: '^https?://',
  description: 'the receiver: an http(s) URL that answers 2xx to a POST',
} as const;
const eventsSchema = {
  type: 'array',
  minItems: 1,
  maxItems: 20,
  items: { type: 'string', enum: [...WEBHOOK_EVENTS, '*'] },
  description: 'the events to deliver (`*`: every event, also ones added later)',
} as const;
const descriptionSchema = { type: ['string', 'null'], maxLength: 1000 } as const;

type WebhookBody = { url: string; events: string[]; description?: string | null };

function checkUrl(url: string | undefined): void {
  if (url === undefined) return;
  try {
    new URL(url);
  } catch {
    throw new ApiError(400, 'invalid', `url ${JSON.stringify(url)} is not a URL`, { field: 'body.url' });
  }
}

export async function registerWebhookRoutes(api: FastifyInstance, deps: RouteDeps, service: WebhookService) {
  const { fleet, db } = deps;

  async function webhookOf(orgRef: string, principal: Parameters<typeof resolveOrg>[1], id: string) {
    const org = await resolveOrg(fleet, principal, orgRef);
    const hook = isUuid(id) ? await getWebhook(db, org.id, id) : undefined;
    if (!hook) throw new ApiError(404, 'not_found', `webhook ${id} not found; list them with GET .../webhooks`);
    return { org, hook };
  }

  api.get<{ Params: OrgParams; Querystring: PageQuery }>(
    '/orgs/:org/webhooks',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'listWebhooks',
        tags: ['webhooks'],
        summary: "An organization's webhooks (never their secrets)",
        params: orgParams,
        querystring: { type: 'object', properties: paginationQuery },
        response: { 200: pageOf('Webhook'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return page(await listWebhooks(db, org.id), request.query);
    },
  );

  api.post<{ Params: OrgParams; Body: WebhookBody }>(
    '/orgs/:org/webhooks',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'createWebhook',
        tags: ['webhooks'],
        summary: 'Subscribe a receiver to fleet events; the answer holds its signing secret, shown only once',
        description:
          'Deliveries are JSON `{id, type, created_at, org_id, data}` POSTed with `Fleethub-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, `Fleethub-Event` and `Fleethub-Delivery` headers (docs/webhooks.md).',
        params: orgParams,
        body: {
          type: 'object',
          required: ['url', 'events'],
          additionalProperties: false,
          properties: { url: urlSchema, events: eventsSchema, description: descriptionSchema },
        },
        response: { 201: ref('WebhookWithSecret'), ...authErrors },
      },
    },
    async (request, reply) => {
      checkUrl(request.body.url);
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const created = await createWebhook(db, service.secret, request.operator.actor, {
        orgId: org.id,
        url: request.body.url,
        events: request.body.events,
        description: request.body.description,
      });
      service.invalidate();
      return reply.status(201).send(created);
    },
  );

  api.get<{ Params: HookParams }>(
    '/orgs/:org/webhooks/:id',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'getWebhook',
        tags: ['webhooks'],
        summary: 'One webhook (why it was disabled, if it was)',
        params: hookParams,
        response: { 200: ref('Webhook'), ...authErrors },
      },
    },
    async (request) => (await webhookOf(request.params.org, request.operator, request.params.id)).hook,
  );

  api.patch<{ Params: HookParams; Body: Partial<WebhookBody> & { enabled?: boolean } }>(
    '/orgs/:org/webhooks/:id',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'updateWebhook',
        tags: ['webhooks'],
        summary: 'Change a webhook; `enabled: true` enables a disabled one again (its waiting deliveries go out)',
        params: hookParams,
        body: {
          type: 'object',
          additionalProperties: false,
          minProperties: 1,
          properties: {
            url: urlSchema,
            events: eventsSchema,
            description: descriptionSchema,
            enabled: { type: 'boolean' },
          },
        },
        response: { 200: ref('Webhook'), ...authErrors },
      },
    },
    async (request) => {
      checkUrl(request.body.url);
      const { org, hook } = await webhookOf(request.params.org, request.operator, request.params.id);
      const updated = (await updateWebhook(db, request.operator.actor, org.id, hook.id, request.body)) as Webhook;
      service.invalidate();
      return updated;
    },
  );

  api.delete<{ Params: HookParams }>(
    '/orgs/:org/webhooks/:id',
    {
      onRequest: requireRole('admin'),
      schema: {
        operationId: 'deleteWebhook',
        tags: ['webhooks'],
        summary: 'Delete a webhook and its delivery log',
        params: hookParams,
        response: { 204: { type: 'null' }, ...authErrors },
      },
    },
    async (request, reply) => {
      const { org, hook } = await webhookOf(request.params.org, request.operator, request.params.id);
      await deleteWebhook(db, request.operator.actor, org.id, hook.id);
      service.invalidate();
      return reply.status(204).send();
    },
  );

  api.get<{ Params: HookParams; Querystring: PageQuery & { state?: DeliveryState } }>(
    '/orgs/:org/webhooks/:id/deliveries',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'listWebhookDeliveries',
        tags: ['webhooks'],
        summary: "A webhook's delivery log, newest first: state, attempts, the receiver's last status or error",
        params: hookParams,
        querystring: {
          type: 'object',
          properties: { ...paginationQuery, state: { type: 'string', enum: ['pending', 'delivered', 'failed'] } },
        },
        response: { 200: pageOf('WebhookDelivery'), ...authErrors },
      },
    },
    async (request) => {
      const { hook } = await webhookOf(request.params.org, request.operator, request.params.id);
      return listDeliveries(db, hook.id, request.query);
    },
  );
}
