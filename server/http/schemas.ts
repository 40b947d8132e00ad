/**
 * JSON schemas shared by the API routes: they validate requests and make up the OpenAPI
 * document at /api/docs. Response bodies use the database's snake_case names.
 * Entity schemas allow additional properties so a new column does not break serialisation.
 */
import { DEVICE_TARGET_STATES } from '../fleet/device-states.ts';
import { errorSchema } from './errors.ts';

const uuid = { type: 'string', format: 'uuid' } as const;
const nullableString = { type: ['string', 'null'] } as const;
const dateTime = { type: 'string', format: 'date-time' } as const;
const nullableDateTime = { type: ['string', 'null'], format: 'date-time' } as const;
export const roleSchema = { type: 'string', enum: ['viewer', 'operator', 'admin'] } as const;

function entity(id: string, properties: Record<string, unknown>, required: string[] = ['id']) {
  return { $id: id, type: 'object', required, additionalProperties: true, properties } as const;
}

/**
 * An entity whose every property is always present (a table's row as the API answers it):
 * `required` lists them all, so a generated client types none as optional, and the serializer
 * refuses to send a row without one.
 */
function row(id: string, properties: Record<string, unknown>) {
  return entity(id, properties, Object.keys(properties));
}

const webhookProperties = {
  id: uuid,
  org_id: uuid,
  url: { type: 'string', format: 'uri' },
  events: { type: 'array', items: { type: 'string' } },
  description: nullableString,
  enabled: { type: 'boolean' },
  disabled_at: nullableDateTime,
  disabled_reason: nullableString,
  created_by: nullableString,
  created_at: dateTime,
} as const;

const countsProperties = {
  total: { type: 'integer', description: 'devices' },
  pending: { type: 'integer', description: 'not told yet' },
  told: { type: 'integer', description: 'told (in flight, waiting for a retry, or finished)' },
  in_flight: { type: 'integer', description: 'told, no outcome yet' },
  retrying: {
    type: 'integer',
    description: 'failed or timed out with retries left: waiting for the backoff to be told again (not finished)',
  },
  penalty_box: {
    type: 'integer',
    description: 'failed too often within the penalty window: held out until the hold passed (not finished)',
  },
  succeeded: { type: 'integer', description: 'run the new firmware (the device confirmed it)' },
  failed: {
    type: 'integer',
    description: 'failed, declined, rolled back, timed out or superseded, with no retry left',
  },
  cancelled: { type: 'integer', description: 'in flight when the deployment was aborted' },
} as const;
const countRequired = Object.keys(countsProperties);
/** `{count: N}` or `{percent: P}`. */
export const thresholdSchema = {
  type: 'object',
  additionalProperties: false,
  minProperties: 1,
  maxProperties: 1,
  properties: {
    count: { type: 'integer', minimum: 0, maximum: 1000000 },
    percent: { type: 'integer', minimum: 0, maximum: 100 },
  },
} as const;
/** A stage's size: `{count: N}`, `{percent: P}` of the deployment's devices, or `"rest"`. */
export const stageSizeSchema = {
  oneOf: [thresholdSchema, { type: 'string', enum: ['rest'], description: 'every device not in an earlier stage' }],
} as const;

const deploymentProperties = {
  id: uuid,
  org_id: uuid,
  product_id: uuid,
  firmware_id: uuid,
  version: { type: 'string', description: "the firmware's version" },
  component: { type: 'string' },
  kind: {
    type: 'string',
    enum: ['phased', 'target'],
    description: '`phased`: created as a deployment; `target`: the one-stage deployment a group `target set` made',
  },
  name: nullableString,
  group_ids: { type: 'array', items: uuid },
  tags: { type: 'array', items: { type: 'string' } },
  version_range: nullableString,
  platform: nullableString,
  architecture: nullableString,
  state: {
    type: 'string',
    enum: ['draft', 'awaiting_approval', 'running', 'paused', 'completed', 'aborted', 'superseded'],
    description: '`superseded`: a target deployment replaced by a newer target set of its group, or cleared',
  },
  paused_reason: nullableString,
  pause_cause: { type: ['string', 'null'], enum: ['operator', 'error', 'success', null] },
  aborted_reason: nullableString,
  current_stage: { type: 'integer', description: 'the stage being told (0-based)' },
  max_concurrent: { type: ['integer', 'null'] },
  rate_per_minute: { type: ['integer', 'null'], description: 'the constant rate (devices told in any 60 s)' },
  rate: {
    type: 'object',
    additionalProperties: false,
    description:
      '`{type: constant}`, or `{type: exponential, base, factor, criterion, every?, max?}` (docs/deployments.md)',
    properties: {
      type: { type: 'string', enum: ['constant', 'exponential'] },
      base: { type: 'integer' },
      factor: { type: 'number' },
      criterion: { type: 'string', enum: ['notified', 'succeeded'] },
      every: { type: 'integer' },
      max: { type: 'integer' },
    },
    required: ['type'],
  },
  in_flight_timeout_s: { type: ['integer', 'null'] },
  retries: { type: 'integer', description: 'times a failed or timed-out device is told again' },
  retry_backoff_s: { type: 'integer', description: 'seconds before the first retry, doubled for each further one' },
  penalty_failures: { type: ['integer', 'null'], description: 'the penalty box: failures within the window…' },
  penalty_window_s: { type: ['integer', 'null'], description: '…within this many seconds…' },
  penalty_hold_s: { type: ['integer', 'null'], description: '…hold the device out this many seconds' },
  lease_holder: { type: ['string', 'null'], description: 'the node whose orchestrator acts on it' },
  created_by: nullableString,
  created_at: dateTime,
  updated_at: dateTime,
  started_at: nullableDateTime,
  ended_at: nullableDateTime,
  counts: ref('DeploymentCounts'),
} as const;

