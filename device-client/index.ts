/**
 * The fleethub device library: one device's connection over the official `phoenix` client with a
 * mutual-TLS WebSocket, and the Phoenix device protocol's update flow (download, verify, install, report, reboot).
 */
import { EventEmitter } from 'node:events';
import { rm } from 'node:fs/promises';
import type https from 'node:https';
import path from 'node:path';
import { Socket, type Channel } from 'phoenix';
import { deviceTopic, Events, type DeviceJoinParams, type FirmwareUpdatePayload } from '../shared/protocol.ts';
import { downloadFirmware, DownloadError, type DeviceTls, type DownloadFaults } from './download.ts';
import { SlotInstaller, type Installer, type RunningFirmware } from './installer.ts';
import type { ConnectionFailure } from './connection-failure.ts';
import { describeConnectionError, tlsWebSocket, type TlsWebSocketClass } from './phoenix-transport.ts';
import { firmwareSignatureValid } from './verify.ts';

export { downloadFirmware, DownloadError, type DeviceTls, type DownloadFaults } from './download.ts';
export {
  ExecInstaller,
  InstallError,
  SlotInstaller,
  type Installer,
  type RunningFirmware,
  type StagedImage,
} from './installer.ts';
export { firmwareSignatureValid } from './verify.ts';

/**
 * How a bad release misbehaves on a device told to install it, to rehearse a rollout that must stop:
 * `rollback` installs it, reports `finished`, and comes back on the old firmware (its trial boot
 * failed); `fail` downloads and verifies it, then reports an error with the reason; `hang` begins
 * the update and goes silent mid-download (connected, but never another word about it).
 */
export type BadMode = 'rollback' | 'fail' | 'hang';
export const BAD_MODES: readonly BadMode[] = ['rollback', 'fail', 'hang'];

/** The version this device treats as a bad release, and how it misbehaves with it. */
export interface BadRelease {
  version: string;
  mode: BadMode;
}

/** Faults injected into one update (simulator); `undefined` means none. */
export interface UpdateFaults extends DownloadFaults {
  /** Fail the download outright, as a broken link would after every retry. */
  failDownload?: boolean;
  /** Make the installer refuse the image. */
  rejectInstall?: boolean;
}

export interface DeviceClientOptions {
  /** Socket URL on the device listener, e.g. `wss://localhost:4001/socket` (phoenix appends `/websocket`). */
  url: string;
  tls: DeviceTls;
  /** Where slots and state live (default installer: `SlotInstaller(stateDir)`). */
  stateDir?: string;
  installer?: Installer;
  /** What runs when the state directory knows nothing yet (first start). */
  firmware?: RunningFirmware;
  /** Join metadata for firmware the server does not know yet. */
  metadata?: Omit<DeviceJoinParams, 'version'>;
  /** ed25519 public keys (PEM) firmware signatures must verify against. */
  signingKeys?: string[];
  /** Refuse unsigned images (needs `signingKeys`). */
  requireSignature?: boolean;
  /** Shared HTTPS agent for downloads (its TLS session cache makes repeat downloads cheap). */
  agent?: https.Agent;
  /** Shared TLS session cache for the socket, keyed by `sessionKey` (the simulator shares one). */
  sessionCache?: Map<string, Buffer>;
  /** This device's key in `sessionCache` (default: the socket URL plus the certificate). */
  sessionKey?: string;
  reconnectAfterMs?: (tries: number) => number;
  rejoinAfterMs?: (tries: number) => number;
  heartbeatIntervalMs?: number;
  /** Minimum interval between `firmware_update_progress` pushes (default 1000 ms). */
  progressIntervalMs?: number;
  /** Pause between `firmware_update_finish` and reconnecting on the new firmware. */
  rebootDelayMs?: number;
  downloadAttempts?: number;
  downloadRetryDelayMs?: (attempt: number) => number;
  /** How many times a refused (403) URL is refreshed by rejoining before the update fails. */
  urlRefreshLimit?: number;
  faults?: (update: FirmwareUpdatePayload) => UpdateFaults | undefined;
  /** Misbehave on this version (rehearsing a bad release); every other version installs normally. */
  badRelease?: BadRelease;
}

