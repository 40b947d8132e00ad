/**
 * A simulated GRiSP board that behaves like grisp_connect + grisp_updater: offers `grisp-io-v1`,
 * drops the link after 60 s without a server ping, answers `get system_info`, `post
 * start_update|validate|reboot|cancel`, `log.get`, takes `log.sync`; downloads `MANIFEST.sealed`
 * and the blocks it lists, verifies each sha256, sends throttled `update` events, and needs a
 * reboot and a `validate` before the new image is permanent (an unvalidated image is dropped on
 * the next reboot). The simulator's manifest is JSON: `{version, relname, blocks:[{path, sha256, size}]}`
 * (the server serves MANIFEST.sealed opaquely; real boards use grisp_updater's sealed format).
 */
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import https from 'node:https';
import { pack } from 'tar-stream';
import WebSocket from 'ws';
import {
  type ConnectionFailure,
  describeError,
  httpRefusal,
  notTheProtocol,
  readRefusal,
} from '../connection-failure.ts';
import type { DeviceTls } from '../download.ts';
import type { BadRelease } from '../index.ts';
import { registerSimulatorProtocol } from '../simulator.ts';

export interface GrispBoardOptions {
  /** `wss://host:port/grisp-connect/ws` (a `.../socket...` URL is rewritten to this path). */
  url: string;
  tls: DeviceTls;
  serial: string;
  relname?: string;
  version: string;
  /** Drop the link when no ping came for this long (grisp_connect: 60 s). */
  pingTimeoutMs?: number;
  /** Reconnect delay after a drop or reboot. */
  reconnectMs?: number;
  /** Offer no subprotocol (to test the server's refusal). */
  noSubprotocol?: boolean;
  /** Minimum time between two progress events. */
  progressThrottleMs?: number;
  /** Error codes to answer instead of the real behaviour, once each. */
  faults?: { startUpdate?: number; validate?: number };
  /**
   * A bad release (by the manifest's version): `fail` sends an `error` event with a reason, `hang`
   * one progress event and then nothing, `rollback` installs it, and the reboot into it fails, so
   * the board comes back on the previous relvsn.
   */
  bad?: BadRelease;
}

type Pending = { resolve(v: unknown): void; reject(e: Error): void };

export class GrispBoard extends EventEmitter {
  readonly o: Required<Omit<GrispBoardOptions, 'faults' | 'noSubprotocol' | 'bad'>> &
    Pick<GrispBoardOptions, 'faults' | 'noSubprotocol' | 'bad'>;
  ws: WebSocket | undefined;
  /** What the board runs, and what it would boot next. */
  running: string;
  #previous: string | undefined;
  #installed: { version: string; bootable: boolean } | undefined;
  actionRequired: 'reboot' | 'validate' | null = null;
  updateStatus: 'ready' | 'updating' | 'failed' | 'updated' = 'ready';
  #logs: Array<[number, Record<string, unknown>]> = [];
  #logSeq = 0;
  #stopped = false;
  #pingTimer: NodeJS.Timeout | undefined;
  #reconnectTimer: NodeJS.Timeout | undefined;
  #pending = new Map<string, Pending>();
  #nextId = 1;
  /** Every request the server sent (method, params), for tests. */
  readonly received: Array<{ method: string; params: Record<string, unknown> }> = [];
  /** Every update event sent. */
  readonly updateEvents: Array<Record<string, unknown>> = [];
  pings = 0;

  constructor(options: GrispBoardOptions) {
    super();
    this.o = {
      relname: 'fleethub_sim',
      pingTimeoutMs: 60_000,
      reconnectMs: 200,
      progressThrottleMs: 100,
      ...options,
      url: grispUrl(options.url),
    };
    this.running = options.version;
  }