export const schemas = [
  errorSchema,
  {
    $id: 'DeploymentCounts',
    type: 'object',
    description: 'per-device counts of this deployment (never sums over earlier rollouts)',
    required: countRequired,
    properties: countsProperties,
  },
  {
    $id: 'DeploymentThreshold',
    ...thresholdSchema,
    description: '`{count: N}` or `{percent: P}`',
  },
  entity(
    'DeploymentStage',
    {
      index: { type: 'integer', description: '0-based; stage 0 is the canary' },
      size_spec: {
        type: 'object',
        additionalProperties: true,
        description: 'as given: `{count}`, `{percent}` or `{rest: true}`',
      },
      size: { type: 'integer', description: 'devices in this stage' },
      success: ref('DeploymentThreshold'),
      error: { oneOf: [ref('DeploymentThreshold'), { type: 'null' }] },
      min_finished: { type: 'integer' },
      on_error: { type: 'string', enum: ['pause', 'abort'] },
      requires_approval: { type: 'boolean' },
      soak_s: { type: 'integer' },
      error_overridden: { type: 'boolean', description: 'an operator resumed past its error condition' },
      approved_at: nullableDateTime,
      started_at: nullableDateTime,
      succeeded_at: nullableDateTime,
      ...countsProperties,
    },
    ['index', 'size', ...countRequired],
  ),
  entity('DeploymentSummary', deploymentProperties, ['id', 'state', 'counts']),
  entity(
    'Deployment',
    {
      ...deploymentProperties,
      stages: { type: 'array', items: ref('DeploymentStage') },
      already_running: {
        type: 'integer',
        description: 'create only: devices of the target set left out because they already run the firmware',
      },
    },
    ['id', 'state', 'stages', 'counts'],
  ),
  entity(
    'DeploymentDevice',
    {
      deployment_id: uuid,
      device_id: uuid,
      identifier: { type: 'string' },
      protocol: { type: 'string' },
      stage: { type: 'integer' },
      position: { type: 'integer', description: '1-based order within the deployment' },
      state: {
        type: 'string',
        enum: ['pending', 'in_flight', 'retrying', 'penalty_box', 'succeeded', 'failed', 'cancelled'],
      },
      tries: { type: 'integer', description: 'times the device was told (1 + retries)' },
      retry_at: { ...nullableDateTime, description: 'retrying or penalty_box: when it may be told again' },
      told_at: nullableDateTime,
      succeeded_at: nullableDateTime,
      failed_at: nullableDateTime,
      failure_reason: nullableString,
      attempt_id: { type: ['string', 'null'] },
      attempt_state: nullableString,
    },
    ['device_id', 'stage', 'state'],
  ),
  row('User', {
    id: uuid,
    email: { type: 'string' },
    name: nullableString,
    role: roleSchema,
    org_id: { type: ['string', 'null'] },
    disabled: { type: 'boolean' },
    created_at: dateTime,
  }),
  row('ApiToken', {
    id: uuid,
    user_id: uuid,
    name: { type: 'string' },
    role: roleSchema,
    org_id: { type: ['string', 'null'] },
    expires_at: nullableDateTime,
    last_used_at: nullableDateTime,
    revoked: { type: 'boolean' },
    created_at: dateTime,
  }),
  row('SigningKey', {
    id: uuid,
    product_id: uuid,
    name: { type: 'string' },
    public_key_pem: { type: 'string' },
    fingerprint: { type: 'string' },
    created_at: dateTime,
  }),
  row('Org', { id: uuid, name: { type: 'string' }, created_at: dateTime }),
  row('Product', {
    id: uuid,
    org_id: uuid,
    name: { type: 'string' },
    requires_signature: { type: 'boolean' },
    update_timeout_seconds: { type: ['integer', 'null'] },
    created_at: dateTime,
  }),
  row('Device', {
    id: uuid,
    org_id: uuid,
    product_id: uuid,
    identifier: { type: 'string' },
    protocol: { type: 'string' },
    approval: { type: 'string' },
    description: nullableString,
    tags: { type: 'array', items: { type: 'string' } },
    firmware_uuid: nullableString,
    firmware_version: nullableString,
    platform: nullableString,
    architecture: nullableString,
    connection_status: { type: 'string', enum: ['online', 'offline'] },
    connected_node: nullableString,
    last_seen_at: nullableDateTime,
    created_at: dateTime,
    updated_at: dateTime,
  }),
  {
    $id: 'DeviceTargetState',
    type: 'object',
    description: 'one device with its resolved target for a component, its running version and its newest attempt',
    required: [
      'device_id',
      'identifier',
      'protocol',
      'connection_status',
      'running_version',
      'target_version',
      'target_firmware_id',
      'via',
      'state',
      'attempt_id',
      'attempt_state',
      'attempt_percent',
      'attempt_updated_at',
    ],
    additionalProperties: true,
    properties: {
      device_id: uuid,
      identifier: { type: 'string' },
      protocol: { type: 'string' },
      connection_status: { type: 'string', enum: ['online', 'offline'] },
      running_version: { ...nullableString, description: 'the version of the component it runs (null: unknown)' },
      target_version: {
        ...nullableString,
        description: 'the version of the release its target names (null: no target resolves, or it is not approved)',
      },
      target_firmware_id: {
        type: ['string', 'null'],
        description: 'the variant of that release its protocol installs (null: none, or not applicable)',
      },
      via: { ...nullableString, description: 'what set the target: `device`, `group:<id>` or `deployment:<id>`' },
      state: {
        type: 'string',
        enum: [...DEVICE_TARGET_STATES],
        description:
          "its newest attempt's state for that variant, or `up_to_date`, `not_applicable`, `no_target`, `not_approved`, `no_attempt`",
      },
      attempt_id: { type: ['string', 'null'], description: 'its newest attempt for that variant' },
      attempt_state: nullableString,
      attempt_percent: { type: ['integer', 'null'] },
      attempt_updated_at: nullableDateTime,
    },
  },
  row('DeviceCertificate', {
    id: uuid,
    device_id: uuid,
    fingerprint: { type: 'string' },
    serial: { type: 'string' },
    subject: { type: 'string' },
    issuer: { type: 'string' },
    not_before: dateTime,
    not_after: dateTime,
    pem: nullableString,
    revoked_at: nullableDateTime,
    last_used_at: nullableDateTime,
    created_at: dateTime,
  }),
  row('SignerCa', {
    id: uuid,
    org_id: uuid,
    product_id: uuid,
    fingerprint: { type: 'string' },
    subject: { type: 'string' },
    pem: { type: 'string' },
    not_after: dateTime,
    description: nullableString,
    created_at: dateTime,
  }),
  row('Group', {
    id: uuid,
    org_id: uuid,
    product_id: uuid,
    name: { type: 'string' },
    description: nullableString,
    priority: { type: 'integer' },
    created_at: dateTime,
  }),
  row('Firmware', {
    id: uuid,
    org_id: uuid,
    product_id: uuid,
    component: { type: 'string' },
    version: { type: 'string' },
    platform: nullableString,
    architecture: nullableString,
    format: { type: 'string' },
    sha256: nullableString,
    size: { type: ['integer', 'null'] },
    signature: nullableString,
    metadata: { type: 'object', additionalProperties: true },
    has_blob: { type: 'boolean' },
    uploaded_at: dateTime,
  }),
  row('Target', {
    id: uuid,
    org_id: uuid,
    group_id: { type: ['string', 'null'] },
    device_id: { type: ['string', 'null'] },
    component: { type: 'string' },
    firmware_id: uuid,
    set_by: nullableString,
    set_at: dateTime,
  }),
  row('UpdateAttempt', {
    id: uuid,
    org_id: uuid,
    device_id: uuid,
    firmware_id: uuid,
    component: { type: 'string' },
    from_version: nullableString,
    to_version: { type: 'string' },
    state: { type: 'string' },
    percent: { type: ['integer', 'null'] },
    bytes: { type: ['integer', 'null'] },
    total: { type: ['integer', 'null'] },
    errors: { type: 'array', items: { type: 'string' } },
    via: nullableString,
    created_at: dateTime,
    updated_at: dateTime,
  }),
  row('Webhook', webhookProperties),
  row('WebhookWithSecret', {
    ...webhookProperties,
    secret: {
      type: 'string',
      description: 'the HMAC-SHA256 signing secret: shown only in this answer, keep it with the receiver',
    },
  }),
  row('WebhookDelivery', {
    id: uuid,
    webhook_id: uuid,
    event_id: uuid,
    event: { type: 'string' },
    state: { type: 'string', enum: ['pending', 'delivered', 'failed'] },
    attempts: { type: 'integer' },
    next_attempt_at: dateTime,
    last_status: { type: ['integer', 'null'] },
    last_error: nullableString,
    delivered_at: nullableDateTime,
    created_at: dateTime,
    payload: { type: 'object', additionalProperties: true, description: 'the JSON body sent' },
  }),
  row('AuditEntry', {
    id: { type: 'integer' },
    at: dateTime,
    org_id: { type: ['string', 'null'] },
    actor_type: { type: 'string' },
    actor_id: nullableString,
    action: { type: 'string' },
    resource_type: nullableString,
    resource_id: nullableString,
    details: { type: 'object', additionalProperties: true },
  }),
];

