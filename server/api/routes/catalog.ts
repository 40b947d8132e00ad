/**
 * Firmware records (list, show, delete; the upload is server/api/firmware.ts), targets for groups
 * and devices, and live status counts (by version, connection and update state).
 */
import type { FastifyInstance } from 'fastify';
import type { Firmware } from '../../db/schema.ts';
import {
  deleteFirmware,
  getFirmware,
  isBlobReferenced,
  listFirmware,
  getProduct,
  clearDeviceTarget,
  clearGroupTarget,
  listTargets,
  setDeviceTarget,
  setGroupTarget,
  fleetStatus as fleetCounts,
  STATUS_FAILURES_SHOWN,
  countDeviceTargetStates,
  DEVICE_TARGET_STATES,
  type DeviceTargetState,
  listDeviceTargetStates,
  type FleetContext,
} from '../../fleet/index.ts';
import { groupTargetDeployment } from '../../fleet/deployments/index.ts';
import { requireRole } from '../auth.ts';
import { ApiError } from '../../http/errors.ts';
import { isUuid } from '../operators.ts';
import {
  authErrors,
  conflictError,
  emptyOk,
  orgParam,
  ref,
  page,
  pageOf,
  pageQuery,
  paginationQuery,
} from '../../http/schemas.ts';
import type { RouteDeps } from '../index.ts';
import { resolveDevice, resolveOrg } from '../../http/resolve.ts';
import { deviceParams } from './devices.ts';
import { groupParams, resolveGroup } from './groups.ts';

type OrgParams = { org: string };
const orgParams = { type: 'object', required: ['org'], properties: orgParam } as const;
const firmwareParams = {
  type: 'object',
  required: ['org', 'id'],
  properties: { ...orgParam, id: { type: 'string', format: 'uuid' } },
} as const;

/** `{firmware_id}` or `{version, component?}` naming the firmware to target. */
const targetBody = {
  type: 'object',
  additionalProperties: false,
  properties: {
    firmware_id: { type: 'string', format: 'uuid' },
    version: {
      type: 'string',
      minLength: 1,
      maxLength: 100,
      description: "firmware version of the group's or device's product (instead of firmware_id)",
    },
    component: { type: 'string', minLength: 1, maxLength: 100, default: 'firmware' },
  },
  oneOf: [{ required: ['firmware_id'] }, { required: ['version'] }],
} as const;
type TargetBody = { firmware_id?: string; version?: string; component?: string };

const targetChangeSchema = {
  type: 'object',
  properties: {
    target: ref('Target'),
    attempts: { type: 'object', properties: { sent: { type: 'integer' }, queued: { type: 'integer' } } },
    delivery: { type: 'string', enum: ['group', 'devices', 'none'] },
    deployment_id: {
      type: ['string', 'null'],
      description:
        'a group target: the one-stage deployment (kind target) that counts its devices; `fleethub deployments watch <id>` follows it. null for a device target',
    },
    already_running: {
      type: 'integer',
      description: 'a group target: members that already run the release (not in the deployment)',
    },
  },
} as const;

/** The firmware a target body names, within a product. */
export async function resolveTargetFirmware(
  fleet: FleetContext,
  orgId: string,
  productId: string,
  body: TargetBody,
): Promise<Firmware> {
  if (body.firmware_id) return getFirmware(fleet, orgId, body.firmware_id);
  const component = body.component ?? 'firmware';
  const found = (await listFirmware(fleet, orgId, { productId, component })).find((f) => f.version === body.version);
  if (!found)
    throw new ApiError(
      404,
      'not_found',
      `no ${component} version ${body.version} in this product; upload it first (fleethub firmware upload)`,
    );
  return found;
}

