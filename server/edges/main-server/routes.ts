/**
 * `/api/main-server/*` (the Main Server protocol) on the API listener. Operators authenticate with the same
 * bearer tokens as `/api/v1` (JWT or API token, roles); devices with their device token
 * (`fhd_...`). Scalars come from the JSON body, falling back to the query string. Errors are
 * `{error, details}`.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { assertOrgAccess, bearerToken, roleRank, type OperatorPrincipal } from '../../http/auth.ts';
import type { Device, Role } from '../../db/schema.ts';
import type { BlobStore } from '../../firmware/blob-store.ts';
import { firmwareBlob, PRIVATE_IMMUTABLE, packageHeaders, serveBlob } from '../../firmware/serve-blob.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { linkEventOrThrow, openLink } from '../../fleet/device-link.ts';
import { listProductDevices } from '../../fleet/devices.ts';
import { isUuid } from '../../fleet/errors.ts';
import type { Product } from '../../fleet/orgs.ts';
import { badRequest, forbidden, mainServerErrorHandler, mainServerNotFound, notFound, unauthorized } from './errors.ts';
import {
  applyStatus,
  deployUpdate,
  findDevice,
  findExtension,
  findPackage,
  markOffered,
  parseExtensions,
  recordExtensions,
  registerDevice,
  scheduleUpdate,
  UPDATE_STATUSES,
  updatesFor,
  validDeviceId,
  PROTOCOL,
  type UpdateRow,
  type UpdateStatus,
} from './service.ts';
import { DEVICE_TOKEN_PREFIX, deviceDetails, deviceForToken, recordRegistration } from './store.ts';

export const MAIN_SERVER_PREFIX = '/api/main-server';
export const HEARTBEAT_SECONDS = 60;

export interface MainServerRouteDeps {
  fleet: FleetContext;
  blobs: BlobStore;
  tenant: () => Promise<Product>;
  /** Base URL of the API listener for `package_path` (default: the request's own origin). */
  publicUrl?: string;
}

type Caller = { kind: 'operator'; principal: OperatorPrincipal } | { kind: 'device'; device: Device };

/** Callers authenticated by the onRequest hook, so handlers do not authenticate twice. */
const callers = new WeakMap<FastifyRequest, Caller | undefined>();

/** Who calls (authenticated once per request): a device token, an operator bearer, or nobody. */
async function callerOf(request: FastifyRequest, fleet: FleetContext): Promise<Caller | undefined> {
  if (callers.has(request)) return callers.get(request);
  const caller = await authenticate(request, fleet);
  callers.set(request, caller);
  return caller;
}

/**
 * onRequest hook of every route but register-device, run before the body is parsed or validated:
 * 401 when no bearer authenticates anyone, 403 for the wrong kind of caller or an operator below
 * `access` (a role: operators with it, and devices for their own data; 'device': devices only).
 * Carries `requiredRole` like `requireRole`, so the route table shows it.
 */
function requireCaller(fleet: FleetContext, access: Role | 'device') {
  const hook = async (request: FastifyRequest): Promise<void> => {
    const caller = await callerOf(request, fleet);
    if (!caller)
      throw unauthorized(
        'send an operator token (POST /api/v1/auth/login) or the device token as "Authorization: Bearer <token>"',
      );
    if (caller.kind === 'device') {
      if (access === 'operator' || access === 'admin')
        throw forbidden('this endpoint is for operators; a device token cannot use it');
      return;
    }
    if (access === 'device') throw forbidden('this endpoint is for devices; authenticate with the device token');
    if (roleRank(caller.principal.role) < roleRank(access))
      throw forbidden(`this needs the ${access} role; you are ${caller.principal.role}`);
  };
  return access === 'device' ? hook : Object.assign(hook, { requiredRole: access });
}

/** A device token, an operator bearer, or nobody (undefined). 401 for a bearer that authenticates nobody. */
async function authenticate(request: FastifyRequest, fleet: FleetContext): Promise<Caller | undefined> {
  const token = bearerToken(request);
  if (!token) return undefined;
  if (token.startsWith(DEVICE_TOKEN_PREFIX)) {
    const device = await deviceForToken(fleet.db, token);
    if (!device)
      throw unauthorized(
        'the device token is invalid, rotated or revoked; register again or ask an operator for a new token',
      );
    return { kind: 'device', device };
  }
  const auth = request.server.fleethubAuth;
  const principal = auth ? await auth.authenticate(token) : null;
  if (!principal) throw unauthorized('the bearer token is invalid or expired; log in again (POST /api/v1/auth/login)');
  return { kind: 'operator', principal };
}