  start(): Promise<void> {
    this.#stopped = false;
    return this.#connect();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#pingTimer);
    clearTimeout(this.#reconnectTimer);
    const ws = this.ws;
    if (ws && ws.readyState !== WebSocket.CLOSED) {
      await new Promise<void>((resolve) => {
        ws.once('close', () => resolve());
        ws.terminate();
      });
    }
  }

  /** Adds a log event to the board's buffer. */
  log(level: string, msg: string): void {
    this.#logs.push([++this.#logSeq, { meta: { time: Date.now() * 1000, file: null, mfa: null }, msg, level }]);
  }

  /** Sends a request to the server (e.g. `post {type:"ping"}`). */
  call(method: string, params: Record<string, unknown>): Promise<unknown> {
    const id = `-57646075230342${this.#nextId++}`;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#send({ jsonrpc: '2.0', id, method, params });
    });
  }

  /** Sends raw text (tests of the server's JSON-RPC error handling). */
  sendRaw(text: string): void {
    this.ws?.send(text);
  }

  /**
   * One connection attempt. A failed attempt emits `connect_error` with its reason; the link's
   * `close` (after a failure or a drop) schedules the one next attempt.
   */
  #connect(): Promise<void> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.o.url, this.o.noSubprotocol ? [] : ['grisp-io-v1'], {
        cert: this.o.tls.cert,
        key: this.o.tls.key,
        ca: this.o.tls.ca,
        ...(this.o.tls.servername ? { servername: this.o.tls.servername } : {}),
        perMessageDeflate: false,
      } as WebSocket.ClientOptions);
      this.ws = ws;
      let failure: ConnectionFailure | undefined;
      let opened = false;
      const fail = (f: ConnectionFailure, err: Error) => {
        if (failure) return;
        failure = f;
        if (!this.#stopped) this.emit('connect_error', f);
        reject(err);
      };
      ws.once('open', () => {
        if (ws.protocol !== 'grisp-io-v1') {
          const message = `the server chose subprotocol ${JSON.stringify(ws.protocol)}, not grisp-io-v1`;
          fail(notTheProtocol('grisp-io-v1', message), new Error(message));
          return void ws.terminate();
        }
        opened = true;
        this.#armPingWatchdog();
        this.emit('connected');
        resolve();
      });
      ws.once('unexpected-response', (_req, res) => {
        void readRefusal(res).then(({ status, reason }) => {
          fail(
            httpRefusal(status, reason),
            Object.assign(new Error(`upgrade refused with HTTP ${status}: ${reason}`), { statusCode: status }),
          );
          ws.terminate();
        });
      });
      ws.on('error', (err) => {
        if (!opened) fail(describeError(err), err);
      });
      ws.on('ping', () => {
        this.pings++;
        this.#armPingWatchdog();
      });
      ws.on('message', (data) => this.#onFrame(data.toString()));
      ws.on('close', (code: number) => {
        clearTimeout(this.#pingTimer);
        for (const p of this.#pending.values()) p.reject(new Error('disconnected'));
        this.#pending.clear();
        if (!failure) this.emit('disconnected', code);
        clearTimeout(this.#reconnectTimer);
        if (!this.#stopped)
          this.#reconnectTimer = setTimeout(() => this.#connect().catch(() => undefined), this.o.reconnectMs);
      });
    });
  }

  #armPingWatchdog(): void {
    clearTimeout(this.#pingTimer);
    this.#pingTimer = setTimeout(() => {
      // grisp_connect: no ping for 60 s means the link is dead.
      this.emit('ping_timeout');
      this.ws?.terminate();
    }, this.o.pingTimeoutMs);
  }

  #send(message: unknown): void {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  #onFrame(text: string): void {
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch {
      return;
    }
    const messages = Array.isArray(value) ? value : [value];
    for (const m of messages as Array<Record<string, unknown>>) {
      if (typeof m.method === 'string') {
        const params = (m.params ?? {}) as Record<string, unknown>;
        if ('id' in m) {
          this.received.push({ method: m.method, params });
          void this.#answer(m.method, params).then((reply) => this.#send({ jsonrpc: '2.0', id: m.id, ...reply }));
        } else if (m.method === 'log.sync') {
          const seq = Number(params.seq);
          this.#logs = this.#logs.filter(([s]) => s > seq);
        }
      } else if (typeof m.id === 'string') {
        const p = this.#pending.get(m.id);
        if (!p) {
          this.emit('server_message', m);
          continue;
        }
        this.#pending.delete(m.id);
        if ('error' in m)
          p.reject(
            Object.assign(new Error(String((m.error as { message?: unknown }).message)), {
              code: (m.error as { code?: unknown }).code,
            }),
          );
        else p.resolve(m.result);
      } else {
        this.emit('server_message', m);
      }
    }
  }

  async #answer(
    method: string,
    params: Record<string, unknown>,
  ): Promise<{ result: unknown } | { error: Record<string, unknown> }> {
    const err = (code: number, message: string, data?: unknown) => ({
      error: { code, message, ...(data !== undefined ? { data } : {}) },
    });
    if (method === 'log.get') {
      const max = Number(params.max_batch_size ?? 100);
      return { result: { events: this.#logs.slice(0, max), dropped: 0 } };
    }
    if (method === 'get' && params.type === 'system_info') {
      return {
        result: {
          relname: this.o.relname,
          relvsn: this.running,
          update_enabled: true,
          update_status: this.updateStatus,
          action_required: this.actionRequired,
          boot_source: { type: 'system', id: 0 },
          hardware: { serial: this.o.serial },
        },
      };
    }
    if (method !== 'post') return err(-32601, 'Method not found');
    switch (params.type) {
      case 'start_update': {
        if (typeof params.url !== 'string') return err(-32603, 'Internal error');
        const fault = this.o.faults?.startUpdate;
        if (fault !== undefined) {
          delete this.o.faults!.startUpdate;
          // -12: the board discovers it booted an image nobody validated yet.
          if (fault === -12) {
            this.actionRequired = 'validate';
            this.#previous = this.running;
          }
          return err(
            fault,
            { [-10]: 'grisp_updater_unavailable', [-11]: 'already_updating', [-12]: 'boot_system_not_validated' }[
              fault
            ] ?? 'error',
          );
        }
        if (this.actionRequired === 'validate') return err(-12, 'boot_system_not_validated');
        if (this.updateStatus === 'updating') return err(-11, 'already_updating');
        this.updateStatus = 'updating';
        void this.#install(params.url);
        return { result: 'ok' };
      }
      case 'reboot':
        setTimeout(() => this.#reboot(), 20);
        return { result: 'ok' };
      case 'validate': {
        const fault = this.o.faults?.validate;
        if (fault !== undefined) {
          delete this.o.faults!.validate;
          return err(
            fault,
            fault === -13 ? 'validate_from_unbooted' : 'grisp_updater_unavailable',
            fault === -13 ? 0 : undefined,
          );
        }
        if (this.actionRequired !== 'validate') return err(-13, 'validate_from_unbooted', 0);
        this.actionRequired = null;
        this.#previous = undefined;
        this.updateStatus = 'ready';
        this.emit('validated', this.running);
        return { result: 'ok' };
      }
      case 'cancel':
        this.updateStatus = 'ready';
        return { result: 'ok' };
      default:
        return err(-32601, 'Method not found');
    }
  }

  /** Downloads MANIFEST.sealed and its blocks, verifying each sha256, with throttled progress events. */
  async #install(url: string): Promise<void> {
    let lastProgress = 0;
    const event = (e: Record<string, unknown>) => {
      this.updateEvents.push(e);
      this.#send({ jsonrpc: '2.0', method: 'update', params: { type: 'software_update_event', ...e } });
    };
    let version: string | undefined;
    try {
      const manifest = JSON.parse((await this.#fetch(`${url}/MANIFEST.sealed`)).toString('utf8')) as {
        version: string;
        blocks: Array<{ path: string; sha256: string; size: number }>;
      };
      version = manifest.version;
      const total = manifest.blocks.reduce((n, b) => n + b.size, 0) || 1;
      const bad = this.o.bad?.version === manifest.version ? this.o.bad.mode : undefined;
      if (bad === 'hang') {
        event({ event: 'progress', percentage: 0 });
        this.emit('hung', manifest.version);
        return;
      }
      if (bad === 'fail')
        throw new Error(`${manifest.version} failed its image check (bad release rehearsal, --bad-mode fail)`);
      let done = 0;
      for (const block of manifest.blocks) {
        const bytes = await this.#fetch(`${url}/${block.path}`);
        const digest = createHash('sha256').update(bytes).digest('hex');
        if (digest !== block.sha256)
          throw new Error(`block ${block.path} has sha256 ${digest}, the manifest says ${block.sha256}`);
        done += bytes.length;
        if (Date.now() - lastProgress >= this.o.progressThrottleMs) {
          lastProgress = Date.now();
          event({ event: 'progress', percentage: Math.floor((done / total) * 100) });
        }
      }
      this.#installed = { version: manifest.version, bootable: bad !== 'rollback' };
      this.updateStatus = 'updated';
      this.actionRequired = 'reboot';
      event({ event: 'done', message: 'update installed' });
      this.emit('installed', manifest.version);
    } catch (e) {
      this.updateStatus = 'failed';
      event({ event: 'error', message: 'update_failed', reason: (e as Error).message });
      this.emit('install_failed', (e as Error).message, version);
    }
  }

  #fetch(url: string): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const req = https.get(
        url,
        { cert: this.o.tls.cert, key: this.o.tls.key, ca: this.o.tls.ca, servername: this.o.tls.servername },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () =>
            res.statusCode === 200
              ? resolve(Buffer.concat(chunks))
              : reject(new Error(`GET ${new URL(url).pathname.split('/').pop()} answered ${res.statusCode}`)),
          );
          res.on('error', reject);
        },
      );
      req.on('error', reject);
    });
  }

  #reboot(): void {
    if (this.#installed && !this.#installed.bootable) {
      // The new image does not boot: the bootloader falls back to the running one.
      this.emit('rolled_back', this.#installed.version);
      this.#installed = undefined;
      this.actionRequired = null;
    } else if (this.#installed) {
      // Boot the new image; it stays only if validated before the next reboot.
      this.#previous = this.running;
      this.running = this.#installed.version;
      this.#installed = undefined;
      this.actionRequired = 'validate';
    } else if (this.actionRequired === 'validate' && this.#previous) {
      // Not validated: the bootloader goes back to the previous image.
      this.running = this.#previous;
      this.#previous = undefined;
      this.actionRequired = null;
    }
    this.updateStatus = this.actionRequired === 'validate' ? 'updated' : 'ready';
    this.emit('rebooting', this.running);
    this.ws?.terminate();
  }
}

