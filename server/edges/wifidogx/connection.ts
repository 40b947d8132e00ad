/**
 * One WiFiDogX gateway's WebSocket. The gateway claims its `device_id` in its first message
 * (within `identifyTimeoutMs`); unknown ids are registered pending and get nothing until
 * approved; an approved gateway is served only on its credential (credentials.ts). Every frame
 * goes through one paced queue: one frame per write, never two back to back, never over
 * MAX_FRAME_BYTES.
 */
import type { Socket } from 'node:net';
import type { WebSocket } from 'ws';
import type { Firmware } from '../../db/schema.ts';
import type { FleetContext } from '../../fleet/index.ts';
import { currentUpdate, DeviceLink, openLink, type LinkEvent } from '../../fleet/device-link.ts';
import { auditClaimRefused, findOrRegisterEdgeDevice, type EdgeDeviceRef } from '../../fleet/edge-devices.ts';
import { findBadString } from '../../input-gate.ts';
import type { Logger } from '../../log.ts';
import { FleetError } from '../../fleet/errors.ts';
import type { Message } from '../../channels/types.ts';
import type { EdgeLink, EdgeRuntime } from '../runtime.ts';
import { admitClaim, CLOSE, credentialOwner, hasCredential, type WifidogxAuthPolicy } from './credentials.ts';
import { encodeFrame, gatewayReplies, gatewayVersion, isSafeFirmwareUrl } from './frames.ts';
import {
  commandForResponse,
  gatewaySettings,
  getCommand,
  isRecord,
  saveFirmwareInfo,
  saveReport,
  updateCommand,
} from './store.ts';

export interface WifidogxTimings {
  /** Offline after this long without a heartbeat (default 150 s; the gateway beats every 60 s). */
  livenessMs: number;
  /** Pause between two frames so the gateway reads them one at a time (default 100 ms). */
  frameGapMs: number;
  /** A connection that has not sent `connect` within this long is closed (default 10 s). */
  identifyTimeoutMs: number;
}

export interface WifidogxConnectionDeps {
  fleet: FleetContext;
  runtime: EdgeRuntime;
  log: Logger;
  timings: WifidogxTimings;
  autoApprove: boolean;
  policy: WifidogxAuthPolicy;
  /** The `credential` the upgrade request carried, if any. */
  credential: string | undefined;
  remote: string | null;
  /** Where unknown gateways are registered. */
  home(): Promise<{ orgId: string; productId: string }>;
  /** The safe, signed image URL of a firmware for one gateway (device id). */
  firmwareUrl(firmware: Firmware, deviceId: string): string;
  /** Claims `deviceId` for this connection; false when another live connection holds it. */
  claim(deviceId: string, conn: WifidogxConnection): Promise<boolean>;
  onClose(conn: WifidogxConnection): void;
}

const DEVICE_ID = /^[\x21-\x7e]{1,128}$/;

export class WifidogxConnection {
  ref: (EdgeDeviceRef & { identifier: string }) | undefined;
  approved = false;
  /** The link carried the gateway's own credential. */
  authenticated = false;
  readonly #ws: WebSocket;
  readonly #deps: WifidogxConnectionDeps;
  #log: Logger;
  #queue: Buffer[] = [];
  #writing = false;
  #closed = false;
  /** The gateway's connection on the edge runtime: step queue, timers, its topics, close. */
  readonly #edge: EdgeLink;
  /** The gateway's device link, once it is identified. */
  #link: DeviceLink | undefined;
  #reqN = 0;
  #upgrading: Firmware | undefined;
  /** Frames written, for tests and metrics. */
  framesSent = 0;
  readonly ignored = new Map<string, number>();