export async function registerCatalogRoutes(api: FastifyInstance, deps: RouteDeps): Promise<void> {
  const { fleet } = deps;

  // ---- firmware records

  api.get<{ Params: OrgParams; Querystring: { product?: string; component?: string } }>(
    '/orgs/:org/firmware',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listFirmware',
        tags: ['firmware'],
        summary: 'Firmware of an organization, newest first',
        params: orgParams,
        querystring: {
          type: 'object',
          properties: {
            ...paginationQuery,
            product: { type: 'string', description: 'product id or name' },
            component: { type: 'string' },
          },
        },
        response: { 200: pageOf('Firmware'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const productId = request.query.product ? (await getProduct(fleet, org.id, request.query.product)).id : undefined;
      return page(await listFirmware(fleet, org.id, { productId, component: request.query.component }), request.query);
    },
  );

  api.get<{ Params: OrgParams & { id: string } }>(
    '/orgs/:org/firmware/:id',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getFirmware',
        tags: ['firmware'],
        summary: 'One firmware record',
        params: firmwareParams,
        response: { 200: ref('Firmware'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return getFirmware(fleet, org.id, request.params.id);
    },
  );

  api.delete<{ Params: OrgParams & { id: string } }>(
    '/orgs/:org/firmware/:id',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'deleteFirmware',
        tags: ['firmware'],
        summary: 'Delete a firmware record (409 while a group or device targets it)',
        params: firmwareParams,
        response: { 204: { type: 'null' }, ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const deleted = await deleteFirmware(fleet, request.operator.actor, org.id, request.params.id);
      if (deleted.sha256 && deleted.has_blob && deps.blobs && !(await isBlobReferenced(fleet, deleted.sha256))) {
        await deps.blobs
          .delete(deleted.sha256)
          .catch((err: unknown) =>
            request.log.error({ err, sha256: deleted.sha256 }, 'removing an unreferenced firmware blob failed'),
          );
      }
      return reply.status(204).send();
    },
  );

  // ---- targets

  api.get<{ Params: OrgParams }>(
    '/orgs/:org/targets',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listTargets',
        tags: ['targets'],
        summary: 'Every target of an organization',
        params: orgParams,
        querystring: pageQuery,
        response: { 200: pageOf('Target'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return page(await listTargets(fleet, org.id), request.query);
    },
  );

  const reply200 = { 200: targetChangeSchema, ...authErrors, ...conflictError };

  api.put<{ Params: OrgParams & { group: string }; Body: TargetBody }>(
    '/orgs/:org/groups/:group/target',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'setGroupTarget',
        tags: ['targets'],
        summary: 'Set the firmware a group should run',
        params: groupParams,
        body: targetBody,
        response: reply200,
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      const firmware = await resolveTargetFirmware(fleet, org.id, group.product_id, request.body);
      return setGroupTarget(fleet, request.operator.actor, org.id, group.id, firmware.id);
    },
  );

  api.delete<{ Params: OrgParams & { group: string }; Querystring: { component?: string } }>(
    '/orgs/:org/groups/:group/target',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'clearGroupTarget',
        tags: ['targets'],
        summary: "Clear a group's target",
        params: groupParams,
        querystring: { type: 'object', properties: { component: { type: 'string', default: 'firmware' } } },
        response: { 200: emptyOk, ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      await clearGroupTarget(fleet, request.operator.actor, org.id, group.id, request.query.component);
      return { ok: true };
    },
  );

  api.put<{ Params: OrgParams & { device: string }; Body: TargetBody }>(
    '/orgs/:org/devices/:device/target',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'setDeviceTarget',
        tags: ['targets'],
        summary: 'Set the firmware one device should run (overrides its groups)',
        params: deviceParams,
        body: targetBody,
        response: reply200,
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      const firmware = await resolveTargetFirmware(fleet, org.id, device.product_id, request.body);
      return setDeviceTarget(fleet, request.operator.actor, org.id, device.id, firmware.id);
    },
  );

  api.delete<{ Params: OrgParams & { device: string }; Querystring: { component?: string } }>(
    '/orgs/:org/devices/:device/target',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'clearDeviceTarget',
        tags: ['targets'],
        summary: "Clear a device's own target (it falls back to its groups')",
        params: deviceParams,
        querystring: { type: 'object', properties: { component: { type: 'string', default: 'firmware' } } },
        response: { 200: emptyOk, ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const device = await resolveDevice(fleet, org.id, request.params.device);
      await clearDeviceTarget(fleet, request.operator.actor, org.id, device.id, request.query.component);
      return { ok: true };
    },
  );

  // ---- status

  const statusSchema = {
    type: 'object',
    required: ['devices', 'online', 'offline', 'versions', 'updates', 'targets', 'failures', 'target'],
    properties: {
      devices: { type: 'integer' },
      online: { type: 'integer' },
      offline: { type: 'integer' },
      versions: {
        type: 'object',
        additionalProperties: { type: 'integer' },
        description: 'devices per running version ("unknown" when none reported)',
      },
      updates: {
        type: 'object',
        additionalProperties: { type: 'integer' },
        description:
          'devices per state of their latest update attempt at the firmware they resolve to (each device counts once; devices with no attempt at their target are not counted; attempts at earlier targets never are)',
      },
      targets: {
        type: 'array',
        description:
          'per firmware that devices resolve to (a device target, else the lowest-priority group target): how many devices resolve to it and how many run it',
        items: {
          type: 'object',
          required: ['firmware_id', 'version', 'devices', 'running'],
          properties: {
            firmware_id: { type: 'string', format: 'uuid' },
            version: { type: 'string' },
            devices: { type: 'integer' },
            running: { type: 'integer' },
          },
        },
      },
      failures: {
        type: 'array',
        description: `devices whose latest attempt at their resolved firmware failed, rolled back or timed out (the first ${STATUS_FAILURES_SHOWN} by identifier; updates has the counts)`,
        items: {
          type: 'object',
          required: ['device_id', 'identifier', 'version', 'state', 'errors'],
          properties: {
            device_id: { type: 'string', format: 'uuid' },
            identifier: { type: 'string' },
            version: { type: 'string' },
            state: { type: 'string' },
            errors: { type: 'array', items: { type: 'string' } },
          },
        },
      },
      device_states: {
        type: 'object',
        properties: Object.fromEntries(DEVICE_TARGET_STATES.map((s) => [s, { type: 'integer' }])),
        description:
          "devices per state with their resolved target for the component, one state per device: the newest attempt's state for the variant it installs, `up_to_date` (runs it, no attempt brought it), `not_applicable` (does not run the component, or the release has no variant its protocol installs: no attempt), `no_target`, `not_approved`, `no_attempt`",
      },
      target: { anyOf: [ref('Target'), { type: 'null' }], description: "the group's own target (null for an org)" },
      target_deployment: {
        anyOf: [
          {
            type: 'object',
            required: ['id', 'state', 'version', 'counts'],
            properties: {
              id: { type: 'string', format: 'uuid' },
              state: { type: 'string' },
              version: { type: 'string' },
              counts: ref('DeploymentCounts'),
            },
          },
          { type: 'null' },
        ],
        description:
          "a group: the deployment its current target set made (running or completed) with its per-device counts; null for an org, or when the group's target was cleared",
      },
    },
  } as const;
  const statusQuery = {
    component: {
      type: 'string',
      minLength: 1,
      maxLength: 100,
      default: 'firmware',
      description: 'the component whose target and per-device states are counted',
    },
  } as const;

  api.get<{ Params: OrgParams; Querystring: { group?: string; component?: string } }>(
    '/orgs/:org/status',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getOrgStatus',
        tags: ['status'],
        summary:
          'Per-device counts of the org or one group: connection, running version, and each device with its current target (never sums over past rollouts)',
        params: orgParams,
        querystring: {
          type: 'object',
          properties: { group: { type: 'string', description: 'group id or name' }, ...statusQuery },
        },
        response: { 200: statusSchema, ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = request.query.group ? await resolveGroup(fleet, org.id, request.query.group) : undefined;
      const [status, targetDeployment] = await Promise.all([
        fleetStatus(fleet, org.id, group?.id, request.query.component),
        group ? groupTargetDeployment(fleet, group.id, request.query.component) : null,
      ]);
      return { ...status, target_deployment: targetDeployment };
    },
  );

  api.get<{
    Params: OrgParams;
    Querystring: { group?: string; component?: string; state?: DeviceTargetState; limit: number; offset: number };
  }>(
    '/orgs/:org/status/devices',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listDeviceTargetStates',
        tags: ['status'],
        summary:
          'Each device of the org or of one group, by identifier: its resolved target, running version and newest attempt (the rows behind device_states)',
        params: orgParams,
        querystring: {
          type: 'object',
          properties: {
            group: { type: 'string', description: 'group id or name' },
            ...statusQuery,
            state: { type: 'string', enum: [...DEVICE_TARGET_STATES], description: 'only devices in this state' },
            ...paginationQuery,
          },
        },
        response: { 200: pageOf('DeviceTargetState'), ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = request.query.group ? await resolveGroup(fleet, org.id, request.query.group) : undefined;
      const { component, state, limit, offset } = request.query;
      return listDeviceTargetStates(
        fleet,
        { orgId: org.id, ...(group ? { groupId: group.id } : {}) },
        {
          component,
          state,
          limit,
          offset,
        },
      );
    },
  );

  api.get<{ Params: OrgParams & { group: string }; Querystring: { component?: string } }>(
    '/orgs/:org/groups/:group/status',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getGroupStatus',
        tags: ['status'],
        summary: 'Counts by running version and update state for a group, with its target',
        params: groupParams,
        querystring: { type: 'object', properties: statusQuery },
        response: { 200: statusSchema, ...authErrors, ...conflictError },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const group = await resolveGroup(fleet, org.id, request.params.group);
      return fleetStatus(fleet, org.id, group.id, request.query.component);
    },
  );
}

/** A status view: the domain's per-device counts for `component`, with the group's own target. */
async function fleetStatus(fleet: FleetContext, orgId: string, groupId?: string, component = 'firmware') {
  const status = await fleetCounts(fleet, orgId, groupId, component);
  const device_states = await countDeviceTargetStates(fleet, { orgId, ...(groupId ? { groupId } : {}) }, component);
  const target =
    groupId && isUuid(groupId)
      ? ((await listTargets(fleet, orgId, { groupId })).find((t) => t.component === component) ?? null)
      : null;
  return { ...status, device_states, target };
}
