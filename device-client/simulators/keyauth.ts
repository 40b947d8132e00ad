/**
 * A simulated keyauth client: keeps an RSA-2048 key in `stateDir`, authorises with 101 (on 102
 * it retries until an operator approves the key), then over AES-256-GCM/RSA-OAEP envelopes
 * reports `status`, polls `check_update`, downloads the offered URL, verifies its sha256,
 * "installs" it and reports progress / error / success. Heartbeats keep it online.
 */
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { open, seal } from '../../shared/keyauth-envelope.ts';
import { type ConnectionFailure, describeError, notTheProtocol, quoteAnswer } from '../connection-failure.ts';
import type { BadRelease } from '../index.ts';
import { registerSimulatorProtocol } from '../simulator.ts';

export interface KeyauthClientOptions {
  host: string;
  port: number;
  stateDir: string;
  version: string;
  component?: string;
  name?: string;
  /** Resend 101 this often while the key is pending; poll check_update this often once authorised. */
  pollIntervalMs?: number;
  heartbeatIntervalMs?: number;
  /** Wait this long before reconnecting (default 1 s). */
  reconnectMs?: number;
  /** Fail a request the server does not answer within this long (default 10 s). */
  replyTimeoutMs?: number;
  faults?: () => { corrupt?: boolean } | undefined;
  /**
   * A bad release (by the offered version): `fail` reports an error with the reason; `rollback`
   * installs it, the new version does not start and the client goes back to the old one, and
   * reports that as an error (the protocol has no rollback report); `hang` reports progress 0
   * and never again (heartbeats go on).
   */
  bad?: BadRelease;
}

type Waiter = { resolve(reply: Reply): void; reject(err: Error): void };

/** The port took a request and did not answer it. */
class NoAnswer extends Error {}

/** The server answered the authorisation, and not with a key. */
class Refused extends Error {
  constructor(readonly failure: ConnectionFailure) {
    super(failure.message);
  }
}

/** One keyauth line, or undefined when it is not a JSON object with a numeric `code`. */
function parseReply(line: string): Reply | undefined {
  try {
    const value = JSON.parse(line) as unknown;
    if (value && typeof value === 'object' && ('enc' in value || typeof (value as Reply).code === 'number'))
      return value as Reply;
  } catch {
    // not JSON
  }
  return undefined;
}

interface Reply {
  code: number;
  data?: Record<string, unknown>;
  error?: { msg: string; type: string };
}

export class KeyauthClient extends EventEmitter {
  readonly o: KeyauthClientOptions;
  version: string;
  readonly privateKey: KeyObject;
  readonly publicKeyPem: string;
  socket: net.Socket | undefined;
  serverKey: KeyObject | undefined;
  #buffer = '';
  #waiting: Waiter[] = [];
  #timers = new Set<NodeJS.Timeout>();
  #stopped = false;
  #busy = false;
  /** Versions this client fell silent installing (bad release, mode `hang`): never tried again. */
  readonly #hung = new Set<string>();

  constructor(options: KeyauthClientOptions) {
    super();
    this.o = options;
    const keyFile = path.join(options.stateDir, 'keyauth-key.pem');
    const versionFile = path.join(options.stateDir, 'keyauth-version');
    const pem = existsSync(keyFile)
      ? readFileSync(keyFile, 'utf8')
      : generateKeyPairSync('rsa', { modulusLength: 2048 })
          .privateKey.export({ type: 'pkcs8', format: 'pem' })
          .toString();
    this.privateKey = createPrivateKey(pem);
    this.publicKeyPem = createPublicKey(this.privateKey).export({ type: 'spki', format: 'pem' }).toString();
    this.version = existsSync(versionFile) ? readFileSync(versionFile, 'utf8').trim() : options.version;
    if (!existsSync(keyFile))
      void mkdir(options.stateDir, { recursive: true }).then(() => writeFile(keyFile, pem, { mode: 0o600 }));
  }

  get component(): string {
    return this.o.component ?? 'firmware';
  }

