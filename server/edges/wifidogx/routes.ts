/** Operator REST routes of the WiFiDogX edge (mounted inside /api/v1). */
import { randomBytes } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { audit } from '../../audit.ts';
import { requireRole } from '../../http/auth.ts';
import { ApiError } from '../../http/errors.ts';
import { resolveDevice, resolveOrg } from '../../http/resolve.ts';
import { authErrors, orgParam, pageOfItems, paginationQuery } from '../../http/schemas.ts';
import type { PubSub } from '../../channels/types.ts';
import type { Device } from '../../db/schema.ts';
import { approveDevice, revokeDevice } from '../../fleet/edge-devices.ts';
import { Topics, type FleetContext } from '../../fleet/index.ts';
import type { WifidogxConnection } from './connection.ts';
import { isSafeFirmwareUrl } from './frames.ts';
import {
  credentialPath,
  hasCredential,
  issueCredential,
  WIFIDOGX_PATH,
  type WifidogxAuthPolicy,
} from './credentials.ts';
import { createCommand, getGatewayState, listCommands, setAuthMode, type WifidogxCommand } from './store.ts';

export interface WifidogxRouteDeps {
  fleet: FleetContext;
  pubsub: PubSub;
  connections: Map<string, WifidogxConnection>;
  /** The edge's current authentication policy. */
  policy: () => WifidogxAuthPolicy;
}

const deviceParams = {
  type: 'object',
  required: ['org', 'device'],
  properties: {
    ...orgParam,
    device: { type: 'string', minLength: 1, description: 'device id or identifier (the gateway device_id)' },
  },
} as const;
const errorRef = { $ref: 'ApiErrorBody#' } as const;
const anyObject = { type: 'object', additionalProperties: true } as const;
const MAC = '^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$';
const IP = '^[0-9A-Fa-f:.]{2,45}$';
const SHORT = { type: 'string', minLength: 1, maxLength: 128, pattern: '^[\\x21-\\x7e]+$' } as const;

/** What each operator command carries (the seed's fields). */
const COMMAND_FIELDS: Record<string, { required: string[]; properties: Record<string, unknown> }> = {
  auth: {
    required: ['token', 'client_ip', 'client_mac', 'gw_id', 'once_auth'],
    properties: {
      token: SHORT,
      client_ip: { type: 'string', pattern: IP },
      client_mac: { type: 'string', pattern: MAC },
      gw_id: SHORT,
      once_auth: { type: 'boolean' },
      client_name: { type: 'string', maxLength: 64 },
    },
  },
  kickoff: {
    required: ['client_ip', 'client_mac', 'gw_id'],
    properties: {
      client_ip: { type: 'string', pattern: IP },
      client_mac: { type: 'string', pattern: MAC },
      gw_id: SHORT,
    },
  },
  tmp_pass: {
    required: ['client_mac'],
    properties: {
      client_mac: { type: 'string', pattern: MAC },
      timeout: { type: 'integer', minimum: 1, maximum: 86_400, default: 300 },
    },
  },
  get_firmware_info: { required: [], properties: {} },
  firmware_upgrade: {
    required: ['url'],
    properties: { url: { type: 'string', minLength: 1, maxLength: 499 }, force: { type: 'boolean', default: false } },
  },
};

