/**
 * Fleet functions for devices that speak other protocols than Phoenix (the edges: GRiSP, WiFiDogX,
 * Main Server, keyauth). Edges know versions, not firmware uuids, and send their own update
 * commands; the state machine, targets and audit log stay the fleet's (updates.ts, targets.ts).
 *
 * Lifecycle an edge follows:
 *   findOrRegisterEdgeDevice → (operator) approveDevice → edgeDeviceOnline → recordUpdateSent
 *   → device-link reports → edgeDeviceOnline (new version: settles) → edgeDeviceOffline
 * Edges call these through the device link (device-link.ts), which maps their events onto them.
 */
import { sql } from 'kysely';
import semver from 'semver';
import { audit, SYSTEM, type Actor } from '../audit.ts';
import type { Device, DeviceApproval, DeviceProtocol, Firmware, UpdateAttempt } from '../db/schema.ts';
import { inTransaction, Topics, type FleetContext } from './context.ts';
import { deviceDisconnected } from './connections.ts';
import { getDevice } from './devices.ts';
import { FleetError } from './errors.ts';
import { OPEN_STATES, stepColumns, TRANSITIONS, UNFINISHED_STATES } from './link-table.ts';
import { reconcileAttempts } from './reconcile.ts';
import { catalogueFirmwareByVersion, recordRunningComponent, reportedLabel } from './running-firmware.ts';
import { settleAttemptsOnJoin, transitionEvent } from './updates.ts';

/** The device an edge connection speaks for (from a certificate, a token or an approved claim). */
export interface EdgeDeviceRef {
  deviceId: string;
  orgId: string;
}

export interface RegisterEdgeDeviceInput {
  orgId: string;
  productId: string;
  /** The device's own name for itself (GRiSP serial, WiFiDogX device_id, ...); unique per product. */
  identifier: string;
  protocol: DeviceProtocol;
  /** Approval of a device seen for the first time: `pending` until an operator approves (default). */
  approval?: Extract<DeviceApproval, 'approved' | 'pending'>;
  description?: string | null;
}

/**
 * The device `identifier` names in the product, registering it (with `approval`, default pending)
 * when unknown. Concurrent first contacts create it once. An existing device keeps its approval.
 *
 * The identity rule: an identifier belongs to the protocol that registered it (and so to that
 * protocol's credential kind: a certificate, a device token, a key, a gateway credential). A claim
 * of it through another protocol is refused (`conflict`, naming no device) and audited as
 * `device.claim_refused` in the product's org — one place for every edge.
 */
export async function findOrRegisterEdgeDevice(
  ctx: FleetContext,
  input: RegisterEdgeDeviceInput,
): Promise<{ device: Device; created: boolean }> {
  const identifier = validEdgeIdentifier(input.identifier);
  const found = await inTransaction(ctx, async (trx, outbox) => {
    const inserted = await trx
      .insertInto('devices')
      .values({
        org_id: input.orgId,
        product_id: input.productId,
        identifier,
        protocol: input.protocol,
        approval: input.approval ?? 'pending',
        description: input.description ?? null,
      })
      .onConflict((oc) => oc.columns(['product_id', 'identifier']).doNothing())
      .returningAll()
      .executeTakeFirst();
    if (inserted) {
      await audit(
        trx,
        { type: 'system', id: null },
        {
          orgId: inserted.org_id,
          action: 'device.registered',
          resourceType: 'device',
          resourceId: inserted.id,
          details: {
            identifier,
            product_id: inserted.product_id,
            protocol: input.protocol,
            approval: inserted.approval,
            via: 'edge',
          },
        },
      );
      outbox.push({
        topic: Topics.operator(inserted.org_id),
        event: 'device_registered',
        payload: { device_id: inserted.id, identifier, protocol: input.protocol, approval: inserted.approval },
      });
      return { device: inserted, created: true };
    }
    const device = await trx
      .selectFrom('devices')
      .selectAll()
      .where('product_id', '=', input.productId)
      .where('identifier', '=', identifier)
      .executeTakeFirstOrThrow();
    if (device.org_id !== input.orgId)
      throw new FleetError('conflict', 'the product belongs to another organization', { product_id: input.productId });
    return { device, created: false };
  });
  if (found.device.protocol !== input.protocol) {
    await auditClaimRefused(ctx, {
      orgId: input.orgId,
      protocol: input.protocol,
      identifier,
      reason: 'registered_to_another_protocol',
      deviceId: found.device.id,
      owner: found.device.protocol,
    });
    throw new FleetError(
      'conflict',
      `identifier ${identifier} is registered to another kind of device; choose another identifier`,
      { field: 'identifier' },
    );
  }
  return found;
}