/** `{ $ref: 'Name#' }` for a shared schema. */
export function ref(name: string) {
  return { $ref: `${name}#` } as const;
}

/**
 * `{ items: [Name], total }`: one page of a list, the envelope of every list endpoint. `total`
 * counts every match (not only this page); lists that cannot count cheaply leave it out.
 */
export function pageOf(name: string, options: { total?: boolean } = {}) {
  return pageOfItems(ref(name), options);
}

export function pageOfItems(items: object, { total = true }: { total?: boolean } = {}) {
  return {
    type: 'object',
    required: total ? ['items', 'total'] : ['items'],
    properties: {
      items: { type: 'array', items },
      total: { type: 'integer', minimum: 0, description: 'matches in all, not only on this page' },
    },
  } as const;
}

const errorRef = ref('ApiErrorBody');

/** Error responses every authenticated route can answer. */
export const authErrors = { 400: errorRef, 401: errorRef, 403: errorRef, 404: errorRef } as const;
export const conflictError = { 409: errorRef } as const;

/**
 * Route `config` that gives an upload route a `requestBody` in the OpenAPI document. Upload
 * routes take a stream Fastify must not validate, so the body is described for the document only.
 */
export function documentedUpload(description: string, content: Record<string, { schema: object }>) {
  return {
    swaggerTransform: ({ schema, url }: { schema: object; url: string }) => ({
      schema: { ...schema, body: { description, content } } as never,
      url,
    }),
  };
}

