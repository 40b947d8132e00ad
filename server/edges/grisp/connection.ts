/**
 * One GRiSP board's link: JSON-RPC in both directions over one WebSocket. The connection
 * translates; the fleet decides (edge-devices.ts, updates.ts). It runs on the edge runtime
 * (../runtime.ts): work that touches the fleet runs one step at a time per board, so update events
 * are applied in order; the runtime delivers revocation, approval and new targets from PubSub.
 */
import type { WebSocket } from 'ws';
import type { Firmware } from '../../db/schema.ts';
import { applyUpdateReport, FleetError, type FleetContext, type UpdateReportEvent } from '../../fleet/index.ts';
import {
  edgeDeviceOffline,
  edgeDeviceOnline,
  recordUpdateSent,
  transitionAttempt,
  type EdgeDeviceRef,
} from '../../fleet/edge-devices.ts';
import type { Logger } from '../../log.ts';
import type { EdgeLink, EdgeRuntime } from '../runtime.ts';
import {
  decodeFrame,
  encodeError,
  encodeNotification,
  encodeRequest,
  encodeResult,
  paramsObject,
  RpcError,
  RpcErrors,
  type Incoming,
  type RpcId,
} from './jsonrpc.ts';
import { isLinked, linkDevice, parseLogBatch, saveGrispState, storeLogBatch } from './store.ts';

/** Device error codes of grisp_connect (matched by code, never by text). */
export const DeviceErrors = {
  updaterUnavailable: -10,
  alreadyUpdating: -11,
  bootSystemNotValidated: -12,
  validateFromUnbooted: -13,
} as const;

export interface GrispTimings {
  /** WebSocket ping period; the board drops the link after 60 s without one (default 25 s). */
  pingIntervalMs: number;
  /** How long a request to the board may take (default 5 s). */
  requestTimeoutMs: number;
  /** How often the board's log buffer is fetched (default 60 s; 0 disables). */
  logIntervalMs: number;
  logMaxBatchSize: number;
  logMaxByteSize: number;
}

export const DEFAULT_TIMINGS: GrispTimings = {
  pingIntervalMs: 25_000,
  requestTimeoutMs: 5_000,
  logIntervalMs: 60_000,
  logMaxBatchSize: 100,
  logMaxByteSize: 32 * 1024,
};

/** What the health check before `validate` sees. */
export interface HealthInput {
  deviceId: string;
  systemInfo: SystemInfo;
  /** The version the open update installs, when there is one. */
  expectedVersion?: string;
}

/** true, or why the board is not healthy (it is then rebooted back to its previous image). */
export type HealthCheck = (input: HealthInput) => Promise<true | string>;

export interface SystemInfo {
  relname: string | null;
  relvsn: string | null;
  update_status?: string;
  update_message?: string;
  action_required?: string | null;
  hardware?: { serial?: string } & Record<string, unknown>;
  [key: string]: unknown;
}

export interface GrispConnectionDeps {
  fleet: FleetContext;
  runtime: EdgeRuntime;
  log: Logger;
  timings: GrispTimings;
  healthCheck: HealthCheck;
  /** The signed package URL for a firmware (the board appends `/MANIFEST.sealed` and block paths). */
  packageUrl(firmware: Firmware): string;
  /** Called when the connection ends. */
  onClose(conn: GrispConnection): void;
}

export interface GrispIdentity extends EdgeDeviceRef {
  productId: string;
  identifier: string;
  /** The certificate the board authenticated with: only its revocation ends the link. */
  certificateId?: string;
}

interface Pending {
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

/** The serial in a GRiSP certificate CN (`GRiSP2 device <serial>`), or the whole CN. */
export function serialFromCommonName(cn: string): string {
  return /device\s+(\S+)\s*$/i.exec(cn)?.[1] ?? cn;
}

/** The default health check: the board connected, runs a named release with a semantic version, and (during an update) the version it was sent. */
export const defaultHealthCheck: HealthCheck = async ({ systemInfo, expectedVersion }) => {
  if (typeof systemInfo.relname !== 'string' || !systemInfo.relname) return 'system_info has no release name';
  if (typeof systemInfo.relvsn !== 'string' || !systemInfo.relvsn) return 'system_info has no release version';
  if (expectedVersion && systemInfo.relvsn !== expectedVersion)
    return `the board runs ${systemInfo.relvsn}, not the installed ${expectedVersion}`;
  return true;
};

export class GrispConnection {
  readonly ref: GrispIdentity;
  readonly #ws: WebSocket;
  readonly #deps: GrispConnectionDeps;
  readonly #log: Logger;
  readonly #pending = new Map<string, Pending>();
  readonly #link: EdgeLink;
  #pinger: NodeJS.Timeout | undefined;
  #nextId = 1;
  #closed = false;
  #connectedAt: string | undefined;
  /** The update this link started (or found running), by firmware. */
  #updating: { firmware: Firmware; begun: boolean } | undefined;
  /** Counters of what the board sent that we ignore (unknown notifications). */
  readonly ignored = new Map<string, number>();

