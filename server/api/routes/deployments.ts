/**
 * Deployments (docs/deployments.md): create a phased rollout, read it with per-stage counts,
 * pause / resume / abort / approve it, and list its devices.
 */
import type { FastifyInstance } from 'fastify';
import {
  abortDeployment,
  approveDeployment,
  createDeployment,
  DEPLOYMENT_DEVICE_STATES,
  DEPLOYMENT_KINDS,
  DEPLOYMENT_STATES,
  type DeploymentKind,
  type DeploymentDeviceState,
  type DeploymentState,
  getDeployment,
  listDeploymentDevices,
  listDeployments,
  pauseDeployment,
  type RateSpec,
  resumeDeployment,
  type StageInput,
  type StageSize,
} from '../../fleet/deployments/index.ts';
import { getProduct, isUuid, listGroups, type FleetContext } from '../../fleet/index.ts';
import { ApiError } from '../../http/errors.ts';
import { resolveOrg } from '../../http/resolve.ts';
import {
  authErrors,
  conflictError,
  orgParam,
  pageOf,
  paginationQuery,
  ref,
  stageSizeSchema,
  thresholdSchema,
} from '../../http/schemas.ts';
import { requireRole } from '../auth.ts';
import type { RouteDeps } from '../index.ts';
import { resolveTargetFirmware } from './catalog.ts';

type OrgParams = { org: string };
type DeploymentParams = { org: string; id: string };
const orgParams = { type: 'object', required: ['org'], properties: orgParam } as const;
const deploymentParams = {
  type: 'object',
  required: ['org', 'id'],
  properties: { ...orgParam, id: { type: 'string', format: 'uuid', description: 'deployment id' } },
} as const;

type Threshold = { count: number } | { percent: number };
interface StageBody {
  size: Threshold | 'rest';
  success?: Threshold;
  error?: Threshold;
  min_finished?: number;
  on_error?: 'pause' | 'abort';
  requires_approval?: boolean;
  soak_s?: number;
}
interface CreateBody {
  product: string;
  version?: string;
  firmware_id?: string;
  component?: string;
  name?: string;
  groups: string[];
  tags?: string[];
  version_range?: string;
  platform?: string;
  architecture?: string;
  stages?: StageBody[];
  max_concurrent?: number;
  rate_per_minute?: number;
  in_flight_timeout_s?: number;
  rate?: RateBody;
  retries?: number;
  retry_backoff_s?: number;
  penalty?: { failures: number; window_s: number; hold_s: number };
  start?: boolean;
}
interface RateBody {
  type: 'constant' | 'exponential';
  base?: number;
  factor?: number;
  criterion?: 'notified' | 'succeeded';
  every?: number;
  max?: number;
}

/**
 * The rate shape: constant (`rate_per_minute`) or exponential as AWS IoT Jobs define it. The
 * schema checks each field; the model checks that they fit together (docs/deployments.md).
 */
const rateSchema = {
  type: 'object',
  required: ['type'],
  additionalProperties: false,
  description:
    '`{type: constant}` (the default: `rate_per_minute`), or `{type: exponential, base, factor, criterion, every?, max?}`: start at `base` devices a minute, multiply by `factor` each time another `every` (default `base`) devices were notified or succeeded (`criterion`), never above `max`',
  properties: {
    type: { type: 'string', enum: ['constant', 'exponential'] },
    base: { type: 'integer', minimum: 1, maximum: 1000, description: 'devices a minute to start with' },
    factor: {
      type: 'number',
      minimum: 1.1,
      maximum: 5,
      description: 'the rate is multiplied by this at each step (1.1 to 5, as AWS IoT Jobs allow)',
    },
    criterion: {
      type: 'string',
      enum: ['notified', 'succeeded'],
      description: 'what raises the rate: devices told, or devices succeeded',
    },
    every: { type: 'integer', minimum: 1, maximum: 1000000, description: 'devices per step (default base)' },
    max: { type: 'integer', minimum: 1, maximum: 1000000, description: 'the rate never goes above this a minute' },
  },
} as const;