/** A GRiSP package as the server accepts it: a tar with a JSON MANIFEST.sealed and `blocks/<n>.bin`. */
export async function buildGrispPackage(o: {
  version: string;
  relname?: string;
  blocks: Buffer[];
  corruptBlock?: number;
  leading?: Array<{ name: string; data: Buffer }>;
}): Promise<Buffer> {
  const blocks = o.blocks.map((data, i) => ({
    path: `blocks/${i}.bin`,
    sha256: createHash('sha256').update(data).digest('hex'),
    size: data.length,
  }));
  const manifest = Buffer.from(JSON.stringify({ version: o.version, relname: o.relname ?? 'fleethub_sim', blocks }));
  const p = pack();
  const chunks: Buffer[] = [];
  p.on('data', (c: unknown) => void chunks.push(c as Buffer));
  const ended = new Promise<void>((resolve, reject) => {
    p.on('end', () => resolve());
    p.on('error', reject);
  });
  for (const extra of o.leading ?? []) p.entry({ name: extra.name }, extra.data);
  p.entry({ name: 'MANIFEST.sealed' }, manifest);
  o.blocks.forEach((data, i) => {
    const bytes = o.corruptBlock === i ? Buffer.concat([data, Buffer.from('x')]) : data;
    p.entry({ name: `blocks/${i}.bin` }, bytes);
  });
  p.finalize();
  await ended;
  return Buffer.concat(chunks);
}

