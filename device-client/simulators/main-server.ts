/**
 * A simulated Raspberry Pi speaking the Main Server REST protocol: registers, waits for approval
 * (or uses a pre-approved token), collects its device token with its claim, heartbeats, polls
 * `/updates`, downloads the package, verifies its sha256, backs up the extension, installs the
 * ZIP, reports `update-status`, and restores the backup (`rolled_back`) when the install fails.
 * State (token, claim, installed versions and files) lives in `stateDir`.
 */
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { cp, mkdir, rm, writeFile, rename } from 'node:fs/promises';
import path from 'node:path';
import { extractZip, parseManifest, MANIFEST_NAME } from '../../shared/main-server-package.ts';
import {
  type ConnectionFailure,
  describeError,
  formatConnectionFailure,
  httpRefusal,
  notTheProtocol,
  quoteAnswer,
  refusalReason,
} from '../connection-failure.ts';
import type { BadRelease } from '../index.ts';
import { registerSimulatorProtocol } from '../simulator.ts';

export interface MainServerDeviceOptions {
  /** API listener base URL, e.g. `http://127.0.0.1:4000` (`/api/main-server` is appended). */
  url: string;
  deviceId: string;
  name?: string;
  ip?: string;
  stateDir: string;
  /** Extensions installed on first start. */
  extensions: Array<{ name: string; version: string }>;
  /** A pre-approved device token (`fleethub main-server add`). */
  token?: string;
  pollIntervalMs?: number;
  heartbeatIntervalMs?: number;
  /** Give up on one API call after this long (default 30 s). */
  requestTimeoutMs?: number;
  /** Faults for one update. */
  faults?: () => { corrupt?: boolean; rejectInstall?: boolean } | undefined;
  /**
   * A bad release (by the offered version): `fail` reports `failed` with the reason, `rollback`
   * installs it, its restart fails and the backup is restored (`rolled_back`), `hang` reports
   * `in_progress` once and never again (heartbeats go on).
   */
  bad?: BadRelease;
}

/** A call that did not reach the Main Server API; its `failure` was emitted as `connect_error`. */
class Unreachable extends Error {
  constructor(readonly failure: ConnectionFailure) {
    super(formatConnectionFailure(failure));
  }
}

interface SavedState {
  token?: string;
  claim?: string;
  versions: Record<string, string>;
}

interface UpdateOffer {
  extension_id: number;
  name: string;
  current_version: string | null;
  available_version: string;
  is_compatible: boolean;
  update_available: boolean;
  sha256?: string;
  download_url?: string;
}

export class MainServerDevice extends EventEmitter {
  readonly o: MainServerDeviceOptions;
  state: SavedState;
  #timers = new Set<NodeJS.Timeout>();
  #stopped = false;
  #busy = false;
  /** The last call did not reach the API. */
  #down = false;
  /** Versions this device fell silent installing (bad release, mode `hang`): never tried again. */
  readonly #hung = new Set<string>();

  constructor(options: MainServerDeviceOptions) {
    super();
    this.o = options;
    const file = this.#stateFile();
    this.state = existsSync(file)
      ? (JSON.parse(readFileSync(file, 'utf8')) as SavedState)
      : { versions: Object.fromEntries(options.extensions.map((e) => [e.name, e.version])) };
    if (options.token) this.state.token = options.token;
  }