const penaltySchema = {
  type: 'object',
  required: ['failures', 'window_s', 'hold_s'],
  additionalProperties: false,
  description:
    'the penalty box: a device that failed `failures` times within `window_s` seconds is held out for `hold_s` seconds before its next retry (needs `retries` ≥ `failures`)',
  properties: {
    failures: { type: 'integer', minimum: 1, maximum: 10 },
    window_s: { type: 'integer', minimum: 1, maximum: 2592000 },
    hold_s: { type: 'integer', minimum: 1, maximum: 2592000 },
  },
} as const;

const stageSchema = {
  type: 'object',
  required: ['size'],
  additionalProperties: false,
  properties: {
    size: stageSizeSchema,
    success: {
      ...thresholdSchema,
      description: 'devices of the stage that must succeed: `{count}` or `{percent}` of the stage (default 100%)',
    },
    error: {
      ...thresholdSchema,
      description: 'failed devices that trip the error action: `{count}` or `{percent}` of the finished ones',
    },
    min_finished: {
      type: 'integer',
      minimum: 0,
      maximum: 1000000,
      description: 'the error condition is evaluated only once this many devices of the stage finished',
    },
    on_error: { type: 'string', enum: ['pause', 'abort'], description: 'default pause' },
    requires_approval: { type: 'boolean', description: 'the stage starts only after approve' },
    soak_s: {
      type: 'integer',
      minimum: 0,
      maximum: 2592000,
      description: 'seconds to wait after this stage succeeded before the next starts',
    },
  },
} as const;

const createBody = {
  type: 'object',
  required: ['product', 'groups'],
  additionalProperties: false,
  properties: {
    product: { type: 'string', minLength: 1, description: 'product id or name' },
    version: { type: 'string', minLength: 1, maxLength: 100, description: 'the firmware version to roll out' },
    firmware_id: { type: 'string', format: 'uuid' },
    component: { type: 'string', minLength: 1, maxLength: 100, default: 'firmware' },
    name: { type: 'string', minLength: 1, maxLength: 200 },
    groups: {
      type: 'array',
      minItems: 1,
      maxItems: 100,
      items: { type: 'string', minLength: 1 },
      description: 'group ids or names of the product; the target set is their members (resolved once, at creation)',
    },
    tags: {
      type: 'array',
      maxItems: 20,
      items: { type: 'string', minLength: 1, maxLength: 200 },
      description: 'only devices carrying every one of these tags',
    },
    version_range: {
      type: 'string',
      minLength: 1,
      maxLength: 200,
      description: 'only devices whose running version satisfies this semver range, e.g. `<2.0.0`',
    },
    platform: { type: 'string', minLength: 1, maxLength: 100 },
    architecture: { type: 'string', minLength: 1, maxLength: 100 },
    stages: {
      type: 'array',
      minItems: 1,
      maxItems: 50,
      items: stageSchema,
      description: 'in order; the first is the canary, the last takes every device left (default: one stage)',
    },
    max_concurrent: { type: 'integer', minimum: 1, maximum: 1000000, description: 'devices in flight at once' },
    rate_per_minute: { type: 'integer', minimum: 1, maximum: 1000000, description: 'devices told in any 60 s' },
    in_flight_timeout_s: { type: 'integer', minimum: 10, maximum: 604800 },
    rate: rateSchema,
    retries: {
      type: 'integer',
      minimum: 0,
      maximum: 10,
      description: 'a device whose update failed (after it began) or timed out is told again up to this many times',
    },
    retry_backoff_s: {
      type: 'integer',
      minimum: 0,
      maximum: 86400,
      description: 'seconds before the first retry (default 60); doubled for each further one, at most a day',
    },
    penalty: penaltySchema,
    start: { type: 'boolean', default: true, description: 'false: create a draft (resume starts it)' },
  },
  oneOf: [{ required: ['firmware_id'] }, { required: ['version'] }],
} as const;

const reasonBody = {
  type: 'object',
  additionalProperties: false,
  properties: { reason: { type: 'string', minLength: 1, maxLength: 1000 } },
} as const;