export async function registerWifidogxRoutes(api: FastifyInstance, deps: WifidogxRouteDeps): Promise<void> {
  const { fleet } = deps;
  type P = { org: string; device: string };

  async function device(request: {
    operator: { orgId: string | null } & object;
    params: { org: string; device: string };
  }): Promise<Device> {
    const org = await resolveOrg(fleet, request.operator as never, request.params.org);
    return resolveDevice(fleet, org.id, request.params.device);
  }

  /** A new credential for the gateway (shown once, hash stored); its current link is closed so it returns on the new one. */
  async function credential(d: Device, actor: { type: string; id: string | null }) {
    const rotated = await hasCredential(fleet.db, d.id);
    const { token, issuedAt } = await issueCredential(fleet.db, d.id);
    await audit(fleet.db, actor as never, {
      orgId: d.org_id,
      action: 'wifidogx.credential_issued',
      resourceType: 'device',
      resourceId: d.id,
      details: { rotated },
    });
    await deps.pubsub.broadcast(Topics.device(d.id), 'wifidogx_credential_issued', { device_id: d.id });
    return {
      device_id: d.id,
      identifier: d.identifier,
      token,
      ws_path: credentialPath(WIFIDOGX_PATH, token),
      issued_at: issuedAt.toISOString(),
      rotated,
    };
  }

  for (const action of ['approve', 'revoke'] as const) {
    api.post<{ Params: P }>(
      `/orgs/:org/wifidogx/devices/:device/${action}`,
      {
        onRequest: requireRole('operator'),
        schema: {
          operationId: `${action}WifidogxDevice`,
          tags: ['wifidogx'],
          summary:
            action === 'approve'
              ? 'Approve a pending gateway (it then gets its settings, commands and updates)'
              : 'Revoke a gateway (its link is closed, it is refused from now on)',
          description:
            action === 'approve'
              ? 'Under the secure policy, a gateway without a credential is issued one: `credential.ws_path` goes into its WSServerPath (shown once).'
              : undefined,
          params: deviceParams,
          response: { 200: anyObject, ...authErrors },
        },
      },
      async (request) => {
        const d = await device(request);
        if (action === 'revoke') return revokeDevice(fleet, request.operator.actor, d.org_id, d.id);
        const approved = await approveDevice(fleet, request.operator.actor, d.org_id, d.id);
        if (d.protocol !== 'wifidogx' || deps.policy() !== 'secure' || (await hasCredential(fleet.db, d.id)))
          return approved;
        return { ...approved, credential: await credential(approved, request.operator.actor) };
      },
    );
  }

  api.post<{ Params: P }>(
    '/orgs/:org/wifidogx/devices/:device/credential',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'issueWifidogxCredential',
        tags: ['wifidogx'],
        summary: "Issue or rotate a gateway's credential (shown once); the gateway connects on `ws_path` from now on",
        description:
          "The previous credential stops working and the current link is closed (4001). Put `ws_path` into the gateway's WSServerPath.",
        params: deviceParams,
        response: { 201: anyObject, ...authErrors },
      },
    },
    async (request, reply) => {
      const d = await device(request);
      if (d.protocol !== 'wifidogx')
        throw new ApiError(409, 'conflict', `device ${d.identifier} is not a WiFiDogX gateway`);
      return reply.status(201).send(await credential(d, request.operator.actor));
    },
  );

  api.post<{ Params: P }>(
    '/orgs/:org/wifidogx/devices/:device/release',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'releaseWifidogxDevice',
        tags: ['wifidogx'],
        summary: "Close the gateway's current link wherever it is, so the next claim of its device_id may connect",
        params: deviceParams,
        response: { 200: anyObject, ...authErrors },
      },
    },
    async (request) => {
      const d = await device(request);
      await audit(fleet.db, request.operator.actor, {
        orgId: d.org_id,
        action: 'wifidogx.release',
        resourceType: 'device',
        resourceId: d.id,
      });
      await deps.pubsub.broadcast(Topics.device(d.id), 'wifidogx_release', { device_id: d.id });
      return { ok: true };
    },
  );

  api.get<{ Params: P }>(
    '/orgs/:org/wifidogx/devices/:device',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'getWifidogxDevice',
        tags: ['wifidogx'],
        summary: 'A gateway: device info, gateways, auth-mode settings, firmware info, recent commands',
        params: deviceParams,
        response: { 200: anyObject, ...authErrors },
      },
    },
    async (request) => {
      const d = await device(request);
      const state = await getGatewayState(fleet.db, d.id);
      return { device: d, gateway: state ?? null, commands: (await listCommands(fleet.db, d.id, 20)).map(commandJson) };
    },
  );

  api.get<{ Params: P; Querystring: { limit: number; offset: number } }>(
    '/orgs/:org/wifidogx/devices/:device/commands',
    {
      onRequest: requireRole('viewer'),
      schema: {
        operationId: 'listWifidogxCommands',
        tags: ['wifidogx'],
        summary: 'Commands sent to a gateway with their responses and errors, newest first',
        params: deviceParams,
        querystring: {
          type: 'object',
          properties: paginationQuery,
        },
        response: {
          200: pageOfItems(anyObject, { total: false }),
          ...authErrors,
        },
      },
    },
    async (request) => {
      const d = await device(request);
      const { limit, offset } = request.query;
      return { items: (await listCommands(fleet.db, d.id, limit + offset)).slice(offset).map(commandJson) };
    },
  );

  api.put<{ Params: P & { gw: string }; Body: { auth_mode: number } }>(
    '/orgs/:org/wifidogx/devices/:device/gateways/:gw/auth-mode',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'setWifidogxAuthMode',
        tags: ['wifidogx'],
        summary:
          "Set a gateway's auth mode (sent now when the device is connected, and in every connect/heartbeat reply)",
        params: {
          type: 'object',
          required: ['org', 'device', 'gw'],
          properties: { ...deviceParams.properties, gw: SHORT },
        },
        body: {
          type: 'object',
          required: ['auth_mode'],
          additionalProperties: false,
          properties: { auth_mode: { type: 'integer', minimum: 0, maximum: 255 } },
        },
        response: { 200: anyObject, ...authErrors },
      },
    },
    async (request) => {
      const d = await device(request);
      await setAuthMode(fleet.db, d.id, request.params.gw, request.body.auth_mode);
      await audit(fleet.db, request.operator.actor, {
        orgId: d.org_id,
        action: 'wifidogx.set_auth_mode',
        resourceType: 'device',
        resourceId: d.id,
        details: { gw_id: request.params.gw, auth_mode: request.body.auth_mode },
      });
      let command: WifidogxCommand | undefined;
      if (d.connection_status === 'online' && d.approval === 'approved')
        command = await queueCommand(
          d,
          'set_auth_mode',
          { gw_id: request.params.gw, auth_mode: request.body.auth_mode },
          request.operator.actor,
        );
      return {
        ok: true,
        gw_id: request.params.gw,
        auth_mode: request.body.auth_mode,
        ...(command ? { command: commandJson(command) } : {}),
      };
    },
  );

  api.post<{ Params: P; Body: Record<string, unknown> & { type: string } }>(
    '/orgs/:org/wifidogx/devices/:device/commands',
    {
      onRequest: requireRole('operator'),
      schema: {
        operationId: 'sendWifidogxCommand',
        tags: ['wifidogx'],
        summary:
          'Send a command to a connected, approved gateway: auth | kickoff | tmp_pass | get_firmware_info | firmware_upgrade',
        description:
          'Answers 202 with the recorded command; its status moves to sent/delivered and then succeeded/failed with the device response (GET .../commands).',
        params: deviceParams,
        body: {
          type: 'object',
          required: ['type'],
          properties: { type: { type: 'string', enum: Object.keys(COMMAND_FIELDS) } },
          additionalProperties: true,
        },
        response: { 202: anyObject, 409: errorRef, ...authErrors },
      },
    },
    async (request, reply) => {
      const d = await device(request);
      const { type, ...fields } = request.body;
      const payload = validateCommand(type, fields);
      if (d.approval !== 'approved')
        throw new ApiError(
          409,
          'conflict',
          `device ${d.identifier} is ${d.approval}: approve it before sending commands`,
        );
      if (d.connection_status !== 'online')
        throw new ApiError(
          409,
          'conflict',
          `device ${d.identifier} is offline; commands are only sent to connected gateways`,
        );
      const command = await queueCommand(d, type, payload, request.operator.actor);
      return reply.status(202).send(commandJson(command));
    },
  );

  async function queueCommand(
    d: Device,
    type: string,
    payload: Record<string, unknown>,
    actor: { type: string; id: string | null },
  ): Promise<WifidogxCommand> {
    const command = await createCommand(fleet.db, {
      orgId: d.org_id,
      deviceId: d.id,
      reqId: `op-${randomBytes(6).toString('hex')}`,
      type,
      payload,
      createdBy: `${actor.type}:${actor.id ?? ''}`,
    });
    await audit(fleet.db, actor as never, {
      orgId: d.org_id,
      action: `wifidogx.command.${type}`,
      resourceType: 'device',
      resourceId: d.id,
      details: { command_id: command.id },
    });
    // The node holding the gateway's link sends it (any node may have taken the request).
    await deps.pubsub.broadcast(Topics.device(d.id), 'wifidogx_command', { command_id: command.id });
    return command;
  }
}

