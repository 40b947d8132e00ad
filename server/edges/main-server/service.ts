/**
 * The Main Server protocol in the fleet's language, transport-free: extensions are device components, packages
 * are firmware records (format `main-server-zip`), `schedule-update` targets the managed group
 * `ext-<extension>`, `deploy-update` sets a device target, `update-status` drives the update
 * state machine. The HTTP routes (routes.ts) only authenticate, parse and answer.
 */
import semver from 'semver';
import type { Actor } from '../../audit.ts';
import type { Db } from '../../db/index.ts';
import type { Device, Firmware } from '../../db/schema.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { linkEvent, linkEventOrThrow, openLink, type LinkEvent } from '../../fleet/device-link.ts';
import { approveDevice, findOrRegisterEdgeDevice } from '../../fleet/edge-devices.ts';
import { FleetError } from '../../fleet/errors.ts';
import { componentDevicesOutsideGroup, findProductDevice } from '../../fleet/devices.ts';
import { addDevicesToGroup, createGroup } from '../../fleet/groups.ts';
import { runningComponentsOf } from '../../fleet/running-firmware.ts';
import type { Product } from '../../fleet/orgs.ts';
import { resolveTargets } from '../../fleet/reconcile.ts';
import { setDeviceTarget, setGroupTarget, type TargetChange } from '../../fleet/targets.ts';
import { badRequest, conflict, forbidden, notFound, unauthorized } from './errors.ts';
import { isCompatible, PACKAGE_FORMAT, validExtensionName } from '../../../shared/main-server-package.ts';
import { checkClaim, ensureExtensions, extensionById, issueDeviceToken, recordRegistration } from './store.ts';

export const PROTOCOL = 'main-server' as const;
export const VIA = 'edge:main-server';

export interface ReportedExtension {
  name: string;
  version: string;
}

/** Validates the seed's `extensions: [{name, version}]`. */
export function parseExtensions(value: unknown): ReportedExtension[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || value.length > 100)
    throw badRequest('extensions must be a list of at most 100 {name, version} objects');
  return value.map((e, i) => {
    const x = (typeof e === 'object' && e !== null ? e : {}) as Record<string, unknown>;
    if (!validExtensionName(x.name))
      throw badRequest(`extensions[${i}].name must be 1-59 letters, digits, '_', '.', '-'`);
    if (typeof x.version !== 'string' || semver.valid(x.version) === null)
      throw badRequest(`extensions[${i}].version must be a semantic version such as 1.0.0`);
    return { name: x.name, version: x.version };
  });
}

/** Records the versions a device reports (each extension a component) and keeps it in the managed groups of its extensions. */
export async function recordExtensions(
  fleet: FleetContext,
  device: Device,
  extensions: ReportedExtension[],
): Promise<void> {
  if (extensions.length === 0) return;
  await ensureExtensions(
    fleet.db,
    { org_id: device.org_id, id: device.product_id },
    extensions.map((e) => e.name),
  );
  for (const e of extensions) {
    await linkEventOrThrow(fleet, linkOf(device), {
      type: 'connected',
      running: { version: e.version, component: e.name },
    });
  }
  const groups = await fleet.db
    .selectFrom('groups')
    .select('id')
    .where('product_id', '=', device.product_id)
    .where(
      'name',
      'in',
      extensions.map((e) => managedGroupName(e.name)),
    )
    .where((eb) =>
      eb.not(
        eb.exists(
          eb
            .selectFrom('group_devices')
            .select('device_id')
            .whereRef('group_devices.group_id', '=', 'groups.id')
            .where('group_devices.device_id', '=', device.id),
        ),
      ),
    )
    .execute();
  for (const g of groups)
    await addDevicesToGroup(fleet, { type: 'system', id: null }, device.org_id, g.id, [device.id]);
}

export type Registration =
  | { status: 'pending'; device: Device; claim?: string }
  | { status: 'approved'; device: Device; token?: string };

export interface RegisterInput {
  deviceId: string;
  name: string | null;
  ip: string | null;
  extensions: ReportedExtension[];
  claim?: string;
}

/**
 * `register-device` without a device token: the first call records a pending device and returns
 * its claim secret; later calls must present the claim; once approved, the claim is exchanged
 * for the device token (once).
 */