async function requireOperator(
  request: FastifyRequest,
  deps: MainServerRouteDeps,
  role: Role,
): Promise<{ principal: OperatorPrincipal; product: Product }> {
  const caller = await callerOf(request, deps.fleet);
  if (!caller)
    throw unauthorized('send an operator token as "Authorization: Bearer <token>" (POST /api/v1/auth/login)');
  if (caller.kind === 'device') throw forbidden('this endpoint is for operators; a device token cannot use it');
  if (roleRank(caller.principal.role) < roleRank(role))
    throw forbidden(`this needs the ${role} role; you are ${caller.principal.role}`);
  const product = await deps.tenant();
  try {
    assertOrgAccess(caller.principal, product.org_id, 'main server');
  } catch {
    throw notFound('the Main Server fleet is not in your organization');
  }
  return { principal: caller.principal, product };
}

/** A device acting for `deviceId` (the body's `device_id`): 401 without a valid token, 403 for an operator or another device. */
async function requireDevice(request: FastifyRequest, deps: MainServerRouteDeps, deviceId: unknown): Promise<Device> {
  const caller = await callerOf(request, deps.fleet);
  if (!caller)
    throw unauthorized(
      'send the device token as "Authorization: Bearer <token>"; a device gets it after an operator approves its registration',
    );
  if (caller.kind === 'operator') throw forbidden('this endpoint is for devices; authenticate with the device token');
  if (deviceId !== undefined && deviceId !== caller.device.identifier)
    throw forbidden(`this token belongs to device ${caller.device.identifier}; it cannot act for ${String(deviceId)}`);
  return caller.device;
}

/** A scalar from the JSON body, falling back to the query string. */
function param(request: FastifyRequest, name: string): unknown {
  const body = request.body;
  if (
    typeof body === 'object' &&
    body !== null &&
    !Array.isArray(body) &&
    (body as Record<string, unknown>)[name] !== undefined
  )
    return (body as Record<string, unknown>)[name];
  const q = (request.query as Record<string, unknown> | undefined)?.[name];
  return Array.isArray(q) ? q[0] : q;
}

function optionalString(request: FastifyRequest, name: string, max = 200): string | null {
  const v = param(request, name);
  if (v === undefined || v === null || v === '') return null;
  if (typeof v !== 'string' || v.length > max)
    throw badRequest(`${name} must be a string of at most ${max} characters`);
  return v;
}

function baseUrl(request: FastifyRequest, deps: MainServerRouteDeps): string {
  return (deps.publicUrl ?? `${request.protocol}://${request.host}`).replace(/\/+$/, '');
}

function downloadUrl(request: FastifyRequest, deps: MainServerRouteDeps, packageId: string): string {
  return `${baseUrl(request, deps)}${MAIN_SERVER_PREFIX}/download-update?package_id=${packageId}`;
}

const anyBody = { type: ['object', 'null'], additionalProperties: true } as const;
const anyQuery = { type: 'object', additionalProperties: true } as const;
const schema = (summary: string, extra: Record<string, unknown> = {}) => ({
  tags: ['main-server'],
  summary,
  querystring: anyQuery,
  ...extra,
});