/** What a device client reports, for CLIs, simulators and tests. */
export interface DeviceClientEvents {
  connected: [];
  disconnected: [];
  joined: [{ topic: string; groups: string[] }];
  join_error: [{ topic: string; reason: string }];
  group_joined: [string];
  group_left: [string];
  update_ignored: [{ version: string; reason: 'running' | 'in_progress' | 'busy' }];
  update_begin: [{ version: string; size: number }];
  progress: [{ version: string; bytes: number; total: number; percent: number }];
  url_refused: [{ version: string; refresh: number }];
  update_finished: [{ version: string; bytesFetched: number; attempts: number }];
  update_error: [{ version: string; errors: string[] }];
  /** A bad release (`badRelease`, mode `hang`): the update began and the device fell silent. */
  update_hung: [{ version: string }];
  rebooted: [RunningFirmware];
  /** A connection attempt (or an open connection) failed, and why; phoenix reconnects with backoff. */
  connect_error: [ConnectionFailure];
  warning: [string];
  /** Every report pushed to the server (begin, progress, finish, error). */
  reported: [{ event: string; payload: Record<string, unknown> }];
}

export class DeviceClientError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DeviceClientError';
  }
}

/** An update failure whose message goes to the operator as-is. */
class UpdateFailure extends Error {}

/** The server answered a report with an error (`{reason, details}`). */
class ReportRefused extends UpdateFailure {
  constructor(
    message: string,
    readonly response: unknown,
  ) {
    super(message);
  }
}

/** The server did not answer a report in time (the connection may be gone with it). */
class ReportTimeout extends UpdateFailure {}

/**
 * One device. `start()` boots (learns the running firmware from the installer), connects and
 * joins `device:<uuid>`; the phoenix client reconnects and rejoins with backoff on its own.
 */
export class DeviceClient extends EventEmitter<DeviceClientEvents> {
  readonly options: DeviceClientOptions;
  readonly installer: Installer;
  #running: RunningFirmware | null = null;
  #socket: Socket | null = null;
  #deviceChannel: Channel | null = null;
  readonly #groups = new Map<string, Channel>();
  #updating: string | null = null;
  #pending: FirmwareUpdatePayload | null = null;
  #urlRefreshes = 0;
  #abort: AbortController | null = null;
  #stopped = false;
  /** Joins of the device channel so far; a rejoin after a lost connection is a new one. */
  #joins = 0;
  /** The join in which the server was last told `firmware_update_begin` of the update underway. */
  #begunInJoin = -1;
  /** The update underway fell silent on purpose (bad release `hang`): it reports nothing more. */
  #silent = false;
  /** Waiting for the next join of the device channel (rejected by `stop()`). */
  #joinWaiters: { resolve(): void; reject(err: Error): void }[] = [];

  constructor(options: DeviceClientOptions) {
    super();
    if (!options.installer && !options.stateDir)
      throw new DeviceClientError('give the device a state directory (--slots DIR) or an installer');
    this.options = options;
    this.installer = options.installer ?? new SlotInstaller(options.stateDir!);
  }

  /** The firmware this device runs (null before `start()`). */
  get running(): RunningFirmware | null {
    return this.#running;
  }

  /** The version being installed, if any. */
  get updating(): string | null {
    return this.#updating;
  }