export async function registerDevice(
  fleet: FleetContext,
  product: Product,
  input: RegisterInput,
): Promise<Registration> {
  const { device, created } = await findOrRegisterEdgeDevice(fleet, {
    orgId: product.org_id,
    productId: product.id,
    identifier: input.deviceId,
    protocol: PROTOCOL,
    approval: 'pending',
    description: input.name,
  });
  if (device.approval === 'revoked')
    throw forbidden(`device ${input.deviceId} is revoked; ask an operator to approve it again`);
  if (created) {
    const { claim } = await recordRegistration(fleet.db, device.id, { name: input.name, ip: input.ip });
    await recordExtensions(fleet, device, input.extensions);
    return { status: 'pending', device, ...(claim ? { claim } : {}) };
  }
  const claim = await checkClaim(fleet.db, device.id, input.claim);
  if (claim === 'none') {
    throw conflict(
      `device ${input.deviceId} is already registered and holds a device token; send it as "Authorization: Bearer <token>" (an operator can rotate a lost token)`,
    );
  }
  if (claim === 'invalid') {
    if (!input.claim)
      throw conflict(
        `device ${input.deviceId} is already registered; repeat the registration with the claim_token it returned`,
      );
    throw unauthorized('claim_token does not match this device_id');
  }
  await recordRegistration(fleet.db, device.id, { name: input.name, ip: input.ip });
  await recordExtensions(fleet, device, input.extensions);
  if (device.approval !== 'approved') return { status: 'pending', device };
  const token = await issueDeviceToken(fleet, { type: 'device', id: device.id }, device, 'claimed');
  return { status: 'approved', device, token };
}

/** An operator pre-registers an approved device and receives its token (shown once). */
export async function provisionDevice(
  fleet: FleetContext,
  actor: Actor,
  product: Product,
  input: { deviceId: string; name: string | null },
): Promise<{ device: Device; token: string }> {
  const { device } = await findOrRegisterEdgeDevice(fleet, {
    orgId: product.org_id,
    productId: product.id,
    identifier: input.deviceId,
    protocol: PROTOCOL,
    approval: 'approved',
    description: input.name,
  });
  const approved =
    device.approval === 'approved' ? device : await approveDevice(fleet, actor, device.org_id, device.id);
  await recordRegistration(fleet.db, device.id, { name: input.name, ip: null });
  const token = await issueDeviceToken(fleet, actor, approved, 'provisioned');
  return { device: approved, token };
}

/** A Main Server device of the tenant by its `device_id` (identifier). */
export async function findDevice(db: Db, product: Product, identifier: unknown): Promise<Device> {
  if (typeof identifier !== 'string' || identifier === '') throw badRequest('device_id is required');
  const device = await findProductDevice(db, product.id, PROTOCOL, identifier);
  if (!device)
    throw notFound(`device ${identifier} is not registered; it must POST /api/main-server/register-device first`);
  return device;
}

/** The extension an `extension_id` names (integer, or its numeric string from a query). */
export async function findExtension(db: Db, product: Product, raw: unknown): Promise<{ id: number; name: string }> {
  const id = typeof raw === 'string' && /^\d{1,10}$/.test(raw) ? Number(raw) : raw;
  if (typeof id !== 'number' || !Number.isSafeInteger(id))
    throw badRequest('extension_id must be an integer (see GET /api/main-server/updates)');
  const ext = await extensionById(db, product.id, id);
  if (!ext)
    throw notFound(
      `extension ${id} does not exist; devices report extensions at registration, packages add them on upload`,
    );
  return ext;
}

/** The uploaded package of an extension version. */
export async function findPackage(db: Db, product: Product, component: string, version: unknown): Promise<Firmware> {
  if (typeof version !== 'string' || semver.valid(version) === null)
    throw badRequest('the version must be a semantic version such as 1.1.0');
  const firmware = await db
    .selectFrom('firmware')
    .selectAll()
    .where('product_id', '=', product.id)
    .where('component', '=', component)
    .where('version', '=', version)
    .where('format', '=', PACKAGE_FORMAT)
    .executeTakeFirst();
  if (!firmware?.has_blob)
    throw notFound(
      `no package for ${component} ${version} has been uploaded; upload it (fleethub main-server upload <zip>) first`,
    );
  return firmware;
}

export function managedGroupName(extension: string): string {
  return `ext-${extension}`;
}

/**
 * `schedule-update`: every device with the extension gets `version`, through one group target on
 * the managed group `ext-<extension>` (created and filled on demand).
 */
export async function scheduleUpdate(
  fleet: FleetContext,
  actor: Actor,
  product: Product,
  extension: { name: string },
  firmware: Firmware,
): Promise<{ groupId: string; change: TargetChange }> {
  const name = managedGroupName(extension.name);
  let group = await fleet.db
    .selectFrom('groups')
    .select(['id'])
    .where('product_id', '=', product.id)
    .where('name', '=', name)
    .executeTakeFirst();
  if (!group) {
    group = await createGroup(fleet, actor, {
      orgId: product.org_id,
      productId: product.id,
      name,
      description: `Main Server: every device with extension ${extension.name}`,
    }).catch(async (err: unknown) => {
      if (err instanceof FleetError && err.code === 'conflict')
        return fleet.db
          .selectFrom('groups')
          .select(['id'])
          .where('product_id', '=', product.id)
          .where('name', '=', name)
          .executeTakeFirstOrThrow();
      throw err;
    });
  }
  const missing = await componentDevicesOutsideGroup(fleet.db, product.id, extension.name, group.id);
  if (missing.length) await addDevicesToGroup(fleet, actor, product.org_id, group.id, missing);
  const change = await setGroupTarget(fleet, actor, product.org_id, group.id, firmware.id);
  return { groupId: group.id, change };
}