  #stateFile(): string {
    return path.join(this.o.stateDir, 'main-server.json');
  }

  async #save(): Promise<void> {
    await mkdir(this.o.stateDir, { recursive: true });
    const tmp = `${this.#stateFile()}.tmp`;
    await writeFile(tmp, JSON.stringify(this.state, null, 2), { mode: 0o600 });
    await rename(tmp, this.#stateFile());
  }

  /**
   * One API call. A call that does not reach the Main Server API (refused, not HTTP, not JSON)
   * emits `connect_error` with the reason and throws an `Unreachable`; the first call that reaches
   * it again emits `reachable`.
   */
  async #call<T>(method: string, pathname: string, body?: unknown): Promise<{ status: number; body: T }> {
    let res: Response;
    try {
      res = await fetch(`${this.o.url.replace(/\/+$/, '')}/api/main-server${pathname}`, {
        method,
        headers: {
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
          ...(this.state.token ? { authorization: `Bearer ${this.state.token}` } : {}),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(this.o.requestTimeoutMs ?? 30_000),
      });
    } catch (err) {
      throw this.#unreachable(
        (err as Error).name === 'TimeoutError'
          ? { kind: 'no answer', message: `${method} ${pathname} got no answer in time` }
          : describeError(err),
      );
    }
    const text = await res.text().catch(() => '');
    let parsed: unknown = {};
    try {
      if (text) parsed = JSON.parse(text);
    } catch {
      throw this.#unreachable(
        notTheProtocol('the Main Server API', `${method} ${pathname} answered HTTP ${res.status} ${quoteAnswer(text)}`),
      );
    }
    if (this.#down) {
      this.#down = false;
      if (this.state.token) this.emit('reachable');
    }
    return { status: res.status, body: parsed as T };
  }

  /** Reports why a call failed; the first failure after a reachable spell emits `unreachable`. */
  #unreachable(failure: ConnectionFailure): Unreachable {
    if (!this.#stopped) {
      this.emit('connect_error', failure);
      if (!this.#down && this.state.token) this.emit('unreachable');
    }
    this.#down = true;
    return new Unreachable(failure);
  }

  /** An HTTP answer that refused the device (not 2xx): reported as a connection failure too. */
  #refused(status: number, body: unknown): void {
    if (!this.#stopped) this.emit('connect_error', httpRefusal(status, refusalReason(JSON.stringify(body ?? {}))));
  }

  #extensions(): Array<{ name: string; version: string }> {
    return Object.entries(this.state.versions).map(([name, version]) => ({ name, version }));
  }

  #every(ms: number, fn: () => Promise<void>): void {
    const t = setInterval(
      () =>
        void fn().catch((err: unknown) => {
          // An unreachable server was reported as connect_error already.
          if (!(err instanceof Unreachable)) this.emit('warning', (err as Error).message);
        }),
      ms,
    );
    this.#timers.add(t);
  }

  /**
   * Registers (or resumes with a saved token), then heartbeats and polls for updates. A server
   * that cannot be reached does not fail the start: the device reports why (`connect_error`)
   * and keeps trying every poll interval.
   */
  async start(): Promise<void> {
    await this.#save();
    const poll = this.o.pollIntervalMs ?? 30_000;
    const quietly = (p: Promise<void>) =>
      p.catch((err: unknown) => {
        if (!(err instanceof Unreachable)) throw err;
      });
    if (!this.state.token) {
      await quietly(this.register());
      if (!this.state.token) this.#every(poll, () => this.register());
    }
    this.#every(this.o.heartbeatIntervalMs ?? 60_000, () => this.heartbeat());
    this.#every(poll, () => this.checkForUpdates());
    if (this.state.token) {
      this.emit('approved');
      await quietly(this.heartbeat());
      await quietly(this.checkForUpdates());
    }
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    for (const t of this.#timers) clearInterval(t);
    this.#timers.clear();
  }

  /** Registers, or presents the claim to collect the token once approved. */
  async register(): Promise<void> {
    if (this.state.token || this.#stopped) return;
    const res = await this.#call<{
      status?: string;
      claim_token?: string;
      device_token?: string;
      error?: string;
      details?: string;
    }>('POST', '/register-device', {
      device_id: this.o.deviceId,
      name: this.o.name ?? this.o.deviceId,
      ip: this.o.ip ?? '127.0.0.1',
      extensions: this.#extensions(),
      ...(this.state.claim ? { claim_token: this.state.claim } : {}),
    });
    if (res.status === 202) {
      if (res.body.claim_token) this.state.claim = res.body.claim_token;
      await this.#save();
      this.emit('pending');
      return;
    }
    if (res.status === 200 && res.body.device_token) {
      this.state.token = res.body.device_token;
      delete this.state.claim;
      await this.#save();
      this.emit('approved');
      await this.heartbeat();
      await this.checkForUpdates();
      return;
    }
    this.#refused(res.status, res.body);
  }

  async heartbeat(): Promise<void> {
    if (!this.state.token || this.#stopped) return;
    const res = await this.#call('POST', '/heartbeat', {
      device_id: this.o.deviceId,
      status: 'online',
      timestamp: new Date().toISOString(),
    });
    if (res.status !== 200) this.#refused(res.status, res.body);
  }

  /** Polls `/updates` and installs every compatible update offered, one at a time. */
  async checkForUpdates(): Promise<void> {
    if (!this.state.token || this.#stopped || this.#busy) return;
    this.#busy = true;
    try {
      const res = await this.#call<{ updates: UpdateOffer[] }>('GET', '/updates');
      if (res.status !== 200) return void this.#refused(res.status, res.body);
      for (const offer of res.body.updates) {
        if (!offer.update_available || !offer.download_url || !offer.sha256) continue;
        if (this.#hung.has(`${offer.name}@${offer.available_version}`)) continue;
        if (!offer.is_compatible) {
          this.emit('incompatible', offer);
          continue;
        }
        await this.#install(offer);
      }
    } finally {
      this.#busy = false;
    }
  }

  async #status(offer: UpdateOffer, status: string, extra: Record<string, unknown> = {}): Promise<void> {
    const res = await this.#call('POST', '/update-status', {
      device_id: this.o.deviceId,
      extension_id: offer.extension_id,
      version: offer.available_version,
      status,
      timestamp: new Date().toISOString(),
      ...extra,
    });
    if (res.status !== 200) this.emit('warning', `update-status ${status} answered ${res.status}`);
  }

  async #install(offer: UpdateOffer): Promise<void> {
    const faults = this.o.faults?.() ?? {};
    const version = offer.available_version;
    const bad = this.o.bad?.version === version ? this.o.bad.mode : undefined;
    this.emit('update_begin', { name: offer.name, version });
    await this.#status(offer, 'in_progress', { progress: 0 });
    if (bad === 'hang') {
      this.#hung.add(`${offer.name}@${version}`);
      return void this.emit('hung', { name: offer.name, version });
    }
    const fail = async (status: 'failed' | 'rolled_back', error: string) => {
      await this.#status(offer, status, { error });
      this.emit('update_failed', { name: offer.name, version, status, error });
    };
    // 1. download and verify.
    const res = await fetch(offer.download_url!, { headers: { authorization: `Bearer ${this.state.token}` } });
    if (!res.ok) return fail('failed', `download failed: HTTP ${res.status}`);
    const data = Buffer.from(await res.arrayBuffer());
    if (faults.corrupt && data.length) data[data.length >> 1] ^= 0xff;
    const sha256 = createHash('sha256').update(data).digest('hex');
    const header = res.headers.get('x-checksum-sha256');
    if (sha256 !== offer.sha256 || (header && header !== sha256))
      return fail('failed', `sha256 mismatch: expected ${offer.sha256}, got ${sha256}`);
    if (bad === 'fail')
      return fail('failed', `pre-install check failed for ${offer.name} ${version} (bad release rehearsal)`);
    await this.#status(offer, 'in_progress', { progress: 50 });
    // 2. back up the current extension.
    const dir = path.join(this.o.stateDir, 'extensions', offer.name);
    const current = path.join(dir, 'current');
    const backup = path.join(dir, 'backup');
    await mkdir(current, { recursive: true });
    await rm(backup, { recursive: true, force: true });
    await cp(current, backup, { recursive: true });
    // 3. extract and install; 4. "restart" — a failure restores the backup.
    try {
      const files = await extractZip(data);
      const manifest = parseManifest(JSON.parse(files.get(MANIFEST_NAME)?.toString('utf8') ?? 'null'));
      if (manifest.extension !== offer.name || manifest.version !== version)
        throw new Error(`package is ${manifest.extension} ${manifest.version}, expected ${offer.name} ${version}`);
      await rm(current, { recursive: true, force: true });
      for (const [name, bytes] of files) {
        const target = path.join(current, name);
        if (!target.startsWith(current + path.sep)) throw new Error(`unsafe path ${name} in package`);
        await mkdir(path.dirname(target), { recursive: true });
        await writeFile(target, bytes);
      }
      if (faults.rejectInstall) throw new Error('install script failed (simulated)');
      if (bad === 'rollback')
        throw new Error(`${offer.name} ${version} did not start after the restart (bad release rehearsal)`);
    } catch (err) {
      await rm(current, { recursive: true, force: true });
      await rename(backup, current);
      return fail('rolled_back', `install failed, backup restored: ${(err as Error).message}`);
    }
    this.state.versions[offer.name] = version;
    await this.#save();
    await this.#status(offer, 'success');
    this.emit('update_succeeded', { name: offer.name, version });
  }
}