/** Registers the Main Server endpoints on the API listener's root instance. */
export async function mainServerRoutes(app: FastifyInstance, deps: MainServerRouteDeps): Promise<void> {
  await app.register(
    async (scope) => {
      scope.setErrorHandler(mainServerErrorHandler);
      scope.setNotFoundHandler(mainServerNotFound);
      // Authentication before validation (register-device alone takes anonymous callers).
      const viewerOrDevice = requireCaller(deps.fleet, 'viewer');
      const operatorOnly = requireCaller(deps.fleet, 'operator');
      const deviceOnly = requireCaller(deps.fleet, 'device');

      // --- operators ---------------------------------------------------------------------

      scope.get(
        '/updates',
        {
          onRequest: viewerOrDevice,
          schema: schema('Current vs available version of every extension (operators: all devices; a device: its own)'),
        },
        async (request) => {
          const caller = await callerOf(request, deps.fleet);
          if (!caller)
            throw unauthorized('send an operator token or the device token as "Authorization: Bearer <token>"');
          const product = await deps.tenant();
          let devices: Device[];
          if (caller.kind === 'device') {
            devices = [caller.device];
          } else {
            await requireOperator(request, deps, 'viewer');
            const only = optionalString(request, 'device_id');
            devices = only
              ? [await findDevice(deps.fleet.db, product, only)]
              : await listProductDevices(deps.fleet.db, product.id, { protocol: PROTOCOL });
          }
          const rows = await updatesFor(deps.fleet.db, product, devices);
          if (caller.kind === 'device') {
            for (const r of rows)
              if (r.package && r.is_compatible) await markOffered(deps.fleet, caller.device, r.package);
          }
          return { updates: rows.map((r) => updateJson(r, caller.kind === 'operator', request, deps)) };
        },
      );

      scope.post(
        '/schedule-update',
        {
          onRequest: operatorOnly,
          schema: schema('Schedule an extension version for every device that has the extension', { body: anyBody }),
        },
        async (request) => {
          const { principal, product } = await requireOperator(request, deps, 'operator');
          const extension = await findExtension(deps.fleet.db, product, param(request, 'extension_id'));
          const firmware = await findPackage(deps.fleet.db, product, extension.name, param(request, 'new_version'));
          const { groupId, change } = await scheduleUpdate(deps.fleet, principal.actor, product, extension, firmware);
          return {
            message: 'Update scheduled',
            extension_id: extension.id,
            new_version: firmware.version,
            package_id: firmware.id,
            group_id: groupId,
            attempts: change.attempts,
          };
        },
      );

      scope.post(
        '/deploy-update',
        { onRequest: operatorOnly, schema: schema('Deploy an extension version to one device', { body: anyBody }) },
        async (request) => {
          const { principal, product } = await requireOperator(request, deps, 'operator');
          const device = await findDevice(deps.fleet.db, product, param(request, 'device_id'));
          const extension = await findExtension(deps.fleet.db, product, param(request, 'extension_id'));
          const firmware = await findPackage(deps.fleet.db, product, extension.name, param(request, 'version'));
          await deployUpdate(deps.fleet, principal.actor, device, firmware);
          return {
            status: 'queued',
            message: `Update deployment queued for device ${device.identifier}`,
            device_id: device.identifier,
            extension_id: extension.id,
            version: firmware.version,
            package_id: firmware.id,
            package_path: downloadUrl(request, deps, firmware.id),
            sha256: firmware.sha256,
          };
        },
      );

      scope.get(
        '/devices',
        { onRequest: viewerOrDevice, schema: schema('Main Server devices with their status') },
        async (request) => {
          const { product } = await requireOperator(request, deps, 'viewer');
          const devices = await listProductDevices(deps.fleet.db, product.id, { protocol: PROTOCOL });
          const details = await deviceDetails(
            deps.fleet.db,
            devices.map((d) => d.id),
          );
          return {
            devices: devices.map((d) => ({
              id: d.identifier,
              name: details.get(d.id)?.name ?? d.description,
              ip: details.get(d.id)?.ip ?? null,
              status: d.connection_status,
              approval: d.approval,
              has_token: details.get(d.id)?.has_token ?? false,
              last_seen: d.last_seen_at,
              fleet_id: d.id,
            })),
          };
        },
      );

      // --- devices -----------------------------------------------------------------------

      scope.route({
        method: ['GET', 'HEAD'],
        url: '/download-update',
        exposeHeadRoute: false,
        onRequest: viewerOrDevice,
        schema: schema('Download an update package (sha256 in X-Checksum-SHA256 and Digest; Range supported)'),
        handler: async (request, reply) => {
          const caller = await callerOf(request, deps.fleet);
          if (!caller)
            throw unauthorized('send the device token (or an operator token) as "Authorization: Bearer <token>"');
          if (caller.kind === 'operator') await requireOperator(request, deps, 'viewer');
          const product = await deps.tenant();
          const id = param(request, 'package_id');
          if (typeof id !== 'string' || !isUuid(id))
            throw badRequest('package_id must be the package id (a UUID) that GET /updates or deploy-update returned');
          const firmware = await deps.fleet.db
            .selectFrom('firmware')
            .selectAll()
            .where('id', '=', id)
            .where('product_id', '=', product.id)
            .executeTakeFirst();
          const missing = (): never => {
            throw notFound(`package ${id} does not exist or has no uploaded image`);
          };
          const blob = firmware ? await firmwareBlob(deps.blobs, firmware) : null;
          if (!firmware || !blob) return missing();
          // The token travels in a header, not in the URL: the Pi's own cache may keep the bytes.
          const options = { blobs: deps.blobs, cacheControl: PRIVATE_IMMUTABLE, missing, ...packageHeaders(firmware) };
          return serveBlob(request, reply, blob, options);
        },
      });

      scope.post(
        '/update-status',
        { onRequest: deviceOnly, schema: schema('A device reports the outcome of an update', { body: anyBody }) },
        async (request) => {
          const deviceId = param(request, 'device_id');
          const device = await requireDevice(request, deps, deviceId);
          const product = await deps.tenant();
          const extension = await findExtension(deps.fleet.db, product, param(request, 'extension_id'));
          const status = param(request, 'status');
          if (typeof status !== 'string' || !UPDATE_STATUSES.includes(status as UpdateStatus))
            throw badRequest(`status must be one of ${UPDATE_STATUSES.join(', ')}`);
          const version = param(request, 'version');
          if (typeof version !== 'string' || version === '')
            throw badRequest('version is required (the version being installed)');
          const percentRaw = param(request, 'progress') ?? param(request, 'percent');
          const percent = percentRaw === undefined ? undefined : Number(percentRaw);
          if (percent !== undefined && !Number.isFinite(percent))
            throw badRequest('progress must be a number from 0 to 100');
          const error =
            optionalString(request, 'error', 2000) ??
            optionalString(request, 'details', 2000) ??
            optionalString(request, 'message', 2000) ??
            undefined;
          const state = await applyStatus(deps.fleet, device, extension.name, {
            status: status as UpdateStatus,
            version,
            percent,
            error,
          });
          return {
            message: 'Status recorded',
            device_id: device.identifier,
            extension_id: extension.id,
            version,
            status,
            update_state: state,
          };
        },
      );

      scope.post(
        '/register-device',
        {
          schema: schema('A device registers (pending until an operator approves) and collects its token', {
            body: anyBody,
          }),
        },
        async (request, reply) => {
          const deviceId = param(request, 'device_id');
          if (!validDeviceId(deviceId)) throw badRequest('device_id must be 1-200 printable characters');
          const name = optionalString(request, 'name');
          const ip = optionalString(request, 'ip', 64);
          const extensions = parseExtensions(param(request, 'extensions'));
          const product = await deps.tenant();
          if (bearerToken(request)) {
            // A registered device refreshing its details.
            const device = await requireDevice(request, deps, deviceId);
            await recordRegistration(deps.fleet.db, device.id, { name, ip });
            await recordExtensions(deps.fleet, device, extensions);
            return reply
              .status(200)
              .send({ status: 'approved', device_id: device.identifier, message: 'Registration updated' });
          }
          const claim = optionalString(request, 'claim_token');
          const result = await registerDevice(deps.fleet, product, {
            deviceId,
            name,
            ip,
            extensions,
            ...(claim ? { claim } : {}),
          });
          if (result.status === 'pending') {
            return reply.status(202).send({
              status: 'pending',
              device_id: deviceId,
              message:
                'Registration received; an operator must approve this device. Repeat this request with claim_token to collect the device token once approved.',
              ...(result.claim ? { claim_token: result.claim } : {}),
            });
          }
          return reply.status(200).send({
            status: 'approved',
            device_id: deviceId,
            device_token: result.token,
            message:
              'Device approved. Keep device_token: it is shown once; send it as "Authorization: Bearer <token>".',
            heartbeat_seconds: HEARTBEAT_SECONDS,
          });
        },
      );

      scope.post(
        '/heartbeat',
        {
          onRequest: deviceOnly,
          schema: schema('A device says it is online (every 60 s; offline after 180 s without one)', { body: anyBody }),
        },
        async (request) => {
          const device = await requireDevice(request, deps, param(request, 'device_id'));
          const extensions = parseExtensions(param(request, 'extensions'));
          // Online as of now (the link publishes the status; the presence sweep takes it back).
          await linkEventOrThrow(
            deps.fleet,
            openLink({ deviceId: device.id, orgId: device.org_id, productId: device.product_id, protocol: PROTOCOL }),
            { type: 'connected', running: {} },
          );
          await recordExtensions(deps.fleet, device, extensions);
          return {
            status: 'ok',
            device_id: device.identifier,
            message: 'Heartbeat received',
            heartbeat_seconds: HEARTBEAT_SECONDS,
          };
        },
      );
    },
    { prefix: MAIN_SERVER_PREFIX },
  );
}

function updateJson(
  r: UpdateRow,
  withDevice: boolean,
  request: FastifyRequest,
  deps: MainServerRouteDeps,
): Record<string, unknown> {
  return {
    ...(withDevice ? { device_id: r.device.identifier } : {}),
    extension_id: r.extension_id,
    name: r.name,
    current_version: r.current_version,
    available_version: r.available_version,
    is_compatible: r.is_compatible,
    update_available: r.update_available,
    ...(r.package
      ? {
          package_id: r.package.id,
          sha256: r.package.sha256,
          size: r.package.size === null ? null : Number(r.package.size),
          compatible_with:
            typeof r.package.metadata?.compatible_with === 'string' ? r.package.metadata.compatible_with : null,
          download_url: downloadUrl(request, deps, r.package.id),
        }
      : {}),
  };
}