  get groups(): string[] {
    return [...this.#groups.keys()];
  }

  get connected(): boolean {
    return this.#socket?.isConnected() ?? false;
  }

  async start(): Promise<void> {
    this.#stopped = false;
    let running = await this.installer.boot();
    if (!running) {
      if (!this.options.firmware)
        throw new DeviceClientError(
          'the state directory has no running firmware: pass --firmware-uuid and --version on first start',
        );
      running = this.options.firmware;
      await this.installer.setRunning(running);
    }
    this.#running = running;
    this.#connect();
  }

  /** Disconnects and cancels any download; resolves once the socket is closed. */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#abort?.abort();
    for (const w of this.#joinWaiters.splice(0)) w.reject(new UpdateFailure('the device client stopped'));
    await this.#disconnect();
  }

  #connect(): void {
    const running = this.#running!;
    const socket = new Socket(this.options.url, {
      transport: this.#transportClass(),
      reconnectAfterMs:
        this.options.reconnectAfterMs ?? ((tries) => Math.min(100 * 2 ** tries, 15_000) * (0.5 + Math.random())),
      rejoinAfterMs: this.options.rejoinAfterMs ?? ((tries) => [1000, 2000, 5000][tries - 1] ?? 10_000),
      ...(this.options.heartbeatIntervalMs ? { heartbeatIntervalMs: this.options.heartbeatIntervalMs } : {}),
    });
    this.#socket = socket;
    socket.onOpen(() => {
      this.emit('connected');
    });
    socket.onClose(() => {
      this.emit('disconnected');
    });
    // Transport errors are followed by onClose and a reconnect; say why this attempt failed.
    socket.onError((error: unknown) => {
      this.emit('connect_error', describeConnectionError(error));
    });
    socket.connect();
    this.#joinDeviceChannel(running);
  }