  constructor(ws: WebSocket, socket: Socket | undefined, deps: WifidogxConnectionDeps) {
    this.#ws = ws;
    this.#deps = deps;
    this.#log = deps.log;
    // Each frame leaves in its own segment as soon as it is written.
    socket?.setNoDelay(true);
    this.#edge = deps.runtime.open({
      edge: 'wifidogx',
      log: deps.log,
      transport: { close: (code, reason) => ws.close(code, reason) },
      revokedCode: CLOSE.revoked,
      handlers: {
        approved: () => this.becomeApproved(),
        retarget: () => this.recheckFirmware(),
        info: (message) => this.#onDeviceEvent(message),
        timer: async (key) => this.#onTimer(key),
        // After the step in flight (it may have just marked the gateway online).
        closed: async () => {
          if (this.ref) await this.#feed({ type: 'closed', reason: 'socket closed' });
        },
      },
    });
  }

  /** Events on the gateway's topic beyond what the runtime handles (revocation, approval, targets). */
  async #onDeviceEvent(message: Message): Promise<void> {
    switch (message.event) {
      case 'wifidogx_release':
        return this.close(CLOSE.revoked, message.event);
      case 'wifidogx_credential_issued':
        // The link on the old credential (or on none) ends; the gateway comes back on the new one.
        return this.close(CLOSE.credential, 'credential issued: reconnect with it');
      case 'wifidogx_command':
        if (typeof message.payload.command_id === 'string') await this.runCommand(message.payload.command_id);
        return;
    }
  }

  #onTimer(key: string): void {
    if (key === 'liveness') {
      this.#log.info('no heartbeat from the wifidogx gateway; closing its link');
      this.#ws.terminate();
      return;
    }
    if (key === 'identify' && !this.ref) {
      const seconds = Math.ceil(this.#deps.timings.identifyTimeoutMs / 1000);
      this.#log.info({ remote: this.#deps.remote }, 'wifidogx connection sent no connect in time; closing it');
      this.close(CLOSE.identifyTimeout, `send connect within ${seconds} s`);
    }
  }

  start(): void {
    this.#ws.on('message', (data, isBinary) => {
      if (isBinary) return this.#count('binary');
      const text = data.toString();
      this.#enqueue(() => this.#onText(text));
    });
    this.#ws.on('close', () => this.#onClose());
    this.#ws.on('error', (err) => this.#log.warn({ err }, 'wifidogx socket error'));
    this.#armLiveness();
    this.#edge.schedule('identify', this.#deps.timings.identifyTimeoutMs);
  }

  /** The close effect: ends the link with `code` and `reason`. */
  close(code = 1000, reason = ''): void {
    this.#edge.close(code, reason);
  }

  #enqueue(step: () => Promise<void>): Promise<void> {
    return this.#edge.step(step);
  }

  /** Runs `step` in this connection's order (commands from operators, target changes). */
  run(step: () => Promise<void>): Promise<void> {
    return this.#enqueue(step);
  }

  // --- writing ------------------------------------------------------------------------------------

  /** Queues one message; false (and a logged error) when it cannot fit in a frame the gateway can read. */
  send(message: Record<string, unknown>): boolean {
    const frame = encodeFrame(message);
    if (!frame) {
      this.#log.error(
        { type: message.type, bytes: JSON.stringify(message).length },
        'wifidogx message refused: its frame would exceed what the gateway can read (1000 bytes)',
      );
      return false;
    }
    this.#queueFrame(frame);
    return true;
  }

  #queueFrame(frame: Buffer): void {
    this.#queue.push(frame);
    this.#pump();
  }

  #pump(): void {
    if (this.#writing || this.#closed) return;
    const frame = this.#queue.shift();
    if (!frame) return;
    this.#writing = true;
    // Text frame, never fragmented, never compressed; the next one waits for this write plus a gap.
    this.#ws.send(frame, { binary: false, compress: false, fin: true }, () => {
      this.framesSent++;
      setTimeout(() => {
        this.#writing = false;
        this.#pump();
      }, this.#deps.timings.frameGapMs).unref();
    });
  }

  #reqId(): string {
    return `fh-${Date.now().toString(36)}-${++this.#reqN}`;
  }

  /** `{type, op, req_id, ...fields}`: old firmware reads `type`, new reads `op` and echoes `req_id`. */
  message(type: string, fields: Record<string, unknown> = {}, reqId = this.#reqId()): Record<string, unknown> {
    return { type, op: type, req_id: reqId, ...fields };
  }

  // --- reading ------------------------------------------------------------------------------------

  async #onText(text: string): Promise<void> {
    let m: unknown;
    try {
      m = JSON.parse(text);
    } catch {
      this.#log.warn('wifidogx message is not JSON; ignored');
      return this.#count('invalid_json');
    }
    if (!isRecord(m)) return this.#count('not_an_object');
    // The gateway's only error channel is the close frame: name the field there (reason ≤ 123 bytes).
    const bad = findBadString(m, '');
    if (bad) {
      this.#log.warn({ field: bad.path, problem: bad.problem }, 'wifidogx message refused: invalid string; closing');
      let reason = `invalid string in ${bad.path}`;
      while (Buffer.byteLength(reason) > 123) reason = reason.slice(0, -1);
      this.close(4000, reason);
      return this.#count('invalid_string');
    }
    const type = typeof m.type === 'string' ? m.type : typeof m.op === 'string' ? m.op : undefined;
    if (!type) return this.#count('no_type');
    if (!this.ref) {
      if (type !== 'connect' && type !== 'heartbeat') return this.#count(`before_connect:${type}`);
      if (!(await this.#identify(m))) return;
    }
    switch (type) {
      case 'connect':
      case 'heartbeat':
        return this.#onReport(type, m);
      case 'firmware_info_response':
        return this.#onFirmwareInfo(m);
      case 'firmware_info_error':
        await this.#complete('get_firmware_info', m, 'failed');
        return;
      case 'firmware_upgrade_response':
        return this.#onUpgradeResponse(m);
      case 'firmware_upgrade_error':
        return this.#onUpgradeError(m);
      case 'kickoff_response':
        await this.#complete('kickoff', m, m.status === 'success' ? 'succeeded' : 'failed');
        return;
      case 'kickoff_error':
        await this.#complete('kickoff', m, 'failed');
        return;
      default:
        this.#log.info({ type }, 'unknown wifidogx message type; ignored');
        return this.#count(`unknown:${type}`);
    }
  }

  /**
   * The first message names the device. In order: a presented credential must be the claimed
   * gateway's; the identifier must belong to a WiFiDogX device (fleet rule, audited there);
   * the admission rule (credentials.ts); the takeover rule (claim). Nothing about the device
   * changes before the claim is admitted.
   */
  async #identify(m: Record<string, unknown>): Promise<boolean> {
    const deviceId = m.device_id;
    if (typeof deviceId !== 'string' || !DEVICE_ID.test(deviceId)) {
      this.#log.warn('wifidogx connect without a valid device_id; closing');
      this.close(CLOSE.deviceIdRequired, 'device_id required');
      return false;
    }
    const { fleet } = this.#deps;
    const home = await this.#deps.home();
    const refuse = async (code: number, reason: string, audit: string, device?: { id: string }) => {
      this.#log.warn({ identifier: deviceId, remote: this.#deps.remote, why: audit }, 'wifidogx claim refused');
      await auditClaimRefused(fleet, {
        orgId: home.orgId,
        protocol: 'wifidogx',
        identifier: deviceId,
        reason: audit,
        ...(device ? { deviceId: device.id } : {}),
        remote: this.#deps.remote,
      });
      this.close(code, reason);
      return false;
    };
    const presented = this.#deps.credential;
    const owner = presented === undefined ? undefined : await credentialOwner(fleet.db, presented);
    if (presented !== undefined && owner?.identifier !== deviceId)
      return refuse(CLOSE.credential, 'credential invalid for this device_id', 'credential_invalid');

    let found: Awaited<ReturnType<typeof findOrRegisterEdgeDevice>>;
    try {
      found = await findOrRegisterEdgeDevice(fleet, {
        ...home,
        identifier: deviceId,
        protocol: 'wifidogx',
        approval: this.#deps.autoApprove ? 'approved' : 'pending',
      });
    } catch (err) {
      if (!(err instanceof FleetError) || err.code !== 'conflict') throw err;
      this.#log.warn(
        { identifier: deviceId, remote: this.#deps.remote },
        'wifidogx claim of an identifier another protocol owns; refused',
      );
      this.close(CLOSE.otherProtocol, 'device_id is registered to another kind of device');
      return false;
    }
    const { device, created } = found;
    this.#log = this.#deps.log.child({ device_id: device.id, identifier: deviceId });
    const authenticated = owner?.deviceId === device.id;
    const verdict = admitClaim({
      approval: device.approval,
      credentialIssued: authenticated || (await hasCredential(fleet.db, device.id)),
      authenticated,
      policy: this.#deps.policy,
    });
    if (!verdict.admit) return refuse(verdict.code, verdict.reason, verdict.audit, device);
    this.authenticated = authenticated;
    if (!(await this.#deps.claim(device.id, this))) {
      // Takeover rule: an approved device connected elsewhere keeps its link until an operator releases it.
      this.#log.warn(
        'wifidogx device_id is already connected elsewhere; refusing this claim (operator: release the device to let it move)',
      );
      this.close(CLOSE.connectedElsewhere, 'device_id connected elsewhere');
      return false;
    }
    this.#edge.cancel('identify');
    this.ref = { deviceId: device.id, orgId: device.org_id, identifier: deviceId };
    await this.#edge.attach({ deviceId: device.id, orgId: device.org_id });
    this.approved = device.approval === 'approved';
    if (created) this.#log.info({ approval: device.approval }, 'wifidogx gateway registered');
    this.#link = new DeviceLink(
      fleet,
      openLink({ deviceId: device.id, orgId: device.org_id, protocol: 'wifidogx' }),
      this.#log,
    );
    // Online before its version is known: the version comes with get_firmware_info.
    await this.#feed({ type: 'connected', running: {} });
    return true;
  }

  #feed(event: LinkEvent): ReturnType<DeviceLink['feed']> {
    return this.#link ? this.#link.feed(event) : Promise.resolve(undefined);
  }

  async #onReport(type: 'connect' | 'heartbeat', m: Record<string, unknown>): Promise<void> {
    const ref = this.ref!;
    this.#armLiveness();
    await saveReport(this.#deps.fleet.db, ref.deviceId, m, true);
    // Pending devices get nothing at all, not even their gateway settings.
    if (!this.approved) return;
    await this.pushGatewaySettings(type, typeof m.req_id === 'string' ? m.req_id : undefined, m.gateway);
    if (type === 'connect') this.send(this.message('get_firmware_info'));
  }

  /** Sends `{type, gateway:[{gw_id, auth_mode}]}` in as many frames as it takes. */
  async pushGatewaySettings(type: string, reqId?: string, reported?: unknown): Promise<void> {
    const settings = await gatewaySettings(this.#deps.fleet.db, this.ref!.deviceId, reported);
    const { frames, dropped } = gatewayReplies(type, reqId ?? this.#reqId(), settings);
    // The gateway reported the oversize gw_ids itself: its problem, not the server's.
    if (dropped.length)
      this.#log.warn({ gateways: dropped }, 'gateway entries too large for a frame were left out of the reply');
    for (const f of frames) this.#queueFrame(f);
  }

  /** Called when an operator approves this (pending) device. */
  async becomeApproved(): Promise<void> {
    if (this.approved || !this.ref) return;
    if (!this.authenticated && this.#deps.policy === 'secure') {
      // Approved gateways are served on their credential: this link carried none.
      this.close(
        CLOSE.credential,
        'approved: reconnect with your credential (WSServerPath /ws/wifidogx?credential=...)',
      );
      return;
    }
    this.approved = true;
    await this.pushGatewaySettings('connect');
    this.send(this.message('get_firmware_info'));
  }

  async #onFirmwareInfo(m: Record<string, unknown>): Promise<void> {
    const ref = this.ref!;
    const data = isRecord(m.data) ? m.data : {};
    await saveFirmwareInfo(this.#deps.fleet.db, ref.deviceId, data);
    await this.#complete('get_firmware_info', m, 'succeeded');
    const version = gatewayVersion(data);
    if (!version) {
      this.#log.warn(
        { release: data.DISTRIB_RELEASE },
        'the gateway reports no usable firmware version; it cannot be updated',
      );
      return;
    }
    if (!this.approved) return;
    const online = await this.#feed({
      type: 'connected',
      running: { version, platform: typeof data.DISTRIB_TARGET === 'string' ? data.DISTRIB_TARGET : null },
    });
    await this.#edge.apply(online?.effects, { pushUpdate: ({ firmware }) => this.#upgrade(firmware) });
  }

  /** Sends firmware_upgrade for `target`, after checking the URL is shell-safe. */
  async #upgrade(target: Firmware): Promise<void> {
    // Already sent on this connection and not answered yet: a `connected` from the next
    // get_firmware_info answer must not start sysupgrade a second time.
    if (this.#upgrading?.id === target.id) return;
    const ref = this.ref!;
    const url = target.has_blob ? this.#deps.firmwareUrl(target, ref.deviceId) : '';
    if (!isSafeFirmwareUrl(url)) {
      this.#log.error(
        { firmware_id: target.id },
        'refusing to send firmware_upgrade: the URL is not made of safe characters or is too long',
      );
      await this.#feed({
        type: 'report',
        kind: 'error',
        firmwareId: target.id,
        errors: ['the firmware URL is not shell-safe (or over 500 characters); not sent'],
        reason: 'unsafe firmware URL',
      });
      return;
    }
    if (!this.send(this.message('firmware_upgrade', { url, force: false }))) {
      await this.#feed({
        type: 'report',
        kind: 'error',
        firmwareId: target.id,
        errors: ['firmware_upgrade does not fit in a frame the gateway can read'],
        reason: 'frame too large',
      });
      return;
    }
    this.#upgrading = target;
    await this.#feed({ type: 'update_sent', firmware: target, via: 'edge:wifidogx' });
  }

  /** The upgrade in flight (sent, begun or downloading): the one this link sent, or the fleet's. */
  async #openUpgrade(): Promise<Firmware | undefined> {
    if (this.#upgrading) return this.#upgrading;
    const current = this.#link && (await currentUpdate(this.#deps.fleet, this.#link.session));
    if (!current || current.attempt.state === 'queued' || current.attempt.state === 'finished') return undefined;
    return current.firmware;
  }

  async #onUpgradeResponse(m: Record<string, unknown>): Promise<void> {
    const operatorCommand = await this.#complete(
      'firmware_upgrade',
      m,
      m.status === 'success' ? 'succeeded' : 'failed',
    );
    if (operatorCommand) return;
    const target = await this.#openUpgrade();
    if (!target) return this.#count('upgrade_response_without_update');
    if (m.status !== 'success') return this.#onUpgradeError({ error: m.message ?? 'firmware upgrade refused' });
    // sysupgrade runs and the gateway reboots: the outcome is decided when it reports its version again.
    await this.#feed({ type: 'report', kind: 'finished', version: target.version, begins: true });
    this.#upgrading = undefined;
  }

  async #onUpgradeError(m: Record<string, unknown>): Promise<void> {
    const operatorCommand = await this.#complete('firmware_upgrade', m, 'failed');
    if (operatorCommand) return;
    const target = await this.#openUpgrade();
    if (!target) return this.#count('upgrade_error_without_update');
    this.#upgrading = undefined;
    await this.#feed({
      type: 'report',
      kind: 'error',
      version: target.version,
      errors: [String(m.error ?? 'firmware upgrade failed').slice(0, 2000)],
    });
  }

  /** Records a device response on the operator command it answers; returns whether there was one. */
  async #complete(type: string, m: Record<string, unknown>, status: 'succeeded' | 'failed'): Promise<boolean> {
    const command = await commandForResponse(this.#deps.fleet.db, this.ref!.deviceId, type, m.req_id);
    if (!command) return false;
    await updateCommand(this.#deps.fleet.db, command.id, {
      status,
      response: m,
      ...(status === 'failed' ? { error: String(m.error ?? m.message ?? 'failed') } : {}),
    });
    return true;
  }

  /** Sends an operator's command (recorded by the REST route) if this gateway may receive it. */
  async runCommand(commandId: string): Promise<void> {
    const db = this.#deps.fleet.db;
    const command = await getCommand(db, commandId);
    if (command?.status !== 'queued') return;
    if (!this.approved)
      return updateCommand(db, command.id, { status: 'refused', error: 'the device is pending approval' });
    if (command.type === 'firmware_upgrade' && !isSafeFirmwareUrl(command.payload.url)) {
      this.#log.error({ command_id: command.id }, 'refusing firmware_upgrade with an unsafe URL');
      return updateCommand(db, command.id, {
        status: 'refused',
        error: 'the URL is not shell-safe or is over 500 characters',
      });
    }
    if (command.type === 'set_auth_mode') {
      await this.pushGatewaySettings('heartbeat');
      return updateCommand(db, command.id, { status: 'delivered' });
    }
    if (!this.send(this.message(command.type, command.payload, command.req_id))) {
      return updateCommand(db, command.id, {
        status: 'refused',
        error: 'the command does not fit in a frame the gateway can read (1000 bytes)',
      });
    }
    // auth and tmp_pass have no response in the protocol.
    await updateCommand(db, command.id, {
      status: command.type === 'auth' || command.type === 'tmp_pass' ? 'delivered' : 'sent',
    });
  }

  /** A target change concerns this gateway: ask for its firmware info (the answer triggers the upgrade). */
  async recheckFirmware(): Promise<void> {
    if (this.approved) this.send(this.message('get_firmware_info'));
  }

  /** Offline after `livenessMs` without a report (a closed link has no timers any more). */
  #armLiveness(): void {
    this.#edge.schedule('liveness', this.#deps.timings.livenessMs);
  }

  #count(what: string): void {
    this.ignored.set(what, (this.ignored.get(what) ?? 0) + 1);
  }

  #onClose(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#queue = [];
    this.#deps.onClose(this);
    this.#edge.transportClosed();
  }
}
