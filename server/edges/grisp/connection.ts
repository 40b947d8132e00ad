/**
 * One GRiSP board's link: JSON-RPC in both directions over one WebSocket. The connection
 * translates; the fleet decides (edge-devices.ts, updates.ts). Work that touches the fleet runs
 * one step at a time per board (a promise chain), so update events are applied in order.
 */
import type { WebSocket } from 'ws';
import type { Firmware } from '../../db/schema.ts';
import { currentUpdate, DeviceLink, openLink, UPDATE_TIMER } from '../../fleet/device-link.ts';
import type { EdgeDeviceRef } from '../../fleet/edge-devices.ts';
import { FleetError, type FleetContext } from '../../fleet/index.ts';
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
import { getGrispState, isLinked, linkDevice, parseLogBatch, saveGrispState, storeLogBatch } from './store.ts';

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
  /**
   * How long the board may take to answer `start_update` (default 5 min): it answers only after it
   * fetched the manifest, which takes long on a slow link. Without an answer by then the attempt
   * stays open: a late answer and the board's update events still count.
   */
  startUpdateTimeoutMs: number;
  /** How often the board's log buffer is fetched (default 60 s; 0 disables). */
  logIntervalMs: number;
  logMaxBatchSize: number;
  logMaxByteSize: number;
}