function grispUrl(url: string): string {
  const u = new URL(url.replace(/^https:/, 'wss:'));
  if (!u.pathname.startsWith('/grisp-connect')) u.pathname = '/grisp-connect/ws';
  u.search = '';
  return u.toString();
}

registerSimulatorProtocol({
  name: 'grisp',
  createDevice(spec, _shared, report) {
    const board = new GrispBoard({
      url: spec.url,
      tls: spec.tls,
      serial: spec.serial,
      version: spec.firmware.version,
      reconnectMs: 1000 + Math.floor(Math.random() * 1000),
      ...(spec.bad ? { bad: spec.bad } : {}),
    });
    let updating: string | undefined;
    board.on('connected', () => {
      report({ type: 'connected' });
      report({ type: 'joined' });
    });
    board.on('disconnected', () => report({ type: 'disconnected' }));
    board.on('connect_error', ({ kind, message }: ConnectionFailure) =>
      report({ type: 'connect_failed', kind, message }),
    );
    board.on('installed', (version: string) => {
      updating = version;
      report({ type: 'update_begin', version });
    });
    board.on('install_failed', (reason: string, version?: string) =>
      report({ type: 'update_failed', version: version ?? updating ?? '?', errors: [reason] }),
    );
    board.on('validated', (version: string) => report({ type: 'update_succeeded', version }));
    board.on('rolled_back', (version: string) => report({ type: 'update_rolled_back', version }));
    board.on('hung', (version: string) => {
      report({ type: 'update_begin', version });
      report({ type: 'update_hung', version });
    });
    return { start: () => board.start().catch(() => undefined), stop: () => board.stop() };
  },
});