export interface ClaimRefusal {
  /** The org of the product the claim was made in. */
  orgId: string;
  /** The protocol the claim came through. */
  protocol: DeviceProtocol;
  identifier: string;
  /** Why, as a code: registered_to_another_protocol, credential_required, credential_invalid, ... */
  reason: string;
  /** The device the identifier names, when there is one (for operators; never told to the claimant). */
  deviceId?: string;
  /** The protocol that owns the identifier, when it is another. */
  owner?: DeviceProtocol;
  remote?: string | null;
}

/** Records that a claim of an identity was refused (audit `device.claim_refused`). */
export async function auditClaimRefused(ctx: FleetContext, refusal: ClaimRefusal): Promise<void> {
  await audit(ctx.db, SYSTEM, {
    orgId: refusal.orgId,
    action: 'device.claim_refused',
    resourceType: 'device',
    ...(refusal.deviceId ? { resourceId: refusal.deviceId } : {}),
    details: {
      protocol: refusal.protocol,
      identifier: refusal.identifier,
      reason: refusal.reason,
      ...(refusal.owner ? { owner_protocol: refusal.owner } : {}),
      ...(refusal.remote ? { remote: refusal.remote } : {}),
    },
  });
}

/**
 * An operator approves a pending (or revoked) device: it may now receive commands and updates.
 * Connected edges hear `device_approved` on the device topic.
 */
export async function approveDevice(ctx: FleetContext, actor: Actor, orgId: string, deviceId: string): Promise<Device> {
  return setApproval(ctx, actor, orgId, deviceId, 'approved');
}

/** An operator revokes a device: it is refused from now on; connected edges hear `device_revoked` and disconnect it. */
export async function revokeDevice(ctx: FleetContext, actor: Actor, orgId: string, deviceId: string): Promise<Device> {
  return setApproval(ctx, actor, orgId, deviceId, 'revoked');
}

async function setApproval(
  ctx: FleetContext,
  actor: Actor,
  orgId: string,
  deviceId: string,
  approval: 'approved' | 'revoked',
): Promise<Device> {
  const device = await getDevice(ctx, orgId, deviceId);
  return inTransaction(ctx, async (trx, outbox) => {
    if (device.approval === approval)
      return trx
        .updateTable('devices')
        .set({ updated_at: new Date() })
        .where('id', '=', device.id)
        .returningAll()
        .executeTakeFirstOrThrow();
    // revoked_at (database time, like the credentials it voids) stays when the device is approved again.
    const set =
      approval === 'revoked'
        ? { approval, revoked_at: sql<Date>`now()`, updated_at: new Date() }
        : { approval, updated_at: new Date() };
    const updated = await trx
      .updateTable('devices')
      .set(set)
      .where('id', '=', device.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId,
      action: approval === 'approved' ? 'device.approve' : 'device.revoke',
      resourceType: 'device',
      resourceId: device.id,
      details: { from: device.approval, identifier: device.identifier },
    });
    if (approval === 'revoked') {
      // A revoked device gets nothing more: its in-flight updates end here.
      const cancelled = await trx
        .updateTable('update_attempts')
        .set({ state: 'cancelled', ...stepColumns('cancelled') })
        .where('device_id', '=', device.id)
        .where('state', 'in', TRANSITIONS.cancel.from)
        .returningAll()
        .execute();
      for (const a of cancelled) outbox.push(transitionEvent(a));
    }
    const event = approval === 'approved' ? 'device_approved' : 'device_revoked';
    // Revoked: this one publication closes the device's connections, joined or not, on every node.
    outbox.push({ topic: Topics.device(device.id), event, payload: { device_id: device.id } });
    outbox.push({
      topic: Topics.operator(orgId),
      event,
      payload: { device_id: device.id, identifier: device.identifier },
    });
    return updated;
  });
}