/** `fleethub-device simulate --protocol main-server`: `--url` is the API listener; each device runs extension `firmware` at `--version`. */
registerSimulatorProtocol({
  name: 'main-server',
  clientCertificates: false,
  createDevice(spec, _shared, report) {
    const tokenFile = path.join(spec.stateDir, 'main-server-token');
    const device = new MainServerDevice({
      url: spec.url.replace(/^ws/, 'http').replace(/\/socket.*$/, ''),
      deviceId: spec.serial,
      stateDir: spec.stateDir,
      extensions: [{ name: process.env.FLEETHUB_SIM_EXTENSION ?? 'firmware', version: spec.firmware.version }],
      token: existsSync(tokenFile) ? readFileSync(tokenFile, 'utf8').trim() : undefined,
      ...(spec.bad ? { bad: spec.bad } : {}),
      pollIntervalMs: 2000,
      heartbeatIntervalMs: 60_000,
      faults: () => {
        const f = spec.faults();
        return f ? { corrupt: f.corrupt, rejectInstall: f.rejectInstall } : undefined;
      },
    });
    const up = () => {
      report({ type: 'connected' });
      report({ type: 'joined' });
    };
    device.on('approved', up);
    device.on('reachable', up);
    device.on('unreachable', () => report({ type: 'disconnected' }));
    device.on('connect_error', ({ kind, message }: ConnectionFailure) =>
      report({ type: 'connect_failed', kind, message }),
    );
    device.on('update_begin', ({ version }: { version: string }) => report({ type: 'update_begin', version }));
    device.on('update_succeeded', ({ version }: { version: string }) => report({ type: 'update_succeeded', version }));
    device.on('update_failed', ({ version, status, error }: { version: string; status: string; error: string }) =>
      report(
        status === 'rolled_back'
          ? { type: 'update_rolled_back', version }
          : { type: 'update_failed', version, errors: [error] },
      ),
    );
    device.on('hung', ({ version }: { version: string }) => report({ type: 'update_hung', version }));
    device.on('warning', () => undefined);
    return { start: () => device.start(), stop: () => device.stop() };
  },
});