  constructor(ws: WebSocket, ref: GrispIdentity, deps: GrispConnectionDeps) {
    this.#ws = ws;
    this.ref = ref;
    this.#deps = deps;
    this.#log = deps.log.child({ device_id: ref.deviceId, identifier: ref.identifier });
    this.#link = deps.runtime.open({
      edge: 'grisp',
      log: this.#log,
      transport: { close: (code, reason) => ws.close(code, reason) },
      // The board answering with an error, or reporting what the fleet refuses, is its problem (warn).
      devicesFault: (err) => err instanceof RpcError || err instanceof FleetError,
      handlers: {
        retarget: () => this.refresh(),
        approved: () => this.refresh(),
        timer: async (key) => {
          if (key !== 'logs') return;
          await this.fetchLogs();
          this.#link.schedule('logs', this.#deps.timings.logIntervalMs);
        },
        // After the step in flight (it may have just marked the board online).
        closed: async () => {
          await edgeDeviceOffline(this.#deps.fleet, this.ref.deviceId, this.#connectedAt);
        },
      },
    });
  }

  get deviceId(): string {
    return this.ref.deviceId;
  }

  /** Starts pings, log polling and the first system_info round. */
  start(): void {
    const { timings } = this.#deps;
    this.#ws.on('message', (data, isBinary) => this.#onFrame(isBinary ? '' : data.toString()));
    this.#ws.on('close', () => this.#onClose());
    this.#ws.on('error', (err) => this.#log.warn({ err }, 'grisp socket error'));
    // The keepalive is the transport's: it must not wait behind a step (a slow start_update).
    this.#pinger = setInterval(() => this.#ws.ping(), timings.pingIntervalMs);
    this.#ws.ping();
    if (timings.logIntervalMs > 0) this.#link.schedule('logs', timings.logIntervalMs);
    this.enqueue(async () => {
      await this.#link.attach({
        deviceId: this.ref.deviceId,
        orgId: this.ref.orgId,
        ...(this.ref.certificateId ? { certificateId: this.ref.certificateId } : {}),
      });
      await saveGrispState(this.#deps.fleet.db, this.ref.deviceId, {
        serial: serialFromCommonName(this.ref.identifier),
      });
      await this.refresh();
    });
  }

  /** Runs `step` after every step queued before it; failures are logged, the link stays. */
  enqueue(step: () => Promise<void>): Promise<void> {
    return this.#link.step(step);
  }

  /** The close effect: ends the link with `code` and `reason`. */
  close(code = 1000, reason = ''): void {
    this.#link.close(code, reason);
  }

  // --- outgoing requests ------------------------------------------------------------------------

  /** A request to the board; rejects with RpcError (the board's error) or after the request timeout. */
  request(method: string, params?: Record<string, unknown>): Promise<unknown> {
    const id = `fh-${this.#nextId++}`;
    return new Promise((resolve, reject) => {
      if (this.#closed) return reject(new Error('the board disconnected'));
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new RpcTimeout(method, this.#deps.timings.requestTimeoutMs));
      }, this.#deps.timings.requestTimeoutMs);
      this.#pending.set(id, { resolve, reject, timer });
      this.#send(encodeRequest(id, method, params));
    });
  }

  notify(method: string, params?: Record<string, unknown>): void {
    this.#send(encodeNotification(method, params));
  }

  #send(message: unknown): void {
    if (this.#closed) return;
    this.#ws.send(JSON.stringify(message));
  }

  // --- the update flow ---------------------------------------------------------------------------

  /** Reads system_info, records it, and does what the board's state asks for (validate, reboot, update). */
  async refresh(): Promise<void> {
    const info = (await this.request('get', { type: 'system_info' })) as SystemInfo;
    if (typeof info !== 'object' || info === null)
      throw new Error('system_info answered something else than an object');
    await saveGrispState(this.#deps.fleet.db, this.ref.deviceId, {
      relname: str(info.relname),
      relvsn: str(info.relvsn),
      update_status: str(info.update_status),
      update_message: str(info.update_message),
      action_required: str(info.action_required),
      hardware_serial: str(info.hardware?.serial),
      system_info: info,
    });
    if (typeof info.relvsn !== 'string') {
      this.#log.warn(
        { relvsn: info.relvsn },
        'the board reports no release version; it cannot be updated until it does',
      );
      return;
    }
    const action = info.action_required ?? null;
    const pendingCommit = action === 'validate' || action === 'reboot' || action === 'remove_sdcard_and_reboot';
    const online = await edgeDeviceOnline(this.#deps.fleet, this.ref, { version: info.relvsn, settle: !pendingCommit });
    this.#connectedAt = online.connectedAt;
    if (action === 'validate') {
      await this.#validate(info);
      return;
    }
    if (action === 'reboot') {
      this.#log.info('the board installed an update and waits for a reboot');
      await this.#reboot();
      return;
    }
    if (action === 'remove_sdcard_and_reboot') {
      this.#log.warn('the board booted from its SD card: someone must remove it and reboot the board');
      return;
    }
    if (online.target && info.update_status !== 'updating') await this.#startUpdate(online.target);
  }

  async #startUpdate(target: Firmware, retried = false): Promise<void> {
    const fleet = this.#deps.fleet;
    if (!target.has_blob || target.format !== 'grisp') {
      await transitionAttempt(fleet, this.ref, {
        to: 'failed',
        firmwareId: target.id,
        errors: [
          `firmware ${target.version} is not a GRiSP package (format ${target.format}); upload it with POST /api/v1/grisp/firmware`,
        ],
      });
      return;
    }
    await recordUpdateSent(fleet, this.ref, target, 'edge:grisp');
    this.#updating = { firmware: target, begun: false };
    try {
      await this.request('post', { type: 'start_update', url: this.#deps.packageUrl(target) });
      this.#log.info({ version: target.version }, 'update started');
    } catch (err) {
      const code = err instanceof RpcError ? err.code : undefined;
      if (code === DeviceErrors.alreadyUpdating) {
        this.#log.warn('the board is already updating; waiting for its update events');
        return;
      }
      if (code === DeviceErrors.bootSystemNotValidated && !retried) {
        // The board runs an image nobody validated yet: validate it first, then try again once.
        const info = (await this.request('get', { type: 'system_info' })) as SystemInfo;
        if (await this.#validate(info, { retryUpdate: false })) await this.#startUpdate(target, true);
        return;
      }
      this.#updating = undefined;
      const why =
        err instanceof RpcError
          ? `start_update: ${err.message} (${err.code})`
          : `start_update: ${(err as Error).message}`;
      await transitionAttempt(fleet, this.ref, { to: 'failed', firmwareId: target.id, errors: [why] });
    }
  }

  /** Health check, then `post validate` (or a reboot back to the previous image). Returns whether the board validated. */
  async #validate(info: SystemInfo, o: { retryUpdate?: boolean } = {}): Promise<boolean> {
    const fleet = this.#deps.fleet;
    const open = await fleet.db
      .selectFrom('update_attempts')
      .select(['to_version', 'firmware_id'])
      .where('device_id', '=', this.ref.deviceId)
      .where('state', '=', 'finished')
      .orderBy('created_at', 'desc')
      .executeTakeFirst();
    const verdict = await this.#deps
      .healthCheck({
        deviceId: this.ref.deviceId,
        systemInfo: info,
        ...(open ? { expectedVersion: open.to_version } : {}),
      })
      .catch((err: Error) => `health check failed: ${err.message}`);
    if (verdict !== true) {
      this.#log.warn(
        { reason: verdict },
        'the new image is not healthy: not validating it, rebooting back to the previous one',
      );
      await transitionAttempt(fleet, this.ref, {
        to: 'failed',
        errors: [`health check: ${verdict}`],
        reason: 'health check failed',
      });
      await this.#reboot();
      return false;
    }
    try {
      await this.request('post', { type: 'validate' });
    } catch (err) {
      const code = err instanceof RpcError ? err.code : undefined;
      const why =
        code === DeviceErrors.validateFromUnbooted
          ? 'validate_from_unbooted (-13): the booted partition is not the updated one'
          : code === DeviceErrors.updaterUnavailable
            ? 'grisp_updater_unavailable (-10)'
            : `validate: ${(err as Error).message}`;
      this.#log.warn({ code }, why);
      await transitionAttempt(fleet, this.ref, { to: 'failed', errors: [why] });
      return false;
    }
    this.#log.info({ version: info.relvsn }, 'validated the running image');
    await saveGrispState(fleet.db, this.ref.deviceId, { action_required: null });
    const online = await edgeDeviceOnline(fleet, this.ref, { version: String(info.relvsn), settle: true });
    this.#connectedAt = online.connectedAt;
    if (online.target && o.retryUpdate !== false) await this.#startUpdate(online.target);
    return true;
  }

  /** The `update` notification: software_update_event progress | warning | error | done. */
  async #onUpdateEvent(params: Record<string, unknown>): Promise<void> {
    const event = params.event ?? params.event_type;
    const fleet = this.#deps.fleet;
    const updating = this.#updating ?? (await this.#openUpdate());
    if (!updating) {
      this.#log.warn({ event }, 'update event without an update in progress');
      return;
    }
    const version = updating.firmware.version;
    const report = async (name: UpdateReportEvent, payload: Record<string, unknown>) =>
      applyUpdateReport(fleet, this.ref, name, { version, ...payload });
    const ensureBegun = async () => {
      if (updating.begun) return;
      const attempt = await fleet.db
        .selectFrom('update_attempts')
        .select('state')
        .where('device_id', '=', this.ref.deviceId)
        .where('firmware_id', '=', updating.firmware.id)
        .orderBy('created_at', 'desc')
        .executeTakeFirst();
      if (attempt && (attempt.state === 'sent' || attempt.state === 'queued'))
        await report('firmware_update_begin', {});
      updating.begun = true;
    };
    switch (event) {
      case 'progress': {
        await ensureBegun();
        const percent = Math.max(0, Math.min(100, Math.round(Number(params.percentage ?? 0)) || 0));
        await report('firmware_update_progress', { percent, bytes: 0, total: 0 });
        return;
      }
      case 'warning':
        this.#log.warn({ message: params.message, reason: params.reason }, 'board update warning');
        await saveGrispState(fleet.db, this.ref.deviceId, { update_message: describe(params) });
        return;
      case 'error':
        this.#updating = undefined;
        await report('firmware_update_error', { errors: [describe(params)] });
        return;
      case 'done':
        await ensureBegun();
        await report('firmware_update_finish', {});
        this.#updating = undefined;
        // The new image is written: boot it. The board comes back with action_required=validate.
        await this.#reboot();
        return;
      default:
        this.#count(`update:${String(event)}`);
    }
  }

  async #openUpdate(): Promise<{ firmware: Firmware; begun: boolean } | undefined> {
    const row = await this.#deps.fleet.db
      .selectFrom('update_attempts')
      .innerJoin('firmware', 'firmware.id', 'update_attempts.firmware_id')
      .selectAll('firmware')
      .select('update_attempts.state as attempt_state')
      .where('update_attempts.device_id', '=', this.ref.deviceId)
      .where('update_attempts.state', 'in', ['sent', 'begun', 'downloading'])
      .orderBy('update_attempts.created_at', 'desc')
      .executeTakeFirst();
    if (!row) return undefined;
    const { attempt_state, ...firmware } = row;
    this.#updating = { firmware: firmware as Firmware, begun: attempt_state !== 'sent' };
    return this.#updating;
  }

  /** `post reboot`; the board may drop the link before its answer arrives, which is fine. */
  async #reboot(): Promise<void> {
    try {
      await this.request('post', { type: 'reboot' });
    } catch (err) {
      if (!this.#closed) throw err;
    }
  }

  /** `log.get` until the board has nothing more (bounded), storing each batch then acknowledging it with `log.sync`. */
  async fetchLogs(): Promise<number> {
    const { timings, fleet } = this.#deps;
    let stored = 0;
    for (let round = 0; round < 10; round++) {
      const result = await this.request('log.get', {
        max_batch_size: timings.logMaxBatchSize,
        max_byte_size: timings.logMaxByteSize,
      });
      const batch = parseLogBatch(result);
      if ('error' in batch) {
        this.#log.warn({ reason: batch.error }, 'log.get answered an invalid batch; not acknowledging it');
        return stored;
      }
      if (batch.events.length === 0 && batch.dropped === 0) return stored;
      await storeLogBatch(fleet.db, this.ref.deviceId, batch.events, batch.dropped);
      stored += batch.events.length;
      const seq = batch.events.length ? batch.events[batch.events.length - 1]!.seq : undefined;
      const state =
        seq === undefined
          ? await fleet.db
              .selectFrom('grisp_devices')
              .select('log_seq')
              .where('device_id', '=', this.ref.deviceId)
              .executeTakeFirst()
          : undefined;
      this.notify('log.sync', { seq: seq ?? Number(state?.log_seq ?? 0), dropped: batch.dropped });
      if (batch.events.length < timings.logMaxBatchSize) return stored;
    }
    return stored;
  }

  // --- incoming frames ---------------------------------------------------------------------------

  #onFrame(text: string): void {
    const decoded = decodeFrame(text);
    if (decoded.parseError) {
      this.#send(encodeError(null, RpcErrors.parse));
      return;
    }
    void Promise.all(decoded.messages.map((m) => this.#onMessage(m))).then((replies) => {
      const out = replies.filter((r): r is Record<string, unknown> => r !== undefined);
      if (out.length === 0) return;
      this.#send(decoded.batch ? out : out[0]);
    });
  }

  /** One message; resolves to the reply to send (requests and invalid messages only). */
  async #onMessage(m: Incoming): Promise<Record<string, unknown> | undefined> {
    switch (m.kind) {
      case 'invalid':
        return encodeError(m.id, m.error);
      case 'result':
      case 'error': {
        const pending = typeof m.id === 'string' ? this.#pending.get(m.id) : undefined;
        if (!pending) {
          this.#count('unmatched_response');
          return undefined;
        }
        this.#pending.delete(m.id as string);
        clearTimeout(pending.timer);
        if (m.kind === 'result') pending.resolve(m.result);
        else pending.reject(new RpcError(m.error.code, m.error.message, m.error.data));
        return undefined;
      }
      case 'notification':
        if (m.method === 'update') {
          const params = paramsObject(m.params);
          if (params) void this.enqueue(() => this.#onUpdateEvent(params));
          return undefined;
        }
        this.#count(`notification:${m.method}`);
        return undefined;
      case 'request':
        try {
          return encodeResult(m.id, await this.#onRequest(m.method, m.params));
        } catch (err) {
          if (err instanceof RpcError) return encodeError(m.id, err.toJSON());
          this.#log.error({ err, method: m.method }, 'grisp request handler failed');
          return encodeError(m.id, RpcErrors.internal);
        }
    }
  }

  /** Requests the board makes: `post ping`, `post device_linking_token`. */
  async #onRequest(method: string, rawParams: unknown): Promise<unknown> {
    if (method !== 'post') throw new RpcError(RpcErrors.methodNotFound.code, RpcErrors.methodNotFound.message);
    const params = paramsObject(rawParams);
    if (!params || typeof params.type !== 'string')
      throw new RpcError(RpcErrors.invalidParams.code, RpcErrors.invalidParams.message, 'params.type must be a string');
    switch (params.type) {
      case 'ping':
        return (await isLinked(this.#deps.fleet.db, this.ref.deviceId)) ? 'pong' : 'pang';
      case 'device_linking_token': {
        if (!('token' in params))
          throw new RpcError(RpcErrors.invalidParams.code, RpcErrors.invalidParams.message, 'params.token is required');
        const outcome = await linkDevice(this.#deps.fleet.db, this.ref, params.token);
        if (!outcome.ok) throw new RpcError(outcome.error.code, outcome.error.message);
        return 'ok';
      }
      default:
        throw new RpcError(
          RpcErrors.methodNotFound.code,
          RpcErrors.methodNotFound.message,
          `unknown post type ${JSON.stringify(params.type)}`,
        );
    }
  }

  #count(what: string): void {
    this.ignored.set(what, (this.ignored.get(what) ?? 0) + 1);
  }

  #onClose(): void {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#pinger);
    for (const [id, p] of this.#pending) {
      clearTimeout(p.timer);
      p.reject(new Error('the board disconnected'));
      this.#pending.delete(id);
    }
    this.#deps.onClose(this);
    this.#link.transportClosed();
  }
}

export class RpcTimeout extends Error {
  constructor(method: string, ms: number) {
    super(`the board did not answer ${method} within ${ms} ms`);
    this.name = 'RpcTimeout';
  }
}

function str(v: unknown): string | null {
  return typeof v === 'string' ? v : null;
}

function describe(params: Record<string, unknown>): string {
  const parts = [params.message, params.reason]
    .filter((p) => p !== undefined && p !== null)
    .map((p) => (typeof p === 'string' ? p : JSON.stringify(p)));
  return parts.length ? parts.join(': ') : `update ${String(params.event ?? params.event_type)}`;
}

export type { RpcId };