/** `deploy-update`: one device gets `firmware` (a device-level target). */
export async function deployUpdate(
  fleet: FleetContext,
  actor: Actor,
  device: Device,
  firmware: Firmware,
): Promise<TargetChange> {
  return setDeviceTarget(fleet, actor, device.org_id, device.id, firmware.id);
}

export interface UpdateRow {
  device: Device;
  extension_id: number;
  name: string;
  current_version: string | null;
  available_version: string | null;
  is_compatible: boolean;
  update_available: boolean;
  package?: Firmware;
}

/** Current vs available version of every extension of `devices` (their resolved targets). */
export async function updatesFor(db: Db, product: Product, devices: Device[]): Promise<UpdateRow[]> {
  if (devices.length === 0) return [];
  const ids = devices.map((d) => d.id);
  const components = await runningComponentsOf(db, ids);
  const extIds = await ensureExtensions(
    db,
    { org_id: product.org_id, id: product.id },
    components.map((c) => c.component),
  );
  const targets = new Map<string, string | null>();
  for (const component of new Set(components.map((c) => c.component))) {
    for (const r of await resolveTargets(db, { ids }, component))
      targets.set(`${r.device_id}/${component}`, r.target_id);
  }
  const targetIds = [...new Set([...targets.values()].filter((t): t is string => t !== null))];
  const packages = new Map(
    (targetIds.length ? await db.selectFrom('firmware').selectAll().where('id', 'in', targetIds).execute() : []).map(
      (f) => [f.id, f],
    ),
  );
  const byId = new Map(devices.map((d) => [d.id, d]));
  return components.map((c) => {
    const targetId = targets.get(`${c.device_id}/${c.component}`) ?? null;
    const pkg = targetId ? packages.get(targetId) : undefined;
    const available = pkg && pkg.version !== c.version ? pkg : undefined;
    const range = typeof available?.metadata?.compatible_with === 'string' ? available.metadata.compatible_with : null;
    return {
      device: byId.get(c.device_id)!,
      extension_id: extIds.get(c.component)!,
      name: c.component,
      current_version: c.version,
      available_version: available?.version ?? c.version,
      is_compatible: available ? isCompatible(range, c.version) : true,
      update_available: available !== undefined,
      ...(available ? { package: available } : {}),
    };
  });
}

/** The device's link (Main Server devices poll: every request is one event on it). */
function linkOf(device: Device) {
  return openLink({ deviceId: device.id, orgId: device.org_id, productId: device.product_id, protocol: PROTOCOL });
}

/** The device was offered `firmware` (it polled `/updates`): its queued or new attempt becomes `sent`. */
export async function markOffered(fleet: FleetContext, device: Device, firmware: Firmware): Promise<void> {
  // Already sent or underway: polling again does not move it back (poll).
  await linkEventOrThrow(fleet, linkOf(device), { type: 'update_sent', firmware, via: VIA, poll: true });
}

export type UpdateStatus = 'success' | 'failed' | 'in_progress' | 'rolled_back';
export const UPDATE_STATUSES: readonly UpdateStatus[] = ['success', 'failed', 'in_progress', 'rolled_back'];

export interface StatusReport {
  status: UpdateStatus;
  version: string;
  percent?: number;
  error?: string;
}

/** `update-status`: one device report through the device link. Returns the attempt state. */
export async function applyStatus(
  fleet: FleetContext,
  device: Device,
  component: string,
  report: StatusReport,
): Promise<string | null> {
  const { version } = report;
  const event: LinkEvent =
    report.status === 'in_progress'
      ? {
          type: 'report',
          kind: 'progress',
          component,
          version,
          begins: true,
          ...(report.percent !== undefined ? { percent: Math.max(0, Math.min(100, Math.round(report.percent))) } : {}),
        }
      : report.status === 'success'
        ? // The device runs the version now: the link settles its attempt succeeded.
          { type: 'boot_confirmed', component, version }
        : report.status === 'failed'
          ? {
              type: 'report',
              kind: 'error',
              component,
              version,
              errors: [report.error ?? `the device reported the update of ${component} to ${version} failed`],
            }
          : {
              type: 'report',
              kind: 'rolled_back',
              component,
              version,
              errors: [report.error ?? 'the device restored its backup after the install failed'],
              reason: 'device reported rolled_back',
            };
  const result = await linkEvent(fleet, linkOf(device), event);
  if (result.ok) return result.attempt?.state ?? null;
  const { refusal } = result;
  if (refusal.code === 'not_found')
    throw notFound(
      `no update of ${component} to ${version} is in progress for this device; report the version GET /updates offered`,
    );
  // in_progress after the install finished: nothing to record, the state answers.
  if (refusal.code === 'conflict' && report.status === 'in_progress' && refusal.details.state === 'finished')
    return 'finished';
  throw new FleetError(refusal.code, refusal.message, refusal.details);
}

/** A `device_id` we accept: 1-200 printable characters. */
export function validDeviceId(value: unknown): value is string {
  return typeof value === 'string' && value.length >= 1 && value.length <= 200 && !/[\u0000-\u001f\u007f]/.test(value);
}