export const DEFAULT_TIMINGS: GrispTimings = {
  pingIntervalMs: 25_000,
  requestTimeoutMs: 5_000,
  startUpdateTimeoutMs: 5 * 60_000,
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

/** How a request to the board ended: its result, its error (RpcError), or the link closing. */
type Answer = { result: unknown } | { error: Error };

interface Pending {
  answer(a: Answer): void;
  timer: NodeJS.Timeout | undefined;
}

/** Longest board-supplied text (error messages, reasons) stored; longer text is cut. */
export const BOARD_TEXT_MAX = 500;

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
  /** The board's connection on the edge runtime: step queue, timers, its topics, close. */
  readonly #edge: EdgeLink;
  #pinger: NodeJS.Timeout | undefined;
  #nextId = 1;
  #closed = false;
  /** The board's device link (its session: who the board is, when it was recorded online). */
  readonly #link: DeviceLink;
  /** The update this link started (or found running), by firmware. */
  #updating: Firmware | undefined;
  /** The firmware of a `start_update` the board has not answered yet. */
  #startingUpdate: string | undefined;
  /** Counters of what the board sent that we ignore (unknown notifications). */
  readonly ignored = new Map<string, number>();

  constructor(ws: WebSocket, ref: GrispIdentity, deps: GrispConnectionDeps) {
    this.#ws = ws;
    this.ref = ref;
    this.#deps = deps;
    this.#log = deps.log.child({ device_id: ref.deviceId, identifier: ref.identifier });
    this.#link = new DeviceLink(
      deps.fleet,
      openLink({ deviceId: ref.deviceId, orgId: ref.orgId, productId: ref.productId, protocol: 'grisp' }),
      this.#log,
    );
    this.#edge = deps.runtime.open({
      edge: 'grisp',
      log: this.#log,
      transport: { close: (code, reason) => ws.close(code, reason) },
      // The board answering with an error, or reporting what the fleet refuses, is its problem (warn).
      devicesFault: (err) => err instanceof RpcError || err instanceof FleetError,
      handlers: {
        retarget: () => this.refresh(),
        approved: () => this.refresh(),
        timer: async (key) => {
          if (key === UPDATE_TIMER) return this.#startUpdateUnanswered();
          if (key !== 'logs') return;
          await this.fetchLogs();
          this.#edge.schedule('logs', this.#deps.timings.logIntervalMs);
        },
        // After the step in flight (it may have just marked the board online).
        closed: async () => {
          await this.#link.feed({ type: 'closed', reason: 'socket closed' });
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
    if (timings.logIntervalMs > 0) this.#edge.schedule('logs', timings.logIntervalMs);
    this.enqueue(async () => {
      await this.#edge.attach({
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
    return this.#edge.step(step);
  }

  /** The close effect: ends the link with `code` and `reason`. */
  close(code = 1000, reason = ''): void {
    this.#edge.close(code, reason);
  }

  // --- outgoing requests ------------------------------------------------------------------------

  /** A request to the board; rejects with RpcError (the board's error) or after the request timeout. */
  request(method: string, params?: Record<string, unknown>): Promise<unknown> {
    const ms = this.#deps.timings.requestTimeoutMs;
    return new Promise((resolve, reject) =>
      this.#call(
        method,
        params,
        ms,
        (a) => ('result' in a ? resolve(a.result) : reject(a.error)),
        () => reject(new RpcTimeout(method, ms)),
      ),
    );
  }

  /**
   * Sends a request; `answer` gets the board's answer (or the link closing). After `timeoutMs`
   * without one the request is forgotten (a late answer is then unmatched) and `timeout` runs;
   * without `timeoutMs` it waits for the answer as long as the link lives.
   */
  #call(
    method: string,
    params: Record<string, unknown> | undefined,
    timeoutMs: number | undefined,
    answer: (a: Answer) => void,
    timeout: () => void = () => undefined,
  ): void {
    if (this.#closed) {
      answer({ error: new Error('the board disconnected') });
      return;
    }
    const id = `fh-${this.#nextId++}`;
    const pending: Pending = {
      answer,
      timer:
        timeoutMs === undefined
          ? undefined
          : setTimeout(() => {
              pending.timer = undefined;
              this.#pending.delete(id);
              timeout();
            }, timeoutMs),
    };
    this.#pending.set(id, pending);
    this.#send(encodeRequest(id, method, params));
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
    const info = await this.#readSystemInfo();
    const action = info.action_required ?? null;
    const pendingCommit = action === 'validate' || action === 'reboot' || action === 'remove_sdcard_and_reboot';
    // relvsn may be null (a release run from a shell) or no semantic version: recorded as reported.
    const online = await this.#link.feed({
      type: 'connected',
      running: { version: str(info.relvsn), settle: !pendingCommit },
    });
    if (!online) return;
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
    await this.#edge.apply(online?.effects, {
      pushUpdate: async ({ firmware }) => {
        if (info.update_status !== 'updating') await this.#startUpdate(firmware);
      },
    });
  }

  /** `get system_info`, stored. */
  async #readSystemInfo(): Promise<SystemInfo> {
    const info = (await this.request('get', { type: 'system_info' })) as SystemInfo;
    if (typeof info !== 'object' || info === null || Array.isArray(info))
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
    return info;
  }

  /**
   * Marks the attempt sent and posts `start_update`. The board answers once it has fetched the
   * manifest (slow links: minutes), so the answer is handled as a step of its own when it comes,
   * and the steps queued meanwhile (update events, logs) are not held up.
   */
  async #startUpdate(target: Firmware, retried = false): Promise<void> {
    if (!target.has_blob || target.format !== 'grisp') {
      await this.#link.feed({
        type: 'report',
        kind: 'error',
        firmwareId: target.id,
        errors: [
          `firmware ${target.version} is not a GRiSP package (format ${target.format}); upload it with POST /api/v1/grisp/firmware`,
        ],
        reason: 'not a GRiSP package',
      });
      return;
    }
    // Asked already and not answered yet: asking again would only get -11 (already updating).
    if (this.#startingUpdate === target.id) return;
    // The link answers with the timer for the board's answer (`UPDATE_TIMER`, on the edge runtime).
    const sent = await this.#link.feed({
      type: 'update_sent',
      firmware: target,
      via: 'edge:grisp',
      awaitMs: this.#deps.timings.startUpdateTimeoutMs,
    });
    if (!sent) return;
    this.#updating = target;
    this.#startingUpdate = target.id;
    await this.#edge.apply(sent.effects);
    this.#call('post', { type: 'start_update', url: this.#deps.packageUrl(target) }, undefined, (answer) => {
      if (this.#startingUpdate === target.id) this.#startingUpdate = undefined;
      this.#edge.cancel(UPDATE_TIMER);
      void this.enqueue(() => this.#onStartUpdateAnswer(target, answer, retried));
    });
  }

  /** `UPDATE_TIMER` fired: the board has neither answered start_update nor reported on the update. */
  #startUpdateUnanswered(): void {
    const starting = this.#startingUpdate;
    if (!starting) return;
    this.#log.warn(
      { firmware_id: starting, timeout_ms: this.#deps.timings.startUpdateTimeoutMs },
      'the board has not answered start_update yet; the attempt stays open for its answer and update events',
    );
  }

  async #onStartUpdateAnswer(target: Firmware, answer: Answer, retried: boolean): Promise<void> {
    if ('result' in answer) {
      this.#log.info({ version: target.version }, 'update started');
      return;
    }
    const err = answer.error;
    const code = err instanceof RpcError ? err.code : undefined;
    if (code === DeviceErrors.alreadyUpdating) {
      this.#log.warn('the board is already updating; waiting for its update events');
      return;
    }
    if (code === DeviceErrors.bootSystemNotValidated && !retried) {
      // The board runs an image nobody validated yet: validate it first, then try again once.
      const info = await this.#readSystemInfo();
      if (await this.#validate(info, { retryUpdate: false })) await this.#startUpdate(target, true);
      return;
    }
    if (this.#updating?.id === target.id) this.#updating = undefined;
    const why = err instanceof RpcError ? `start_update: ${err.message} (${err.code})` : `start_update: ${err.message}`;
    await this.#link.feed({
      type: 'report',
      kind: 'error',
      firmwareId: target.id,
      errors: [boardText(why)],
      reason: 'start_update',
    });
  }

  /**
   * Health check, then `post validate` (or a reboot back to the previous image), then system_info
   * again so the stored state no longer asks for validation. Returns whether the board validated.
   */
  async #validate(info: SystemInfo, o: { retryUpdate?: boolean } = {}): Promise<boolean> {
    const fleet = this.#deps.fleet;
    const current = await currentUpdate(fleet, this.#link.session);
    const open = current?.attempt.state === 'finished' ? current.attempt : undefined;
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
      await this.#link.feed({
        type: 'report',
        kind: 'error',
        errors: [boardText(`health check: ${verdict}`)],
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
            : boardText(`validate: ${(err as Error).message}`);
      this.#log.warn({ code }, why);
      await this.#link.feed({ type: 'report', kind: 'error', errors: [why], reason: 'validate failed' });
      return false;
    }
    this.#log.info({ version: info.relvsn }, 'validated the running image');
    // What the board says now (update_status ready, no action_required); the old answer if it does not say.
    const after = await this.#readSystemInfo().catch(async (err: Error) => {
      this.#log.warn({ err }, 'system_info after validate failed; recording the validation only');
      await saveGrispState(fleet.db, this.ref.deviceId, { action_required: null });
      return info;
    });
    const confirmed = await this.#link.feed({ type: 'boot_confirmed', version: str(after.relvsn) });
    await this.#edge.apply(confirmed?.effects, {
      pushUpdate: async ({ firmware }) => {
        if (o.retryUpdate !== false) await this.#startUpdate(firmware);
      },
    });
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
    const version = updating.version;
    switch (event) {
      case 'progress': {
        const percent = Math.max(0, Math.min(100, Math.round(Number(params.percentage ?? 0)) || 0));
        // A report cancels the start_update timer (the link's cancel_timer).
        await this.#edge.apply(
          (await this.#link.feed({ type: 'report', kind: 'progress', version, percent, begins: true }))?.effects,
        );
        return;
      }
      case 'warning':
        this.#log.warn({ message: params.message, reason: params.reason }, 'board update warning');
        await saveGrispState(fleet.db, this.ref.deviceId, { update_message: boardText(describe(params)) });
        return;
      case 'error':
        this.#updating = undefined;
        await this.#edge.apply(
          (await this.#link.feed({ type: 'report', kind: 'error', version, errors: [boardText(describe(params))] }))
            ?.effects,
        );
        return;
      case 'done':
        await this.#edge.apply(
          (await this.#link.feed({ type: 'report', kind: 'finished', version, begins: true }))?.effects,
        );
        this.#updating = undefined;
        // The new image is written: boot it. The board comes back with action_required=validate.
        await this.#reboot();
        return;
      default:
        this.#count(`update:${String(event)}`);
    }
  }

  /** The update in flight on the board (sent, begun or downloading), when this link did not start it. */
  async #openUpdate(): Promise<Firmware | undefined> {
    const current = await currentUpdate(this.#deps.fleet, this.#link.session);
    if (!current || current.attempt.state === 'queued' || current.attempt.state === 'finished') return undefined;
    this.#updating = current.firmware;
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

  /**
   * `log.get` until the board has nothing more (bounded), storing each batch then acknowledging it
   * with `log.sync {seq: <highest seq stored>, dropped: <the batch's dropped count>}` (grisp_connect
   * truncates its buffer up to seq and subtracts the dropped count it reported).
   */
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
      await storeLogBatch(fleet.db, this.ref.deviceId, batch);
      stored += batch.events.length;
      if (batch.dropped > 0)
        this.#log.warn({ dropped: batch.dropped }, 'the board dropped log events: its log buffer overflowed');
      const seq = batch.lastSeq ?? Number((await getGrispState(fleet.db, this.ref.deviceId))?.log_seq ?? 0);
      this.notify('log.sync', { seq, dropped: batch.dropped });
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
        pending.answer(
          m.kind === 'result'
            ? { result: m.result }
            : { error: new RpcError(m.error.code, m.error.message, m.error.data) },
        );
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
      this.#pending.delete(id);
      p.answer({ error: new Error('the board disconnected') });
    }
    this.#deps.onClose(this);
    this.#edge.transportClosed();
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

/** Text from the board as stored: on one line (runs of whitespace become one space), at most BOARD_TEXT_MAX characters. */
export function boardText(text: string): string {
  const line = text.replace(/\s+/g, ' ').trim();
  const chars = Array.from(line);
  return chars.length <= BOARD_TEXT_MAX ? line : `${chars.slice(0, BOARD_TEXT_MAX - 1).join('')}…`;
}

function describe(params: Record<string, unknown>): string {
  const parts = [params.message, params.reason]
    .filter((p) => p !== undefined && p !== null)
    .map((p) => (typeof p === 'string' ? p : JSON.stringify(p)));
  return parts.length ? parts.join(': ') : `update ${String(params.event ?? params.event_type)}`;
}

export type { RpcId };