  /**
   * Sends one line and waits for the one response it gets (at most `replyTimeoutMs`: a port that
   * takes the line and never answers fails the attempt, see `#connect`).
   */
  #request(message: unknown): Promise<Reply> {
    return new Promise((resolve, reject) => {
      const socket = this.socket;
      if (!socket || socket.destroyed) return reject(new Error('not connected'));
      const timer = setTimeout(() => {
        this.#waiting = this.#waiting.filter((w) => w !== waiter);
        reject(new NoAnswer(`no answer within ${this.o.replyTimeoutMs ?? 10_000} ms`));
      }, this.o.replyTimeoutMs ?? 10_000);
      const waiter: Waiter = {
        resolve: (reply) => {
          clearTimeout(timer);
          resolve(reply);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      this.#waiting.push(waiter);
      socket.write(`${JSON.stringify(message)}\n`);
    });
  }

  /** An encrypted action; the response is opened with our key. */
  async action(action: string, data: Record<string, unknown> = {}): Promise<Reply> {
    if (!this.serverKey) throw new Error('not authorised');
    const raw = await this.#request(seal(this.serverKey, { action, data }));
    return ('enc' in raw ? open(this.privateKey, raw) : raw) as Reply;
  }

  async start(): Promise<void> {
    await mkdir(this.o.stateDir, { recursive: true });
    await this.#connect();
  }

  /**
   * One connection: connect, then authorise. A failure (refused, a port that answers something
   * other than keyauth lines, or nothing, or refuses the key) emits `connect_error` with its
   * reason; the socket's `close` schedules the next attempt.
   */
  async #connect(): Promise<void> {
    if (this.#stopped) return;
    const socket = net.connect({ host: this.o.host, port: this.o.port });
    this.socket = socket;
    this.#buffer = '';
    let failure: ConnectionFailure | undefined;
    const fail = (f: ConnectionFailure) => {
      if (failure || this.serverKey || this.#stopped) return;
      failure = f;
      this.emit('connect_error', f);
      socket.destroy();
    };
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.#buffer += chunk;
      for (let nl = this.#buffer.indexOf('\n'); nl >= 0; nl = this.#buffer.indexOf('\n')) {
        const line = this.#buffer.slice(0, nl);
        this.#buffer = this.#buffer.slice(nl + 1);
        const reply = parseReply(line);
        if (!reply) {
          const f = notTheProtocol('keyauth', `it answered ${quoteAnswer(line)}, not a JSON line`);
          for (const w of this.#waiting.splice(0)) w.reject(new Error(f.message));
          return fail(f);
        }
        this.#waiting.shift()?.resolve(reply);
      }
      // No newline after 64 KiB: not a keyauth line either.
      if (this.#buffer.length > 65_536) fail(notTheProtocol('keyauth', 'it sent 64 KiB without a line break'));
    });
    socket.on('error', (err) => fail(describeError(err)));
    socket.on('close', () => {
      const authorised = this.serverKey !== undefined;
      if (!authorised && this.#buffer)
        fail(notTheProtocol('keyauth', `it answered ${quoteAnswer(this.#buffer)} and closed the connection`));
      if (!authorised)
        fail({ kind: 'connection closed', message: 'the server closed the connection before authorising the key' });
      this.serverKey = undefined;
      for (const w of this.#waiting.splice(0)) w.reject(new Error('disconnected'));
      if (authorised) this.emit('disconnected');
      if (!this.#stopped) this.#later(this.o.reconnectMs ?? 1000, () => this.#connect());
    });
    const connected = await new Promise<boolean>((resolve) => {
      socket.once('connect', () => resolve(true));
      socket.once('close', () => resolve(false));
    });
    if (!connected) return;
    await this.#authorise().catch((err: unknown) =>
      fail(
        err instanceof Refused
          ? err.failure
          : err instanceof NoAnswer
            ? notTheProtocol('keyauth', `${err.message} to the authorisation request (101)`)
            : { kind: 'other', message: (err as Error).message },
      ),
    );
  }

  #later(ms: number, fn: () => Promise<void>): void {
    const t = setTimeout(() => {
      this.#timers.delete(t);
      void fn().catch((err: unknown) => this.emit('warning', (err as Error).message));
    }, ms);
    this.#timers.add(t);
  }

  async #authorise(): Promise<void> {
    if (this.#stopped || !this.socket || this.socket.destroyed) return;
    const reply = await this.#request({
      code: 101,
      data: { key: this.publicKeyPem, ...(this.o.name ? { name: this.o.name } : {}) },
    });
    if (reply.code === 102) {
      this.emit('pending', reply);
      this.#later(this.o.pollIntervalMs ?? 30_000, () => this.#authorise());
      return;
    }
    if (reply.code !== 103 || typeof reply.data?.key !== 'string') {
      const why = reply.error ? `${reply.error.type}: ${reply.error.msg}` : JSON.stringify(reply).slice(0, 200);
      throw new Refused({
        kind: `keyauth ${reply.code}`,
        message: `the server answered 101 with ${reply.code} ${why}`,
      });
    }
    this.serverKey = createPublicKey(reply.data.key);
    this.emit('authorised');
    await this.action('status', { version: this.version, component: this.component });
    await this.checkForUpdate();
    const poll = setInterval(() => void this.checkForUpdate().catch(() => undefined), this.o.pollIntervalMs ?? 30_000);
    const beat = setInterval(
      () => void this.action('heartbeat').catch(() => undefined),
      this.o.heartbeatIntervalMs ?? 60_000,
    );
    this.#timers.add(poll).add(beat);
    this.socket.once('close', () => {
      clearInterval(poll);
      clearInterval(beat);
    });
  }

  /** Asks for an update and installs it when one is offered. */
  async checkForUpdate(): Promise<void> {
    if (!this.serverKey || this.#busy) return;
    this.#busy = true;
    try {
      const reply = await this.action('check_update', { version: this.version, component: this.component });
      const update = reply.data?.update as
        | { version: string; url: string; sha256: string; size: number }
        | null
        | undefined;
      if (reply.code !== 200 || !update || this.#hung.has(update.version)) return;
      const bad = this.o.bad?.version === update.version ? this.o.bad.mode : undefined;
      const report = (data: Record<string, unknown>) =>
        this.action('report', { component: this.component, version: update.version, ...data });
      this.emit('update_begin', update);
      await report({ type: 'progress', percent: 0 });
      if (bad === 'hang') {
        this.#hung.add(update.version);
        return void this.emit('hung', { version: update.version });
      }
      const res = await fetch(update.url);
      if (!res.ok) {
        await report({ type: 'error', message: `download failed: HTTP ${res.status}` });
        return void this.emit('update_failed', { version: update.version, error: `HTTP ${res.status}` });
      }
      const data = Buffer.from(await res.arrayBuffer());
      if (this.o.faults?.()?.corrupt && data.length) data[0] ^= 0xff;
      const sha256 = createHash('sha256').update(data).digest('hex');
      if (sha256 !== update.sha256) {
        const error = `sha256 mismatch: expected ${update.sha256}, got ${sha256}`;
        await report({ type: 'error', message: error });
        return void this.emit('update_failed', { version: update.version, error });
      }
      await report({ type: 'progress', percent: 100, bytes: data.length, total: data.length });
      if (bad) {
        const error =
          bad === 'fail'
            ? `pre-install check failed for ${update.version} (bad release rehearsal)`
            : `${update.version} did not start; rolled back to ${this.version} (bad release rehearsal)`;
        await report({ type: 'error', message: error });
        return void this.emit('update_failed', { version: update.version, error });
      }
      await writeFile(path.join(this.o.stateDir, 'keyauth-image.bin'), data);
      await writeFile(path.join(this.o.stateDir, 'keyauth-version'), update.version);
      this.version = update.version;
      const done = await report({ type: 'success' });
      this.emit('update_succeeded', { version: update.version, state: done.data?.state });
    } finally {
      this.#busy = false;
    }
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    this.socket?.destroy();
  }
}

/** `fleethub-device simulate --protocol keyauth --url tcp://host:4002`. */
registerSimulatorProtocol({
  name: 'keyauth',
  clientCertificates: false,
  createDevice(spec, _shared, report) {
    const url = new URL(spec.url.replace(/^(wss?|https?):/, 'tcp:'));
    const client = new KeyauthClient({
      host: url.hostname,
      port: Number(url.port || 4002),
      stateDir: spec.stateDir,
      version: spec.firmware.version,
      name: spec.serial,
      pollIntervalMs: 2000,
      faults: () => ({ corrupt: spec.faults()?.corrupt }),
      ...(spec.bad ? { bad: spec.bad } : {}),
    });
    client.on('authorised', () => {
      report({ type: 'connected' });
      report({ type: 'joined' });
    });
    client.on('disconnected', () => report({ type: 'disconnected' }));
    client.on('connect_error', ({ kind, message }: ConnectionFailure) =>
      report({ type: 'connect_failed', kind, message }),
    );
    client.on('update_begin', ({ version }: { version: string }) => report({ type: 'update_begin', version }));
    client.on('update_succeeded', ({ version }: { version: string }) => report({ type: 'update_succeeded', version }));
    client.on('update_failed', ({ version, error }: { version: string; error: string }) =>
      report({ type: 'update_failed', version, errors: [error] }),
    );
    client.on('hung', ({ version }: { version: string }) => report({ type: 'update_hung', version }));
    client.on('warning', () => undefined);
    return { start: () => client.start(), stop: () => client.stop() };
  },
});