/** Checks a command's fields against the seed's (required fields, types, safe URL); returns the payload to send. */
export function validateCommand(type: string, fields: Record<string, unknown>): Record<string, unknown> {
  const spec = COMMAND_FIELDS[type];
  if (!spec)
    throw new ApiError(400, 'invalid', `type must be one of ${Object.keys(COMMAND_FIELDS).join(', ')}`, {
      field: 'type',
    });
  const out: Record<string, unknown> = {};
  for (const [name, schema] of Object.entries(spec.properties) as Array<
    [
      string,
      { type: string; pattern?: string; minimum?: number; maximum?: number; maxLength?: number; default?: unknown },
    ]
  >) {
    let value = fields[name];
    if (value === undefined) {
      if (spec.required.includes(name)) throw new ApiError(400, 'invalid', `${type} needs ${name}`, { field: name });
      if (schema.default === undefined) continue;
      value = schema.default;
    }
    const ok =
      schema.type === 'boolean'
        ? typeof value === 'boolean'
        : schema.type === 'integer'
          ? Number.isInteger(value) &&
            (value as number) >= (schema.minimum ?? -Infinity) &&
            (value as number) <= (schema.maximum ?? Infinity)
          : typeof value === 'string' &&
            value.length > 0 &&
            value.length <= (schema.maxLength ?? 128) &&
            (!schema.pattern || new RegExp(schema.pattern).test(value));
    if (!ok)
      throw new ApiError(
        400,
        'invalid',
        `${name} is not a valid ${schema.type}${schema.pattern ? ` (${schema.pattern})` : ''}`,
        { field: name },
      );
    out[name] = value;
  }
  for (const name of Object.keys(fields))
    if (!(name in spec.properties)) throw new ApiError(400, 'invalid', `${type} has no field ${name}`, { field: name });
  if (type === 'firmware_upgrade' && !isSafeFirmwareUrl(out.url)) {
    throw new ApiError(
      400,
      'unsafe_url',
      'the URL would be passed to a shell on the gateway: use http(s)://host[:port]/path with only letters, digits and . _ ~ - in the path, no query, under 500 characters',
      { field: 'url' },
    );
  }
  return out;
}

function commandJson(c: WifidogxCommand): Record<string, unknown> {
  return { ...c };
}