/**
 * A certificate device speaks `protocol` from now on, if it may: it already does, or it was
 * registered just in time by the device listener and has never been seen online (the listener
 * records certificate devices as `phoenix` before it knows which endpoint they use). A device
 * another protocol has used keeps it; the refusal is audited and false returned. Both directions
 * go through here: a Phoenix device's certificate on the GRiSP socket, a board's on the Phoenix
 * socket. `ref.protocol` (read when the certificate was authenticated) answers the common case,
 * the device using its own protocol, without a statement.
 */
export async function claimCertificateDevice(
  ctx: FleetContext,
  ref: EdgeDeviceRef & { identifier: string; protocol?: DeviceProtocol },
  protocol: DeviceProtocol,
): Promise<boolean> {
  if (ref.protocol === protocol) return true;
  const claimed = await ctx.db
    .updateTable('devices')
    .set({ protocol })
    .where('id', '=', ref.deviceId)
    .where((eb) =>
      eb.or([eb('protocol', '=', protocol), eb.and([eb('protocol', '=', 'phoenix'), eb('last_seen_at', 'is', null)])]),
    )
    .returning('protocol')
    .executeTakeFirst();
  if (claimed) return true;
  const owner = await ctx.db.selectFrom('devices').select('protocol').where('id', '=', ref.deviceId).executeTakeFirst();
  await auditClaimRefused(ctx, {
    orgId: ref.orgId,
    protocol,
    identifier: ref.identifier,
    reason: 'registered_to_another_protocol',
    deviceId: ref.deviceId,
    ...(owner ? { owner: owner.protocol } : {}),
  });
  return false;
}

export interface EdgeOnlineInput {
  /**
   * The version the device runs: a semantic version, or any other label as the device reported it
   * (1-100 printable characters, e.g. a GRiSP `relvsn` such as `dev`; it matches no catalogue
   * firmware). null, or a value that is no such label, is recorded as unknown (null).
   */
  version: string | null;
  component?: string;
  /** Node holding the connection (default: this node). */
  node?: string;
  platform?: string | null;
  architecture?: string | null;
  /**
   * false: record the running version and presence only, leave in-flight attempts alone (GRiSP
   * before `validate`: the new image runs but is not committed yet). Default true.
   */
  settle?: boolean;
}

export interface EdgeOnlineOutcome {
  device: Device;
  /** What the device runs: the version (null: unknown), and its catalogue record's id (null when the catalogue has none). */
  running: { id: string | null; component: string; version: string | null };
  /** The firmware the device should update to, when it does not run its target (approved devices only). */
  target?: Firmware;
  /** The open attempt for `target` (queued/sent/begun/downloading), to mark sent when the edge sends. */
  attempt?: UpdateAttempt;
  /** When this connection was recorded; pass it to `edgeDeviceOffline`. */
  connectedAt: string;
}

/**
 * An edge device is connected here and runs `version`: records the running version on the device
 * (with the catalogue record of that version of its product when there is one; an unknown version
 * creates no firmware row), marks it online on this node, settles in-flight attempts (running the
 * target → succeeded; finished then on another version → rolled_back), reconciles attempts with
 * its target, and returns the target the device should update to. Pending devices are recorded
 * online but resolve no target; revoked devices are refused (`forbidden`).
 */