  /** The phoenix transport: a TLS WebSocket that resumes this device's last TLS session. */
  #transportClass(): TlsWebSocketClass {
    const tls = this.options.tls;
    const cache = this.options.sessionCache;
    if (!cache) return tlsWebSocket(tls);
    const key = this.options.sessionKey ?? `${this.options.url}\n${tls.cert}`;
    const onSession = (session: Buffer) => void cache.set(key, session);
    // A refused credential may be a stale session's verdict (a resumed session is checked against
    // today's trust and certificate): the next attempt must do a full handshake.
    const onRefused = (status: number) => {
      if (status === 401 || status === 403) cache.delete(key);
    };
    // phoenix constructs the transport on every reconnect: read the cache then, not now.
    return function ResumingTlsWebSocket(url: string | URL, protocols?: string | string[]) {
      const session = cache.get(key);
      const Transport = tlsWebSocket({ ...tls, onSession, onRefused, ...(session ? { session } : {}) });
      return new Transport(url, protocols);
    } as unknown as TlsWebSocketClass;
  }

  #joinDeviceChannel(running: RunningFirmware): void {
    const socket = this.#socket!;
    const topic = deviceTopic(running.uuid);
    const params: DeviceJoinParams = { version: running.version, ...this.options.metadata };
    const channel = socket.channel(topic, params);
    this.#deviceChannel = channel;
    channel.on(Events.firmwareUpdate, (payload) => this.#onFirmwareUpdate(payload));
    channel.on(Events.join, (payload: { channel?: unknown }) => {
      if (typeof payload?.channel === 'string') this.#joinGroup(payload.channel);
    });
    channel.on(Events.leave, (payload: { channel?: unknown }) => {
      if (typeof payload?.channel === 'string') this.#leaveGroup(payload.channel);
    });
    // The hook stays on the join push, so it runs again on every automatic rejoin.
    channel
      .join()
      .receive('ok', (reply: { groups?: unknown }) => {
        const groups = Array.isArray(reply?.groups)
          ? reply.groups.filter((g): g is string => typeof g === 'string')
          : [];
        this.#reconcileGroups(groups);
        this.#joins++;
        this.#resumeUpdate();
        for (const w of this.#joinWaiters.splice(0)) w.resolve();
        this.emit('joined', { topic, groups });
      })
      .receive('error', (reply: { reason?: unknown }) =>
        this.emit('join_error', { topic, reason: String(reply?.reason ?? 'unknown') }),
      );
  }

  #reconcileGroups(groups: string[]): void {
    for (const topic of [...this.#groups.keys()]) if (!groups.includes(topic)) this.#leaveGroup(topic);
    for (const topic of groups) this.#joinGroup(topic);
  }

  #joinGroup(topic: string): void {
    if (this.#groups.has(topic) || !this.#socket) return;
    const channel = this.#socket.channel(topic, {});
    this.#groups.set(topic, channel);
    channel.on(Events.firmwareUpdate, (payload) => this.#onFirmwareUpdate(payload));
    channel
      .join()
      .receive('ok', () => this.emit('group_joined', topic))
      .receive('error', (reply: { reason?: unknown }) =>
        this.emit('join_error', { topic, reason: String(reply?.reason ?? 'unknown') }),
      );
  }

  #leaveGroup(topic: string): void {
    const channel = this.#groups.get(topic);
    if (!channel) return;
    this.#groups.delete(topic);
    channel.leave();
    this.emit('group_left', topic);
  }

  #onFirmwareUpdate(raw: unknown): void {
    const update = parseUpdate(raw);
    if (!update) {
      this.emit('warning', `ignored a malformed firmware_update: ${JSON.stringify(raw)}`);
      return;
    }
    if (update.version === this.#running?.version)
      return void this.emit('update_ignored', { version: update.version, reason: 'running' });
    if (update.version === this.#updating)
      return void this.emit('update_ignored', { version: update.version, reason: 'in_progress' });
    if (this.#updating) {
      // One update at a time; the newest request waits for the current one to end.
      this.#pending = update;
      return void this.emit('update_ignored', { version: update.version, reason: 'busy' });
    }
    void this.#performUpdate(update);
  }

  async #performUpdate(update: FirmwareUpdatePayload): Promise<void> {
    const { version } = update;
    this.#updating = version;
    this.#begunInJoin = -1;
    this.#silent = false;
    this.#abort = new AbortController();
    const faults = this.options.faults?.(update);
    const bad = this.options.badRelease?.version === version ? this.options.badRelease.mode : undefined;
    let staging: string | undefined;
    try {
      this.#resumeUpdate();
      this.emit('update_begin', { version, size: update.size });
      if (bad === 'hang') {
        // Mid-download and then nothing: `#updating` stays set, so a resent update is ignored too.
        this.#push(Events.updateProgress, { version, percent: 0, bytes: 0, total: update.size });
        this.#silent = true;
        this.emit('update_hung', { version });
        return;
      }
      if (faults?.failDownload)
        throw new UpdateFailure(
          `download of ${version} failed: the connection to the server kept failing (injected fault)`,
        );
      staging = await this.installer.stagingPath();
      const result = await this.#download(update, staging, faults);
      if (result === 'refreshing') return;
      if (result.size !== update.size)
        throw new UpdateFailure(
          `image size mismatch for ${version}: expected ${update.size} bytes, got ${result.size}; re-upload the firmware`,
        );
      if (result.sha256 !== update.sha256.toLowerCase()) {
        throw new UpdateFailure(
          `sha256 mismatch for ${version}: expected ${update.sha256}, got ${result.sha256}; the image was corrupted in transit or in storage — re-upload it and retarget`,
        );
      }
      this.#checkSignature(update);
      if (faults?.rejectInstall)
        throw new UpdateFailure(
          `the installer rejected ${version} (injected fault); the running firmware is unchanged`,
        );
      if (bad === 'fail')
        throw new UpdateFailure(
          `${version} failed its pre-install check (bad release rehearsal: --bad-version ${version} --bad-mode fail); the running firmware is unchanged`,
        );
      await this.installer.install({
        path: staging,
        uuid: update.firmware_uuid,
        version,
        sha256: result.sha256,
        size: result.size,
      });
      staging = undefined;
      // The server must have the finish recorded before the device goes away (after a rejoin, if
      // the connection is down now: a server restart must not fail an installed update).
      await this.#deliver(Events.updateFinish, { version });
      this.emit('update_finished', { version, bytesFetched: result.bytesFetched, attempts: result.attempts });
      this.#urlRefreshes = 0;
      if (bad === 'rollback') {
        // The trial boot of the new image fails: the bootloader keeps the old one.
        await this.installer.revert();
        this.emit(
          'warning',
          `${version} failed its trial boot (bad release rehearsal); rebooting into the old firmware`,
        );
      }
      await this.#reboot();
    } catch (err) {
      if (this.#stopped) return;
      const message = err instanceof Error ? err.message : String(err);
      // Reported once the server has recorded it (or could not be told: it learns on the next join).
      await this.#pushAndWait(Events.updateError, { version, errors: [message] }).catch(() => undefined);
      this.emit('update_error', { version, errors: [message] });
      this.#updating = null;
      this.#urlRefreshes = 0;
      this.#takePending();
    } finally {
      if (staging) await rm(staging, { force: true }).catch(() => undefined);
    }
  }

  /** Downloads, or on a refused URL rejoins the device channel so the server sends a fresh one. */
  async #download(update: FirmwareUpdatePayload, staging: string, faults: UpdateFaults | undefined) {
    const { version } = update;
    let lastProgress = 0;
    try {
      return await downloadFirmware({
        url: update.url,
        tls: this.options.tls,
        agent: this.options.agent,
        file: staging,
        size: update.size,
        maxAttempts: this.options.downloadAttempts,
        retryDelayMs: this.options.downloadRetryDelayMs,
        signal: this.#abort!.signal,
        faults,
        onProgress: (bytes, total) => {
          const percent = total > 0 ? Math.floor((bytes / total) * 100) : 100;
          this.emit('progress', { version, bytes, total, percent });
          const now = Date.now();
          // Not joined: this figure is stale by the rejoin; the next one after it goes out.
          if (this.#joined() && now - lastProgress >= (this.options.progressIntervalMs ?? 1000)) {
            lastProgress = now;
            this.#push(Events.updateProgress, { version, percent, bytes, total });
          }
        },
      });
    } catch (err) {
      if (
        err instanceof DownloadError &&
        err.code === 'URL_REFUSED' &&
        this.#urlRefreshes < (this.options.urlRefreshLimit ?? 3)
      ) {
        this.#urlRefreshes++;
        this.emit('url_refused', { version, refresh: this.#urlRefreshes });
        this.#updating = null;
        this.#rejoinDeviceChannel();
        return 'refreshing' as const;
      }
      if (err instanceof DownloadError && err.code === 'URL_REFUSED') {
        throw new UpdateFailure(
          `the server refused the download of ${version} ${this.#urlRefreshes + 1} times (403); check that the firmware belongs to this device's product and the server clock`,
        );
      }
      throw err;
    }
  }

  #checkSignature(update: FirmwareUpdatePayload): void {
    const keys = this.options.signingKeys ?? [];
    if (update.signature) {
      if (keys.length === 0) {
        if (this.options.requireSignature)
          throw new UpdateFailure(
            `cannot verify the signature of ${update.version}: the device has no signing keys configured`,
          );
        this.emit(
          'warning',
          `firmware ${update.version} is signed but the device has no signing keys to verify it with`,
        );
        return;
      }
      if (!firmwareSignatureValid(update.sha256, update.signature, keys)) {
        throw new UpdateFailure(
          `the signature of ${update.version} does not verify against the device's signing keys; sign the image with a key the device trusts`,
        );
      }
    } else if (this.options.requireSignature) {
      throw new UpdateFailure(
        `firmware ${update.version} is unsigned and this device requires signed firmware; upload it with --sign-key`,
      );
    }
  }

  /** Leaves and joins `device:<uuid>` again: the join makes the server resend `firmware_update`. */
  #rejoinDeviceChannel(): void {
    if (!this.#socket || !this.#running) return;
    this.#deviceChannel?.leave();
    this.#joinDeviceChannel(this.#running);
  }

  async #reboot(): Promise<void> {
    await this.#disconnect();
    this.#running = await this.installer.boot();
    this.#updating = null;
    this.#pending = null;
    this.emit('rebooted', this.#running!);
    const delay = this.options.rebootDelayMs ?? 0;
    if (delay > 0) await new Promise((r) => setTimeout(r, delay));
    if (!this.#stopped) this.#connect();
  }

  #takePending(): void {
    const next = this.#pending;
    this.#pending = null;
    if (next && next.version !== this.#running?.version) void this.#performUpdate(next);
  }

  async #disconnect(): Promise<void> {
    const socket = this.#socket;
    this.#socket = null;
    this.#deviceChannel = null;
    this.#groups.clear();
    if (!socket) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 2000);
      socket.disconnect(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  #push(event: string, payload: Record<string, unknown>): void {
    this.#deviceChannel?.push(event, payload);
    this.emit('reported', { event, payload });
  }

  /** Whether the device channel is joined on an open socket (a push goes out now, not into phoenix's buffer). */
  #joined(): boolean {
    return this.#socket?.isConnected() === true && this.#deviceChannel?.state === 'joined';
  }

  /**
   * The resume rule (docs/phoenix-device-protocol.md): the server hears `firmware_update_begin`
   * of the update underway once per join, before any other report on it, at the start of the
   * update and again on every rejoin (the rejoin made the server send the update anew). Only
   * while joined: nothing waits in phoenix's buffer to overtake it.
   */
  #resumeUpdate(): void {
    const version = this.#updating;
    if (!version || this.#silent || !this.#joined() || this.#begunInJoin === this.#joins) return;
    this.#begunInJoin = this.#joins;
    this.#push(Events.updateBegin, { version });
  }

  /** Resolves on the next join of the device channel. */
  #nextJoin(): Promise<void> {
    return new Promise((resolve, reject) => this.#joinWaiters.push({ resolve, reject }));
  }

  /**
   * Reports `event` and resolves once the server has acknowledged it. While the device channel is
   * not joined (a server restart, an outage) it waits for the rejoin, which reports the begin
   * again first; a push lost with its connection goes again on the next join. A refusal rejects,
   * except a finish the server holds already (its first answer was lost with the connection).
   */
  async #deliver(event: string, payload: Record<string, unknown>): Promise<void> {
    for (;;) {
      if (!this.#joined()) await this.#nextJoin();
      const joins = this.#joins;
      const pushed = this.#pushAndWait(event, payload).then(
        () => true,
        (err: unknown) => {
          if (err instanceof ReportTimeout && (!this.#joined() || this.#joins !== joins)) return false;
          if (err instanceof ReportRefused && event === Events.updateFinish && refusedState(err) === 'finished')
            return true;
          throw err;
        },
      );
      if (await Promise.race([pushed, this.#nextJoin().then(() => false)])) return;
    }
  }

  #pushAndWait(event: string, payload: Record<string, unknown>, timeoutMs = 10_000): Promise<void> {
    const channel = this.#deviceChannel;
    if (!channel) return Promise.reject(new UpdateFailure(`not connected: cannot report ${event}`));
    this.emit('reported', { event, payload });
    return new Promise((resolve, reject) => {
      channel
        .push(event, payload, timeoutMs)
        .receive('ok', () => resolve())
        .receive('error', (r: unknown) =>
          reject(new ReportRefused(`the server refused ${event}: ${JSON.stringify(r)}`, r)),
        )
        .receive('timeout', () =>
          reject(new ReportTimeout(`the server did not acknowledge ${event} within ${timeoutMs} ms`)),
        );
    });
  }
}

/** The attempt state a refusal names (`{reason, details: {state}}`), if any. */
function refusedState(err: ReportRefused): unknown {
  const details = (err.response as { details?: { state?: unknown } } | null)?.details;
  return details?.state;
}

function parseUpdate(raw: unknown): FirmwareUpdatePayload | null {
  const p = raw as Partial<FirmwareUpdatePayload> | null;
  if (!p || typeof p !== 'object') return null;
  if (
    typeof p.url !== 'string' ||
    typeof p.version !== 'string' ||
    typeof p.sha256 !== 'string' ||
    typeof p.firmware_uuid !== 'string'
  )
    return null;
  const size = Number(p.size);
  if (!Number.isSafeInteger(size) || size < 0) return null;
  return {
    url: p.url,
    version: p.version,
    sha256: p.sha256,
    size,
    firmware_uuid: p.firmware_uuid,
    ...(typeof p.signature === 'string' && p.signature ? { signature: p.signature } : {}),
  };
}

/** `<dir>/<serial>` — where the simulator and CLI keep one device's slots. */
export function deviceStateDir(root: string, serial: string): string {
  return path.join(root, serial.replace(/[^A-Za-z0-9_.-]/g, '_'));
}
