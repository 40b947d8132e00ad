/**
 * A simulated WiFiDogX gateway with apfree-wifidog's hand-written WebSocket reader: it reads
 * through a 1024-byte buffer, one frame per read, and fails loudly when a read holds a frame
 * larger than that, two frames, or a partial frame. It sends `connect` then a `heartbeat` every
 * 60 s, answers get_firmware_info, firmware_upgrade (downloads the image, "reboots" into the
 * version the image declares), kickoff; takes auth and tmp_pass silently. Simulator images start
 * with `WIFIDOGX-SIM-FIRMWARE version=<v>\n` (see `simulatorImage`).
 */
import { createHash, randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import tls from 'node:tls';
import {
  type ConnectionFailure,
  describeError,
  httpRefusal,
  notTheProtocol,
  quoteAnswer,
  refusalReason,
} from '../connection-failure.ts';
import type { BadRelease } from '../index.ts';
import { registerSimulatorProtocol } from '../simulator.ts';

export const READ_BUFFER_BYTES = 1024;

export interface GatewayOptions {
  /** `ws(s)://host:port/ws/wifidogx`. */
  url: string;
  deviceId: string;
  version: string;
  /** Gateways reported in connect/heartbeat. */
  gateways?: Array<{ gw_id: string; auth_mode: number }>;
  heartbeatMs?: number;
  reconnectMs?: number;
  /** CA to trust for wss:// URLs. */
  ca?: string;
  /** Newer firmware uses `op` + `req_id`; older only `type` (default: newer). */
  legacy?: boolean;
  /**
   * The gateway's credential (issued on approval): sent as `?credential=` on the upgrade path,
   * as a real gateway does with `WSServerPath /ws/wifidogx?credential=<it>`.
   */
  credential?: string;
  /**
   * A bad release (by the version the image declares): `fail` answers `firmware_upgrade_error`,
   * `hang` never answers the `firmware_upgrade`, `rollback` answers success, reboots and comes
   * back reporting the old release.
   */
  bad?: BadRelease;
}

/** What a non-101 answer to the upgrade says: an HTTP status with the server's reason, or not HTTP at all. */
function upgradeRefusal(answer: Buffer): ConnectionFailure {
  const text = answer.toString('utf8');
  const status = /^HTTP\/1\.[01] (\d{3})/.exec(text)?.[1];
  if (!status) return notTheProtocol('HTTP', `it answered ${quoteAnswer(answer)}`);
  const end = text.indexOf('\r\n\r\n');
  const statusText = text.split('\r\n')[0]!.replace(/^HTTP\/1\.[01] \d{3} ?/, '');
  return httpRefusal(Number(status), refusalReason(end >= 0 ? text.slice(end + 4) : '', statusText));
}

export function simulatorImage(version: string, size = 4096): Buffer {
  return Buffer.concat([Buffer.from(`WIFIDOGX-SIM-FIRMWARE version=${version}\n`), randomBytes(size)]);
}

const TWO_FRAMES = 'two frames in one read';

/** How long the event loop must have been blocked for frames spaced by the server to arrive together. */
const STALL_MS = 50;
let lastTick = Date.now();
let lastStallAt = 0;
let ticker: NodeJS.Timeout | undefined;
/** Whether this process's event loop was blocked (≥ STALL_MS) just before the current read. */
function loopJustStalled(): boolean {
  // Timers run before I/O in a loop turn: a stall ending in this turn was recorded just now.
  const now = Date.now();
  return now - lastStallAt < 20 || now - lastTick >= STALL_MS;
}

/** Starts the process-wide probe `loopJustStalled` reads (a 5 ms tick that notes when it came late). */
function watchForStalls(): void {
  if (ticker) return;
  lastTick = Date.now();
  ticker = setInterval(() => {
    const now = Date.now();
    if (now - lastTick >= STALL_MS) lastStallAt = now;
    lastTick = now;
  }, 5);
  ticker.unref();
}

/** The complete frames of a read, in order (a trailing partial frame is kept as is). */
function splitFrames(chunk: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  while (at < chunk.length) {
    let len = chunk.length - at >= 2 ? chunk[at + 1]! & 0x7f : 0;
    let header = 2;
    if (len === 126 && chunk.length - at >= 4) {
      len = chunk.readUInt16BE(at + 2);
      header = 4;
    }
    const end = Math.min(chunk.length, at + header + len);
    out.push(chunk.subarray(at, end));
    at = end;
  }
  return out;
}

export class WifidogxGateway extends EventEmitter {
  readonly o: Required<Omit<GatewayOptions, 'ca' | 'credential' | 'bad'>> &
    Pick<GatewayOptions, 'ca' | 'credential' | 'bad'>;
  version: string;
  socket: net.Socket | undefined;
  /** Every message the server sent, decoded, in order. */
  readonly received: Array<Record<string, unknown>> = [];
  /** Raw byte sizes of every server frame and of the 101 response. */
  readonly frameSizes: number[] = [];
  upgradeResponseBytes = 0;
  /** Protocol violations by the server (a real gateway would misbehave on each). */
  readonly violations: string[] = [];
  /** Reads that held several frames because this process stalled, not because the server sent them together. */
  stalledReads = 0;
  authModes = new Map<string, number>();
  /** The close frame of the last link the server closed, if it sent one. */
  lastClose: { code: number; reason: string } | undefined;
  #stopped = false;
  #handshaken = false;
  #heartbeat: NodeJS.Timeout | undefined;
  #reconnect: NodeJS.Timeout | undefined;
  #clients = new Set<string>();

  constructor(options: GatewayOptions) {
    super();
    this.o = {
      gateways: [{ gw_id: 'gw-1', auth_mode: 1 }],
      heartbeatMs: 60_000,
      reconnectMs: 200,
      legacy: false,
      ...options,
    };
    this.version = options.version;
    for (const gw of this.o.gateways) this.authModes.set(gw.gw_id, gw.auth_mode);
  }

  /** A client the gateway knows (kickoff finds it). */
  addClient(mac: string): void {
    this.#clients.add(mac.toLowerCase());
  }

  start(): Promise<void> {
    this.#stopped = false;
    return this.#connect();
  }

  /** Carries `credential` from the next link on, and drops the current link so it reconnects. */
  useCredential(credential: string): void {
    this.o.credential = credential;
    this.socket?.destroy();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    clearInterval(this.#heartbeat);
    clearTimeout(this.#reconnect);
    const s = this.socket;
    if (s && !s.destroyed) await new Promise<void>((r) => s.once('close', () => r()).destroy());
  }

  #connect(): Promise<void> {
    watchForStalls();
    const u = new URL(this.o.url);
    const secure = u.protocol === 'wss:';
    const port = Number(u.port || (secure ? 443 : 80));
    return new Promise((resolve, reject) => {
      const socket = secure
        ? tls.connect({
            host: u.hostname,
            port,
            ca: this.o.ca,
            servername: u.hostname === 'localhost' ? 'localhost' : undefined,
          })
        : net.connect({ host: u.hostname, port });
      this.socket = socket;
      this.#handshaken = false;
      let failed = false;
      let answer = Buffer.alloc(0);
      const fail = (f: ConnectionFailure, err: Error) => {
        if (failed || this.#handshaken) return;
        failed = true;
        if (!this.#stopped) this.emit('connect_error', f);
        reject(err);
      };
      const key = randomBytes(16).toString('base64');
      socket.once(secure ? 'secureConnect' : 'connect', () => {
        const target = this.o.credential
          ? `${u.pathname}?credential=${encodeURIComponent(this.o.credential)}`
          : `${u.pathname}${u.search}`;
        socket.write(
          `GET ${target} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
        );
      });
      socket.on('data', (chunk: Buffer) => {
        // One read of the real client: at most READ_BUFFER_BYTES.
        if (!this.#handshaken) {
          this.upgradeResponseBytes = chunk.length;
          const text = chunk.toString('latin1');
          const end = text.indexOf('\r\n\r\n');
          if (chunk.length > READ_BUFFER_BYTES) this.#violation(`the 101 response read is ${chunk.length} bytes`);
          if (!text.startsWith('HTTP/1.1 101')) {
            answer = Buffer.concat([answer, chunk]);
            socket.destroy();
            const f = upgradeRefusal(answer);
            return fail(f, new Error(`upgrade refused: ${f.message}`));
          }
          if (/sec-websocket-extensions/i.test(text.slice(0, end)))
            this.#violation('the server negotiated an extension (compression)');
          const accept = createHash('sha1').update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
          if (!text.includes(accept)) this.#violation('bad Sec-WebSocket-Accept');
          if (end + 4 !== chunk.length) this.#violation('a frame arrived in the same read as the 101 response');
          this.#handshaken = true;
          this.#report('connect');
          clearInterval(this.#heartbeat);
          this.#heartbeat = setInterval(() => this.#report('heartbeat'), this.o.heartbeatMs);
          this.emit('connected');
          resolve();
          return;
        }
        this.#onRead(chunk);
      });
      socket.on('error', (err) => fail(describeError(err), err));
      socket.on('close', () => {
        clearInterval(this.#heartbeat);
        const was = this.#handshaken;
        this.#handshaken = false;
        if (was) this.emit('disconnected');
        else
          fail(
            { kind: 'connection closed', message: 'the server closed the connection before answering the upgrade' },
            new Error('closed before the upgrade answer'),
          );
        clearTimeout(this.#reconnect);
        if (!this.#stopped)
          this.#reconnect = setTimeout(() => this.#connect().catch(() => undefined), this.o.reconnectMs);
      });
    });
  }

  #violation(what: string): void {
    this.violations.push(what);
    this.emit('violation', what);
    console.error(`wifidogx simulator ${this.o.deviceId}: PROTOCOL VIOLATION: ${what}`);
  }

  /** The opcode and payload offset of the one frame in `chunk`, or what is wrong with the read. */
  #parseRead(chunk: Buffer): { opcode: number; offset: number } | string {
    if (chunk.length > READ_BUFFER_BYTES)
      return `a read of ${chunk.length} bytes exceeds the ${READ_BUFFER_BYTES}-byte buffer`;
    if (chunk.length < 2) return 'a read holds less than a frame header';
    const fin = (chunk[0]! & 0x80) !== 0;
    const rsv = chunk[0]! & 0x70;
    const opcode = chunk[0]! & 0x0f;
    let len = chunk[1]! & 0x7f;
    let offset = 2;
    if (len === 126) {
      len = chunk.readUInt16BE(2);
      offset = 4;
    } else if (len === 127) return 'a 64-bit frame length';
    const total = offset + len;
    this.frameSizes.push(total);
    if (total > chunk.length) return `a frame of ${total} bytes arrived split across reads`;
    if (total < chunk.length) return TWO_FRAMES;
    if (!fin || opcode === 0) return 'a fragmented frame';
    if (rsv) return 'a compressed frame (RSV bits set)';
    return { opcode, offset };
  }

  /**
   * One read: exactly one complete, unfragmented, uncompressed frame, or a loud failure. Frames
   * the server spaced out that arrive together only because this process was stalled (its event
   * loop blocked longer than the gap, as a busy test machine does) are not the server's fault:
   * they are read one by one, and counted in `stalledReads`.
   */
  #onRead(chunk: Buffer): void {
    const frame = this.#parseRead(chunk);
    if (frame === TWO_FRAMES && loopJustStalled()) {
      this.stalledReads++;
      for (const one of splitFrames(chunk)) this.#onRead(one);
      return;
    }
    if (typeof frame === 'string') {
      this.#violation(frame);
      return;
    }
    const { opcode, offset } = frame;
    if (opcode === 8) {
      const body = chunk.subarray(offset);
      this.lastClose =
        body.length >= 2
          ? { code: body.readUInt16BE(0), reason: body.subarray(2).toString('utf8') }
          : { code: 1005, reason: '' };
      this.emit('closed', this.lastClose);
      this.socket?.destroy();
      return;
    }
    if (opcode !== 1) return; // older firmware ignores ping/pong
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(chunk.subarray(offset).toString('utf8')) as Record<string, unknown>;
    } catch {
      this.#violation('a text frame that is not JSON');
      return;
    }
    this.received.push(message);
    this.emit('message', message);
    void this.#handle(message);
  }

  /** Sends one masked text frame. */
  send(message: Record<string, unknown>): void {
    const payload = Buffer.from(JSON.stringify(message));
    const mask = randomBytes(4);
    const header =
      payload.length < 126
        ? Buffer.from([0x81, 0x80 | payload.length])
        : Buffer.from([0x81, 0x80 | 126, payload.length >> 8, payload.length & 0xff]);
    const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]!));
    this.socket?.write(Buffer.concat([header, mask, masked]));
  }

  #reply(request: Record<string, unknown>, message: Record<string, unknown>): void {
    const type = message.type as string;
    this.send(
      this.o.legacy
        ? message
        : { ...message, op: type, ...(request.req_id !== undefined ? { req_id: request.req_id } : {}) },
    );
  }

  #report(type: 'connect' | 'heartbeat'): void {
    this.send({
      type,
      ...(this.o.legacy ? {} : { op: type }),
      device_id: this.o.deviceId,
      device_info: {
        ap_device_id: this.o.deviceId,
        ap_mac_address: '02:00:00:00:00:01',
        ap_longitude: '0',
        ap_latitude: '0',
        location_id: 'lab',
      },
      gateway: [...this.authModes].map(([gw_id, auth_mode]) => ({
        gw_id,
        gw_channel: 'lan',
        gw_address_v4: '192.168.1.1',
        auth_mode,
        gw_interface: 'br-lan',
      })),
    });
  }

  async #handle(m: Record<string, unknown>): Promise<void> {
    const type = (m.type ?? m.op) as string;
    switch (type) {
      case 'connect':
      case 'heartbeat':
        for (const gw of (m.gateway as Array<{ gw_id: string; auth_mode: unknown }>) ?? []) {
          if (!Number.isInteger(gw.auth_mode)) this.#violation(`auth_mode of ${gw.gw_id} is not an integer`);
          else this.authModes.set(gw.gw_id, gw.auth_mode as number);
        }
        return;
      case 'get_firmware_info':
        return this.#reply(m, {
          type: 'firmware_info_response',
          data: {
            DISTRIB_ID: 'ChaWrt',
            DISTRIB_RELEASE: this.version,
            DISTRIB_TARGET: 'ramips/mt7621',
            DISTRIB_DESCRIPTION: `ChaWrt ${this.version}`,
          },
        });
      case 'firmware_upgrade': {
        const url = m.url;
        if (typeof url !== 'string' || !/^https?:\/\/[A-Za-z0-9.:/_~-]+$/.test(url) || url.length >= 500) {
          this.#violation(`firmware_upgrade with an unsafe URL ${JSON.stringify(url)}`);
          return this.#reply(m, { type: 'firmware_upgrade_error', error: "Missing or invalid 'url' field" });
        }
        let image: Buffer;
        try {
          image = await fetchUrl(url, this.o.ca);
        } catch (err) {
          return this.#reply(m, {
            type: 'firmware_upgrade_error',
            error: `Failed to execute sysupgrade command: ${(err as Error).message}`,
          });
        }
        const declared = /WIFIDOGX-SIM-FIRMWARE version=(\S+?)\n/.exec(image.subarray(0, 4096).toString('latin1'))?.[1];
        const bad = declared !== undefined && this.o.bad?.version === declared ? this.o.bad.mode : undefined;
        if (bad === 'hang') return void this.emit('hung', declared);
        if (bad === 'fail') {
          const error = `Failed to execute sysupgrade command: image check failed for ${declared} (bad release rehearsal)`;
          this.#reply(m, { type: 'firmware_upgrade_error', error });
          return void this.emit('upgrade_failed', declared, error);
        }
        this.#reply(m, {
          type: 'firmware_upgrade_response',
          status: 'success',
          message: 'Firmware upgrade initiated successfully',
        });
        this.emit('upgrading', declared);
        setTimeout(() => {
          // A bad image does not boot: the gateway comes back on the release it ran.
          if (bad === 'rollback') this.emit('rolled_back', declared);
          else if (declared) this.version = declared;
          this.emit('rebooted', this.version);
          this.socket?.destroy();
        }, 50);
        return;
      }
      case 'kickoff': {
        const mac = String(m.client_mac ?? '').toLowerCase();
        if (!m.client_ip || !m.client_mac || !m.gw_id)
          return this.#reply(m, { type: 'kickoff_error', error: 'Missing required fields in request' });
        if (!this.#clients.delete(mac))
          return this.#reply(m, {
            type: 'kickoff_error',
            error: 'Client not found',
            client_ip: m.client_ip,
            client_mac: m.client_mac,
          });
        return this.#reply(m, {
          type: 'kickoff_response',
          status: 'success',
          client_ip: m.client_ip,
          client_mac: m.client_mac,
          message: 'Client kicked off successfully',
        });
      }
      case 'auth':
        if (typeof m.client_mac === 'string') this.#clients.add(m.client_mac.toLowerCase());
        if (m.once_auth === true && typeof m.gw_id === 'string') this.authModes.set(m.gw_id, 0);
        return;
      case 'tmp_pass':
        return;
      default:
        return;
    }
  }
}

function fetchUrl(url: string, ca?: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const get = url.startsWith('https:')
      ? (u: string, cb: (res: http.IncomingMessage) => void) => https.get(u, { ca }, cb)
      : (u: string, cb: (res: http.IncomingMessage) => void) => http.get(u, cb);
    const req = get(url, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        res.statusCode === 200
          ? resolve(Buffer.concat(chunks))
          : reject(new Error(`download answered ${res.statusCode}`)),
      );
    });
    req.on('error', reject);
  });
}

registerSimulatorProtocol({
  name: 'wifidogx',
  createDevice(spec, _shared, report) {
    const u = new URL(spec.url);
    const scheme = u.protocol === 'https:' || u.protocol === 'wss:' ? 'wss' : 'ws';
    const url = `${scheme}://${u.host}${u.pathname.startsWith('/ws/wifidogx') ? u.pathname : '/ws/wifidogx'}`;
    // `--url ws://host:4000/ws/wifidogx?credential=<issued>` carries an approved gateway's credential.
    const credential = u.searchParams.get('credential') ?? undefined;
    const gw = new WifidogxGateway({
      url,
      deviceId: spec.serial,
      version: spec.firmware.version,
      ca: spec.tls.ca,
      reconnectMs: 2000,
      ...(credential ? { credential } : {}),
      ...(spec.bad ? { bad: spec.bad } : {}),
    });
    gw.on('connected', () => report({ type: 'connected' }));
    gw.on('disconnected', () => report({ type: 'disconnected' }));
    gw.on('connect_error', ({ kind, message }: ConnectionFailure) => report({ type: 'connect_failed', kind, message }));
    gw.on('message', (m: Record<string, unknown>) => {
      if (m.type === 'connect') report({ type: 'joined' });
    });
    gw.on('upgrading', (version?: string) => report({ type: 'update_begin', version: version ?? '?' }));
    let rolledBack: string | undefined;
    gw.on('rolled_back', (version: string) => {
      rolledBack = version;
    });
    gw.on('rebooted', (version: string) => {
      if (rolledBack === undefined) return report({ type: 'update_succeeded', version });
      report({ type: 'update_rolled_back', version: rolledBack });
      rolledBack = undefined;
    });
    gw.on('upgrade_failed', (version: string, error: string) => {
      report({ type: 'update_begin', version });
      report({ type: 'update_failed', version, errors: [error] });
    });
    gw.on('hung', (version: string) => {
      report({ type: 'update_begin', version });
      report({ type: 'update_hung', version });
    });
    gw.on('violation', (what: string) =>
      report({ type: 'update_failed', version: gw.version, errors: [`protocol violation: ${what}`] }),
    );
    return { start: () => gw.start().catch(() => undefined), stop: () => gw.stop() };
  },
});