export async function edgeDeviceOnline(
  ctx: FleetContext,
  ref: EdgeDeviceRef,
  input: EdgeOnlineInput,
): Promise<EdgeOnlineOutcome> {
  const version = runningVersion(input.version);
  const component = input.component ?? 'firmware';
  const platform = reportedLabel('platform', input.platform);
  const architecture = reportedLabel('architecture', input.architecture);
  const connectedAt = new Date();
  return inTransaction(ctx, async (trx, outbox) => {
    const current = await trx
      .selectFrom('devices')
      .selectAll()
      .where('id', '=', ref.deviceId)
      .forUpdate()
      .executeTakeFirst();
    if (!current || current.org_id !== ref.orgId)
      throw new FleetError('not_found', 'this device is not registered', { device_id: ref.deviceId });
    if (current.approval === 'revoked')
      throw new FleetError('forbidden', 'this device is revoked; an operator must approve it again', {
        approval: current.approval,
      });

    const catalogued =
      version === null
        ? undefined
        : await catalogueFirmwareByVersion(trx, current.product_id, component, version, current.protocol);
    const running = { id: catalogued?.id ?? null, component, version };
    const device = await trx
      .updateTable('devices')
      .set({
        ...(component === 'firmware'
          ? {
              firmware_uuid: running.id,
              firmware_version: version,
              platform: catalogued?.platform ?? platform ?? current.platform,
              architecture: catalogued?.architecture ?? architecture ?? current.architecture,
            }
          : {}),
        connection_status: 'online',
        connected_node: input.node ?? ctx.nodeName,
        last_seen_at: connectedAt,
        updated_at: connectedAt,
      })
      .where('id', '=', current.id)
      .returningAll()
      .executeTakeFirstOrThrow();
    await recordRunningComponent(
      trx,
      ref,
      { component, version, firmwareId: running.id },
      { protocol: current.protocol },
    );
    outbox.push({
      topic: Topics.operator(current.org_id),
      event: 'device_status',
      payload: {
        device_id: current.id,
        status: 'online',
        version,
        node: input.node ?? ctx.nodeName,
        protocol: current.protocol,
        // A report over a connection already recorded (Main Server polls, GRiSP after validate): not a new connection.
        already_online:
          current.connection_status === 'online' && current.connected_node === (input.node ?? ctx.nodeName),
      },
    });

    if (current.approval !== 'approved' || input.settle === false)
      return { device, running, connectedAt: connectedAt.toISOString() };

    await settleAttemptsOnJoin(trx, ref, running.id, outbox, component);
    await reconcileAttempts(trx, { ids: [current.id] }, component);
    const attempt = await trx
      .selectFrom('update_attempts')
      .selectAll()
      .where('device_id', '=', current.id)
      .where('component', '=', component)
      .where('state', 'in', UNFINISHED_STATES)
      .orderBy('created_at', 'desc')
      .limit(1)
      .executeTakeFirst();
    if (!attempt || attempt.firmware_id === running.id)
      return { device, running, connectedAt: connectedAt.toISOString() };
    const target = await trx
      .selectFrom('firmware')
      .selectAll()
      .where('id', '=', attempt.firmware_id)
      .executeTakeFirstOrThrow();
    return { device, running, target, attempt, connectedAt: connectedAt.toISOString() };
  });
}

/**
 * The edge sent the update command for `firmware`: the device's open attempt for it becomes
 * `sent` (created when the device has none, e.g. a resend after an operator retry).
 */
