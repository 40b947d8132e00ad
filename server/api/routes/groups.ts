/** Groups: CRUD, members (bulk add/remove), update history and status counts. */
import type { FastifyInstance } from 'fastify';
import type { UpdateState } from '../../db/schema.ts';
import {
  addDevicesToGroup,
  createGroup,
  deleteGroup,
  getGroup,
  listGroupMembers,
  listGroups,
  removeDevicesFromGroup,
  selectDeviceIds,
  updateGroup,
  getProduct,
  listUpdateAttempts,
  UPDATE_STATES,
  type FleetContext,
  type GroupWithCount,
} from '../../fleet/index.ts';
import { requireRole } from '../auth.ts';
import { ApiError } from '../../http/errors.ts';
import { isUuid } from '../operators.ts';
import { authErrors, conflictError, orgParam, pageOf, paginationQuery, ref, page } from '../../http/schemas.ts';
import type { RouteDeps } from '../index.ts';
import { resolveDevice, resolveOrg } from '../../http/resolve.ts';

type OrgParams = { org: string };
type GroupParams = { org: string; group: string };
const orgParams = { type: 'object', required: ['org'], properties: orgParam } as const;
export const groupParams = {
  type: 'object',
  required: ['org', 'group'],
  properties: { ...orgParam, group: { type: 'string', minLength: 1, description: 'group id or name' } },
} as const;

/** A group of `orgId` by id or by name (names are unique per product: a name used in two products is ambiguous). */
export async function resolveGroup(fleet: FleetContext, orgId: string, ref: string): Promise<GroupWithCount> {
  if (isUuid(ref)) return getGroup(fleet, orgId, ref);
  const matches = (await listGroups(fleet, orgId)).filter((g) => g.name === ref);
  if (matches.length === 0) throw new ApiError(404, 'not_found', `group ${JSON.stringify(ref)} not found`);
  if (matches.length > 1)
    throw new ApiError(
      409,
      'conflict',
      `${matches.length} products have a group called ${JSON.stringify(ref)}; use the group id`,
      { ids: matches.map((g) => g.id) },
    );
  return matches[0]!;
}

const membersBody = {
  type: 'object',
  additionalProperties: false,
  minProperties: 1,
  description:
    "the devices: named (`devices`), and/or every device of the group's product whose identifier matches " +
    '`match` and/or that carries `tag` (both conditions when both are given)',
  properties: {
    devices: {
      type: 'array',
      minItems: 1,
      maxItems: 10000,
      items: { type: 'string', minLength: 1 },
      description: 'device ids or identifiers',
    },
    match: {
      type: 'string',
      minLength: 1,
      maxLength: 200,
      description: "glob over device identifiers: '*' any characters, '?' one character (case-sensitive)",
    },
    tag: { type: 'string', minLength: 1, maxLength: 200, description: 'devices carrying this tag' },
  },
} as const;

type MembersBody = { devices?: string[]; match?: string; tag?: string };