function stageInput(s: StageBody): StageInput {
  const size: StageSize = s.size === 'rest' ? { rest: true } : s.size;
  return {
    size,
    ...(s.success ? { success: s.success } : {}),
    ...(s.error ? { error: s.error } : {}),
    ...(s.min_finished !== undefined ? { minFinished: s.min_finished } : {}),
    ...(s.on_error ? { onError: s.on_error } : {}),
    ...(s.requires_approval !== undefined ? { requiresApproval: s.requires_approval } : {}),
    ...(s.soak_s !== undefined ? { soakS: s.soak_s } : {}),
  };
}

function rateInput(r: RateBody): RateSpec {
  if (r.type === 'constant') {
    const extra = (['base', 'factor', 'criterion', 'every', 'max'] as const).filter((k) => r[k] !== undefined);
    if (extra.length > 0)
      throw new ApiError(
        400,
        'invalid',
        `a constant rate takes no ${extra.join(', ')}: use rate_per_minute, or type exponential`,
        { field: 'rate' },
      );
    return { type: 'constant' };
  }
  const missing = (['base', 'factor', 'criterion'] as const).filter((k) => r[k] === undefined);
  if (missing.length > 0)
    throw new ApiError(400, 'invalid', `an exponential rate needs ${missing.join(', ')}`, { field: 'rate' });
  return {
    type: 'exponential',
    base: r.base!,
    factor: r.factor!,
    criterion: r.criterion!,
    ...(r.every !== undefined ? { every: r.every } : {}),
    ...(r.max !== undefined ? { max: r.max } : {}),
  };
}

/** Group refs (ids or names) of one product to ids. */
async function groupIds(fleet: FleetContext, orgId: string, productId: string, refs: string[]): Promise<string[]> {
  const groups = await listGroups(fleet, orgId, { productId });
  return refs.map((r) => {
    const g = groups.find((x) => (isUuid(r) ? x.id === r.toLowerCase() : x.name === r));
    if (!g) throw new ApiError(404, 'not_found', `group ${JSON.stringify(r)} not found in this product`);
    return g.id;
  });
}