export async function recordUpdateSent(
  ctx: FleetContext,
  ref: EdgeDeviceRef,
  firmware: Firmware,
  via: string,
): Promise<UpdateAttempt> {
  return inTransaction(ctx, async (trx, outbox) => {
    const device = await trx
      .selectFrom('devices')
      .select(['id', 'org_id', 'firmware_version', 'product_id'])
      .where('id', '=', ref.deviceId)
      .forUpdate()
      .executeTakeFirst();
    if (!device || device.org_id !== ref.orgId)
      throw new FleetError('not_found', 'this device is not registered', { device_id: ref.deviceId });
    const running =
      firmware.component === 'firmware'
        ? device.firmware_version
        : ((
            await trx
              .selectFrom('device_components')
              .select('version')
              .where('device_id', '=', device.id)
              .where('component', '=', firmware.component)
              .executeTakeFirst()
          )?.version ?? null);
    const open = await trx
      .selectFrom('update_attempts')
      .select('id')
      .where('device_id', '=', device.id)
      .where('firmware_id', '=', firmware.id)
      .where('state', 'in', TRANSITIONS.send.from)
      .orderBy('created_at', 'desc')
      .executeTakeFirst();
    // One open attempt per component: an update for other firmware in flight is not superseded here.
    const other =
      !open &&
      (await trx
        .selectFrom('update_attempts')
        .select(['to_version', 'state'])
        .where('device_id', '=', device.id)
        .where('component', '=', firmware.component)
        .where('state', 'in', OPEN_STATES)
        .executeTakeFirst());
    if (other)
      throw new FleetError(
        'conflict',
        `an update to ${other.to_version} is ${other.state} for this device; it must end before another is sent`,
        { state: other.state, version: other.to_version },
      );
    const attempt = open
      ? await trx
          .updateTable('update_attempts')
          .set({ state: 'sent', ...stepColumns('sent'), from_version: running, via })
          .where('id', '=', open.id)
          .returningAll()
          .executeTakeFirstOrThrow()
      : await trx
          .insertInto('update_attempts')
          .values({
            org_id: device.org_id,
            device_id: device.id,
            firmware_id: firmware.id,
            component: firmware.component,
            from_version: running,
            to_version: firmware.version,
            state: 'sent',
            via,
            sent_at: new Date(),
          })
          .returningAll()
          .executeTakeFirstOrThrow();
    outbox.push(transitionEvent(attempt));
    return attempt;
  });
}

/** The edge connection of a device ended on this node: offline unless a newer connection took over. */
export async function edgeDeviceOffline(
  ctx: FleetContext,
  deviceId: string,
  connectedAt?: string,
  reason?: string,
): Promise<boolean> {
  return deviceDisconnected(ctx, deviceId, connectedAt, reason);
}

/**
 * A reported running version as recorded: a semantic version, or any other label of 1-100
 * printable characters as the device reported it; anything else (null, empty, unprintable) is unknown (null).
 */
function runningVersion(version: string | null): string | null {
  if (typeof version !== 'string' || version === '') return null;
  if (semver.valid(version) !== null) return version;
  return version.length <= 100 && !/[\u0000-\u001f\u007f]/.test(version) ? version : null;
}

function validEdgeIdentifier(value: unknown): string {
  if (typeof value !== 'string' || value.length < 1 || value.length > 200 || /[\u0000-\u001f\u007f]/.test(value)) {
    throw new FleetError('invalid', 'a device identifier must be 1-200 printable characters', { field: 'identifier' });
  }
  return value;
}

/**
 * Marks an edge device online on this node before its version is known (e.g. a WiFiDogX gateway
 * that has not answered get_firmware_info yet, a pending device, a keyauth heartbeat). Returns the
 * connection time to pass to `edgeDeviceOffline`. A device that is gone is `not_found`, a revoked
 * one `forbidden`.
 */
export async function markEdgeDeviceConnected(ctx: FleetContext, ref: EdgeDeviceRef): Promise<string> {
  const connectedAt = new Date();
  await inTransaction(ctx, async (trx, outbox) => {
    const row = await trx
      .updateTable('devices')
      .set({
        connection_status: 'online',
        connected_node: ctx.nodeName,
        last_seen_at: connectedAt,
        updated_at: connectedAt,
      })
      .where('id', '=', ref.deviceId)
      .where('org_id', '=', ref.orgId)
      .where('approval', '<>', 'revoked')
      .returning(['id', 'protocol', 'approval'])
      .executeTakeFirst();
    if (!row) {
      const gone = !(await trx.selectFrom('devices').select('id').where('id', '=', ref.deviceId).executeTakeFirst());
      throw gone
        ? new FleetError('not_found', 'this device is not registered', { device_id: ref.deviceId })
        : new FleetError('forbidden', 'this device is revoked; an operator must approve it again', {
            approval: 'revoked',
          });
    }
    outbox.push({
      topic: Topics.operator(ref.orgId),
      event: 'device_status',
      payload: {
        device_id: row.id,
        status: 'online',
        node: ctx.nodeName,
        protocol: row.protocol,
        approval: row.approval,
      },
    });
  });
  return connectedAt.toISOString();
}