/** A request body of raw bytes. */
export const binaryBody = { schema: { type: 'string', format: 'binary' } } as const;

/** `limit` and `offset`, the paging parameters of every list endpoint. */
export const paginationQuery = {
  limit: { type: 'integer', minimum: 1, maximum: 1000, default: 100, description: 'items per page' },
  offset: { type: 'integer', minimum: 0, default: 0, description: 'items to skip' },
} as const;

/** The querystring of a list with no other filter. */
export const pageQuery = { type: 'object', properties: paginationQuery } as const;

export interface PageQuery {
  limit: number;
  offset: number;
}

/**
 * One page of a list the domain returns whole (orgs, products, groups, firmware, ...: small per
 * organization), with its total. `query` has passed `paginationQuery`, so both are integers.
 */
export function page<T>(items: readonly T[], query: unknown): { items: T[]; total: number } {
  const { limit = 100, offset = 0 } = (query ?? {}) as Partial<PageQuery>;
  return { items: items.slice(offset, offset + limit), total: items.length };
}

/** The `:org` path parameter: an org id or name. */
export const orgParam = { org: { type: 'string', minLength: 1, description: 'organization id or name' } } as const;

export const idParam = (name: string, description: string) =>
  ({ [name]: { type: 'string', minLength: 1, description } }) as const;

export const emptyOk = { type: 'object', properties: { ok: { type: 'boolean' } } } as const;