export async function registerDeploymentRoutes(api: FastifyInstance, deps: RouteDeps): Promise<void> {
  const { fleet } = deps;

  api.post<{ Params: OrgParams; Body: CreateBody }>(
    '/orgs/:org/deployments',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'createDeployment',
        tags: ['deployments'],
        summary: 'Create a phased deployment of a firmware to groups (starts it unless start is false)',
        description:
          'The target set (members of the groups, narrowed by tags, version_range, platform and architecture) is resolved once. A device can be in one active deployment at a time: 409 with `details.overlapping_devices` (docs/deployments.md).',
        params: orgParams,
        body: createBody,
        response: { 201: ref('Deployment'), ...authErrors, ...conflictError },
      },
    },
    async (request, reply) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      const body = request.body;
      const product = await getProduct(fleet, org.id, body.product);
      const firmware = await resolveTargetFirmware(fleet, org.id, product.id, body);
      const { deployment, alreadyRunning } = await createDeployment(fleet, request.operator.actor, {
        orgId: org.id,
        productId: product.id,
        firmwareId: firmware.id,
        name: body.name ?? null,
        groupIds: await groupIds(fleet, org.id, product.id, body.groups),
        tags: body.tags ?? [],
        versionRange: body.version_range ?? null,
        platform: body.platform ?? null,
        architecture: body.architecture ?? null,
        ...(body.stages ? { stages: body.stages.map(stageInput) } : {}),
        maxConcurrent: body.max_concurrent ?? null,
        ratePerMinute: body.rate_per_minute ?? null,
        inFlightTimeoutS: body.in_flight_timeout_s ?? null,
        ...(body.rate ? { rate: rateInput(body.rate) } : {}),
        ...(body.retries !== undefined ? { retries: body.retries } : {}),
        ...(body.retry_backoff_s !== undefined ? { retryBackoffS: body.retry_backoff_s } : {}),
        ...(body.penalty
          ? { penalty: { failures: body.penalty.failures, windowS: body.penalty.window_s, holdS: body.penalty.hold_s } }
          : {}),
        start: body.start !== false,
      });
      return reply.status(201).send({ ...deployment, already_running: alreadyRunning });
    },
  );

  api.get<{
    Params: OrgParams;
    Querystring: { state?: DeploymentState; kind?: DeploymentKind; limit: number; offset: number };
  }>(
    '/orgs/:org/deployments',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listDeployments',
        tags: ['deployments'],
        summary: 'Deployments of an organization (phased and target), newest first, with their per-device counts',
        params: orgParams,
        querystring: {
          type: 'object',
          properties: {
            state: { type: 'string', enum: [...DEPLOYMENT_STATES] },
            kind: {
              type: 'string',
              enum: [...DEPLOYMENT_KINDS],
              description: '`phased` (created as deployments) or `target` (made by a group `target set`)',
            },
            ...paginationQuery,
          },
        },
        response: { 200: pageOf('DeploymentSummary'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return listDeployments(fleet, { orgId: org.id, ...request.query });
    },
  );

  api.get<{ Params: DeploymentParams }>(
    '/orgs/:org/deployments/:id',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getDeployment',
        tags: ['deployments'],
        summary: 'One deployment with its stages and their per-device counts',
        params: deploymentParams,
        response: { 200: ref('Deployment'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return getDeployment(fleet, org.id, request.params.id);
    },
  );

  const actions = [
    {
      path: 'pause',
      operationId: 'pauseDeployment',
      summary: 'Pause: nobody new is told; devices in flight finish (409 unless running or awaiting approval)',
      run: (orgId: string, id: string, actor: Parameters<typeof pauseDeployment>[1], reason?: string) =>
        pauseDeployment(fleet, actor, orgId, id, reason),
    },
    {
      path: 'resume',
      operationId: 'resumeDeployment',
      summary:
        'Resume a paused deployment where it stopped, or start a draft; a pause on a stage threshold accepts that stage',
      run: (orgId: string, id: string, actor: Parameters<typeof pauseDeployment>[1]) =>
        resumeDeployment(fleet, actor, orgId, id),
    },
    {
      path: 'abort',
      operationId: 'abortDeployment',
      summary: 'Abort: nobody new is told, updates in flight are cancelled (the device is told where it can be)',
      run: (orgId: string, id: string, actor: Parameters<typeof pauseDeployment>[1], reason?: string) =>
        abortDeployment(fleet, actor, orgId, id, reason),
    },
    {
      path: 'approve',
      operationId: 'approveDeployment',
      summary: 'Approve the stage waiting for approval (409 unless awaiting approval)',
      run: (orgId: string, id: string, actor: Parameters<typeof pauseDeployment>[1]) =>
        approveDeployment(fleet, actor, orgId, id),
    },
  ];
  for (const action of actions) {
    api.post<{ Params: DeploymentParams; Body: { reason?: string } | undefined }>(
      `/orgs/:org/deployments/:id/${action.path}`,
      {
        onRequest: requireRole('operator'),
        // The body is optional: a POST without one means `{}`.
        preValidation: async (request) => {
          request.body ??= {};
        },
        schema: {
          operationId: action.operationId,
          tags: ['deployments'],
          summary: action.summary,
          params: deploymentParams,
          ...(action.path === 'pause' || action.path === 'abort' ? { body: reasonBody } : {}),
          response: { 200: ref('Deployment'), ...authErrors, ...conflictError },
        },
      },
      async (request) => {
        const org = await resolveOrg(fleet, request.operator, request.params.org);
        return action.run(org.id, request.params.id, request.operator.actor, request.body?.reason);
      },
    );
  }

  api.get<{
    Params: DeploymentParams;
    Querystring: { state?: DeploymentDeviceState; stage?: number; limit: number; offset: number };
  }>(
    '/orgs/:org/deployments/:id/devices',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listDeploymentDevices',
        tags: ['deployments'],
        summary: 'The devices of a deployment in stage order, with their state and attempt',
        params: deploymentParams,
        querystring: {
          type: 'object',
          properties: {
            state: { type: 'string', enum: [...DEPLOYMENT_DEVICE_STATES] },
            stage: { type: 'integer', minimum: 0, maximum: 1000, description: '0-based stage index' },
            ...paginationQuery,
          },
        },
        response: { 200: pageOf('DeploymentDevice'), ...authErrors },
      },
    },
    async (request) => {
      const org = await resolveOrg(fleet, request.operator, request.params.org);
      return listDeploymentDevices(fleet, org.id, request.params.id, request.query);
    },
  );
}