export async function registerGroupRoutes(api: FastifyInstance, deps: RouteDeps): Promise<void> {
  const { fleet } = deps;

  /** Device refs (ids or identifiers) to ids; identifiers cost a lookup each, ids none. */
  async function deviceIds(orgId: string, refs: string[]): Promise<string[]> {
    const ids: string[] = [];
    for (const r of refs) ids.push(isUuid(r) ? r.toLowerCase() : (await resolveDevice(fleet, orgId, r)).id);
    return [...new Set(ids)];
  }

  /** The named devices plus those the selector matches in the group's product. */
  async function memberIds(orgId: string, group: GroupWithCount, body: MembersBody): Promise<string[]> {
    const ids = body.devices ? await deviceIds(orgId, body.devices) : [];
    if (body.match !== undefined || body.tag !== undefined)
      ids.push(
        ...(await selectDeviceIds(fleet, { orgId, productId: group.product_id, match: body.match, tag: body.tag })),
      );
    return [...new Set(ids)];
  }

  api.get<{ Params: OrgParams; Querystring: { product?: string } }>(
    '/orgs/:org/groups',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listGroups',
        tags: ['groups'],
        summary: 'Groups of an organization with member counts',
        params: orgParams,
        querystring: {
          type: 'object',
          properties: { ...paginationQuery, product: { type: 'string', description: 'product id or name' } },
        },
        response: { 200: pageOf('Group'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const productId = request.query.product ? (await getProduct(fleet, org.id, request.query.product)).id : undefined;
      return page(await listGroups(fleet, org.id, { productId }), request.query);
    },
  );

  api.post<{
    Params: OrgParams;
    Body: { product: string; name: string; description?: string | null; priority?: number };
  }>(
    '/orgs/:org/groups',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'createGroup',
        tags: ['groups'],
        summary: 'Create a group in a product',
        params: orgParams,
        body: {
          type: 'object',
          required: ['product', 'name'],
          additionalProperties: false,
          properties: {
            product: { type: 'string', minLength: 1, description: 'product id or name' },
            name: { type: 'string', minLength: 1, maxLength: 63 },
            description: { type: ['string', 'null'], maxLength: 1000 },
            priority: {
              type: 'integer',
              minimum: 0,
              maximum: 1000000,
              description: "lower wins when a device's groups target different firmware",
            },
          },
        },
        response: { 201: ref('Group'), ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const product = await getProduct(fleet, org.id, request.body.product);
      const group = await createGroup(fleet, request.operator.actor, {
        orgId: org.id,
        productId: product.id,
        name: request.body.name,
        description: request.body.description,
        priority: request.body.priority,
      });
      return reply.status(201).send(await getGroup(fleet, org.id, group.id));
    },
  );

  api.get<{ Params: GroupParams }>(
    '/orgs/:org/groups/:group',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getGroup',
        tags: ['groups'],
        summary: 'One group',
        params: groupParams,
        response: { 200: ref('Group'), ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return resolveGroup(fleet, org.id, request.params.group);
    },
  );

  api.patch<{ Params: GroupParams; Body: { description?: string | null; priority?: number } }>(
    '/orgs/:org/groups/:group',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'updateGroup',
        tags: ['groups'],
        summary: "Change a group's description or priority",
        params: groupParams,
        body: {
          type: 'object',
          additionalProperties: false,
          minProperties: 1,
          properties: {
            description: { type: ['string', 'null'], maxLength: 1000 },
            priority: { type: 'integer', minimum: 0, maximum: 1000000 },
          },
        },
        response: { 200: ref('Group'), ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      await updateGroup(fleet, request.operator.actor, org.id, group.id, request.body);
      return getGroup(fleet, org.id, group.id);
    },
  );

  api.delete<{ Params: GroupParams }>(
    '/orgs/:org/groups/:group',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'deleteGroup',
        tags: ['groups'],
        summary: 'Delete a group (members leave its channel)',
        params: groupParams,
        response: { 204: { type: 'null' }, ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      await deleteGroup(fleet, request.operator.actor, org.id, group.id);
      return reply.status(204).send();
    },
  );

  // ---- members

  api.get<{ Params: GroupParams; Querystring: { limit: number; offset: number } }>(
    '/orgs/:org/groups/:group/devices',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listGroupDevices',
        tags: ['groups'],
        summary: 'Members of a group',
        params: groupParams,
        querystring: { type: 'object', properties: paginationQuery },
        response: { 200: pageOf('Device'), ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      return listGroupMembers(fleet, org.id, group.id, request.query);
    },
  );

  api.post<{ Params: GroupParams; Body: MembersBody }>(
    '/orgs/:org/groups/:group/devices',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'addGroupDevices',
        tags: ['groups'],
        summary: 'Add devices to a group, named or by pattern or tag (bulk; devices already in it are skipped)',
        params: groupParams,
        body: membersBody,
        response: {
          200: {
            type: 'object',
            required: ['added'],
            properties: { added: { type: 'array', items: { type: 'string' } } },
          },
          ...authErrors,
          ...conflictError,
        },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      return addDevicesToGroup(
        fleet,
        request.operator.actor,
        org.id,
        group.id,
        await memberIds(org.id, group, request.body),
      );
    },
  );

  api.post<{ Params: GroupParams; Body: MembersBody }>(
    '/orgs/:org/groups/:group/devices/remove',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'removeGroupDevices',
        tags: ['groups'],
        summary: 'Remove devices from a group, named or by pattern or tag (bulk; devices not in it are skipped)',
        params: groupParams,
        body: membersBody,
        response: {
          200: {
            type: 'object',
            required: ['removed'],
            properties: { removed: { type: 'array', items: { type: 'string' } } },
          },
          ...authErrors,
          ...conflictError,
        },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      return removeDevicesFromGroup(
        fleet,
        request.operator.actor,
        org.id,
        group.id,
        await memberIds(org.id, group, request.body),
      );
    },
  );

  // ---- update history

  api.get<{ Params: GroupParams; Querystring: { state?: UpdateState; limit: number; offset: number } }>(
    '/orgs/:org/groups/:group/updates',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listGroupUpdates',
        tags: ['updates'],
        summary: "Update attempts of a group's members, newest first",
        params: groupParams,
        querystring: {
          type: 'object',
          properties: { state: { type: 'string', enum: [...UPDATE_STATES] }, ...paginationQuery },
        },
        response: { 200: pageOf('UpdateAttempt'), ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      return listUpdateAttempts(fleet, { orgId: org.id, groupId: group.id, ...request.query });
    },
  );
}
