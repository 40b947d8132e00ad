/**
 * Many simulated devices in one process. A protocol adapter (`registerSimulatorProtocol`) turns
 * one device spec into something that starts, stops and reports `SimEvent`s; the simulator
 * staggers the starts, injects faults through the adapter and keeps the counts.
 * `phoenix` (the Phoenix device protocol, this package's DeviceClient) is built in; other edges register theirs.
 */
import { EventEmitter } from 'node:events';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { deviceTopic } from '../shared/protocol.ts';
import { type BadRelease, DeviceClient, deviceStateDir, type UpdateFaults } from './index.ts';

export { BAD_MODES, type BadMode, type BadRelease } from './index.ts';
import type { DeviceTls } from './download.ts';

/** What every simulated device reports, whatever protocol it speaks. */
export type SimEvent =
  | { type: 'connected' }
  | { type: 'disconnected' }
  /** Joined; `version` is the firmware it joined with, when the protocol says. */
  | { type: 'joined'; version?: string }
  | { type: 'update_begin'; version: string }
  /** The device rejoined running `version`: the server has decided the attempt (succeeded). */
  | { type: 'update_succeeded'; version: string }
  /** A connection attempt failed; `kind` buckets the reason for the summary. */
  | { type: 'connect_failed'; kind: string; message: string }
  | { type: 'update_failed'; version: string; errors: string[] }
  /** The device installed `version` and came back on its old firmware (or reported that it rolled back). */
  | { type: 'update_rolled_back'; version: string }
  /** The device began updating to `version` and fell silent about it (a bad release, mode `hang`). */
  | { type: 'update_hung'; version: string }
  | { type: 'download_resumed' }
  | { type: 'url_refreshed' };

export interface FaultRates {
  failDownload: number;
  corrupt: number;
  dropConnection: number;
  rejectInstall: number;
  /** Throttle every download to this many kbit/s (0: unthrottled). */
  slowLinkKbps: number;
}

export interface SimDeviceSpec {
  serial: string;
  index: number;
  url: string;
  tls: DeviceTls;
  stateDir: string;
  firmware: { uuid: string; version: string };
  /** Decides the faults of one update (seeded, so runs are reproducible). */
  faults: () => UpdateFaults | undefined;
  /** Set when this device misbehaves on a bad release (`SimulationOptions.badRelease`). */
  bad?: BadRelease;
}

/** What the simulator needs from a device of any protocol. */
export interface SimDevice {
  start(): Promise<void>;
  stop(): Promise<void>;
}

export interface SimShared {
  /** One HTTPS agent for every download (TLS session cache). */
  agent: https.Agent;
  /** TLS sessions of every device's socket, for cheap reconnects. */
  sessions: Map<string, Buffer>;
}

export interface SimulatorProtocol {
  name: string;
  /** False for protocols that authenticate otherwise (tokens, keys): no certificates are enrolled. */
  clientCertificates?: boolean;
  createDevice(spec: SimDeviceSpec, shared: SimShared, report: (event: SimEvent) => void): SimDevice;
}

const protocols = new Map<string, SimulatorProtocol>();

/** Makes `--protocol <name>` available to `fleethub-device simulate`. */
export function registerSimulatorProtocol(protocol: SimulatorProtocol): void {
  protocols.set(protocol.name, protocol);
}

export function simulatorProtocols(): string[] {
  return [...protocols.keys()];
}

registerSimulatorProtocol({
  name: 'phoenix',
  createDevice(spec, shared, report) {
    const client = new DeviceClient({
      url: spec.url,
      tls: spec.tls,
      stateDir: spec.stateDir,
      firmware: spec.firmware,
      agent: shared.agent,
      sessionCache: shared.sessions,
      sessionKey: spec.serial,
      faults: spec.faults,
      ...(spec.bad ? { badRelease: spec.bad } : {}),
      downloadRetryDelayMs: (n) => Math.min(100 * 2 ** (n - 1), 2000),
    });
    // An update counts as succeeded once the device rejoined on the new firmware (rolled back when
    // it rejoined on another): the server decides the attempt's outcome on that join and commits
    // it before it replies.
    let installed: string | undefined;
    let rebootedTo: string | undefined;
    client.on('connected', () => report({ type: 'connected' }));
    client.on('disconnected', () => report({ type: 'disconnected' }));
    client.on('connect_error', ({ kind, message }) => report({ type: 'connect_failed', kind, message }));
    client.on('joined', ({ topic }) => {
      report({ type: 'joined', version: client.running?.version });
      if (rebootedTo !== undefined && topic === deviceTopic(client.running?.uuid ?? '')) {
        if (installed === undefined || installed === rebootedTo)
          report({ type: 'update_succeeded', version: rebootedTo });
        else report({ type: 'update_rolled_back', version: installed });
        rebootedTo = undefined;
        installed = undefined;
      }
    });
    client.on('update_begin', ({ version }) => report({ type: 'update_begin', version }));
    client.on('update_error', ({ version, errors }) => report({ type: 'update_failed', version, errors }));
    client.on('update_hung', ({ version }) => report({ type: 'update_hung', version }));
    client.on('url_refused', () => report({ type: 'url_refreshed' }));
    client.on('update_finished', ({ version, attempts }) => {
      installed = version;
      if (attempts > 1) report({ type: 'download_resumed' });
    });
    client.on('rebooted', (running) => {
      rebootedTo = running.version;
    });
    return { start: () => client.start(), stop: () => client.stop() };
  },
});

export interface SimulationOptions {
  protocol?: string;
  count: number;
  url: string;
  /** `<certsDir>/<serial>/{cert,key,ca}.pem`; created through `pkiDir` when missing. */
  certsDir: string;
  pkiDir?: string;
  /** Where each device keeps its slots (`<slotsDir>/<serial>`). */
  slotsDir: string;
  serialPrefix?: string;
  firmware?: { uuid: string; version: string };
  faults?: Partial<FaultRates>;
  /** Milliseconds between two device starts. */
  staggerMs?: number;
  seed?: number;
  /**
   * Rehearse a bad release: devices told to install `version` misbehave as `mode` says. With
   * `fraction` (0..1, default 1) only some do, chosen by index (`misbehaves`), so a run says
   * exactly which devices fail.
   */
  badRelease?: BadRelease & { fraction?: number };
}

/**
 * Whether device `index` misbehaves when a `fraction` of the devices do: when ⌊(index+1)·f⌋ >
 * ⌊index·f⌋, i.e. exactly ⌊n·f⌋ of the first n devices, spread evenly (f = 0.2: indexes 4, 9, 14, …).
 */
export function misbehaves(index: number, fraction = 1): boolean {
  const at = (i: number) => Math.floor(i * fraction + 1e-9);
  return at(index + 1) > at(index);
}

export interface DeviceTally {
  serial: string;
  connected: boolean;
  joined: boolean;
  updating: string | null;
  succeeded: number;
  failed: number;
  /** Updates that came back on the old firmware. */
  rolledBack: number;
  /** The version the device fell silent updating to (bad release, mode `hang`). */
  hung: string | null;
  /** Whether this device misbehaves on the bad release. */
  bad: boolean;
  lastError: string | null;
  /** The firmware version the device runs, as the server last acknowledged it (join). */
  running: string | null;
  /** Failed connection attempts, and the reason of the last one (cleared once connected). */
  connectFailures: number;
  lastConnectError: { kind: string; message: string } | null;
  /** The version of the last failed update. */
  lastFailedVersion: string | null;
}

export interface SimulationSummary {
  devices: number;
  connected: number;
  joined: number;
  updating: number;
  /** Updates that ended with the device running the new firmware. */
  succeeded: number;
  /** Updates that ended with `firmware_update_error`. */
  failed: number;
  /** Updates that ended back on the old firmware. */
  rolledBack: number;
  /** Devices silent mid-update (bad release, mode `hang`). */
  hung: number;
  resumedDownloads: number;
  urlRefreshes: number;
  errors: Record<string, number>;
  /** Failed connection attempts by reason (`connection refused`, `unknown CA`, `HTTP 403`, ...). */
  connectFailures: Record<string, number>;
}

/** A running simulation: `summary()` any time, `stop()` at the end. */
export class Simulation extends EventEmitter<{
  change: [];
  /** The first connection failure of each kind, to print once. */
  connect_reason: [{ serial: string; kind: string; message: string }];
}> {
  readonly tallies: DeviceTally[] = [];
  #connectFailures = new Map<string, number>();
  #connectReasons = new Map<string, string>();
  #devices: SimDevice[] = [];
  #resumed = 0;
  #refreshes = 0;
  #agent = new https.Agent({ keepAlive: false, maxCachedSessions: 10_000 });
  #startTimers: NodeJS.Timeout[] = [];

  constructor(readonly options: SimulationOptions) {
    super();
  }

  /** Enrolls missing certificates, then starts the devices `staggerMs` apart (resolves when all started). */
  async start(): Promise<void> {
    const o = this.options;
    const protocol = protocols.get(o.protocol ?? 'phoenix');
    if (!protocol)
      throw new Error(`unknown protocol ${JSON.stringify(o.protocol)}; available: ${simulatorProtocols().join(', ')}`);
    const creds = protocol.clientCertificates === false ? serialsOnly(o) : await enrollDevices(o);
    const random = mulberry32(o.seed ?? 1);
    const rates: FaultRates = {
      failDownload: 0,
      corrupt: 0,
      dropConnection: 0,
      rejectInstall: 0,
      slowLinkKbps: 0,
      ...o.faults,
    };
    const shared: SimShared = { agent: this.#agent, sessions: new Map() };
    const firmware = o.firmware ?? { uuid: randomUUID(), version: '0.0.1' };
    const bad = o.badRelease;
    if (bad && !(bad.fraction === undefined || (bad.fraction >= 0 && bad.fraction <= 1)))
      throw new Error(`the bad release's fraction must be from 0 to 1, got ${bad.fraction}`);
    const starts: Promise<void>[] = [];
    creds.forEach((cred, index) => {
      const tally: DeviceTally = {
        serial: cred.serial,
        connected: false,
        joined: false,
        updating: null,
        succeeded: 0,
        failed: 0,
        rolledBack: 0,
        hung: null,
        bad: bad !== undefined && misbehaves(index, bad.fraction),
        lastError: null,
        running: null,
        connectFailures: 0,
        lastConnectError: null,
        lastFailedVersion: null,
      };
      this.tallies.push(tally);
      const spec: SimDeviceSpec = {
        serial: cred.serial,
        index,
        url: o.url,
        tls: cred.tls,
        stateDir: deviceStateDir(o.slotsDir, cred.serial),
        firmware,
        faults: () => pickFaults(rates, random),
        ...(bad && tally.bad ? { bad: { version: bad.version, mode: bad.mode } } : {}),
      };
      const device = protocol.createDevice(spec, shared, (event) => this.#record(tally, event));
      this.#devices.push(device);
      starts.push(
        new Promise<void>((resolve, reject) => {
          this.#startTimers.push(setTimeout(() => device.start().then(resolve, reject), index * (o.staggerMs ?? 10)));
        }),
      );
    });
    await Promise.all(starts);
  }

  #record(tally: DeviceTally, event: SimEvent): void {
    switch (event.type) {
      case 'connected':
        tally.connected = true;
        tally.lastConnectError = null;
        break;
      case 'connect_failed':
        tally.connectFailures++;
        tally.lastConnectError = { kind: event.kind, message: event.message };
        this.#connectFailures.set(event.kind, (this.#connectFailures.get(event.kind) ?? 0) + 1);
        if (!this.#connectReasons.has(event.kind)) {
          this.#connectReasons.set(event.kind, event.message);
          this.emit('connect_reason', { serial: tally.serial, ...event });
        }
        break;
      case 'disconnected':
        tally.connected = false;
        tally.joined = false;
        break;
      case 'joined':
        tally.joined = true;
        if (event.version !== undefined) tally.running = event.version;
        break;
      case 'update_begin':
        tally.updating = event.version;
        break;
      case 'update_succeeded':
        tally.updating = null;
        tally.succeeded++;
        tally.running = event.version;
        break;
      case 'update_failed':
        tally.updating = null;
        tally.failed++;
        tally.lastFailedVersion = event.version;
        tally.lastError = event.errors[0] ?? 'unknown error';
        break;
      case 'update_rolled_back':
        tally.updating = null;
        tally.rolledBack++;
        tally.lastFailedVersion = event.version;
        break;
      case 'update_hung':
        tally.hung = event.version;
        break;
      case 'download_resumed':
        this.#resumed++;
        break;
      case 'url_refreshed':
        this.#refreshes++;
        break;
      default:
        assertNever(event);
    }
    this.emit('change');
  }

  summary(): SimulationSummary {
    const errors: Record<string, number> = {};
    for (const t of this.tallies) {
      if (t.failed && t.lastError) {
        const kind = errorKind(t.lastError);
        errors[kind] = (errors[kind] ?? 0) + t.failed;
      }
    }
    return {
      devices: this.tallies.length,
      connected: this.tallies.filter((t) => t.connected).length,
      joined: this.tallies.filter((t) => t.joined).length,
      updating: this.tallies.filter((t) => t.updating !== null && t.hung === null).length,
      succeeded: sum(this.tallies.map((t) => t.succeeded)),
      failed: sum(this.tallies.map((t) => t.failed)),
      rolledBack: sum(this.tallies.map((t) => t.rolledBack)),
      hung: this.tallies.filter((t) => t.hung !== null).length,
      resumedDownloads: this.#resumed,
      urlRefreshes: this.#refreshes,
      errors,
      connectFailures: Object.fromEntries(this.#connectFailures),
    };
  }

  /** Resolves when `predicate(summary)` holds (checked on every change), or rejects after `timeoutMs`. */
  waitFor(predicate: (s: SimulationSummary) => boolean, timeoutMs = 120_000): Promise<SimulationSummary> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const s = this.summary();
        if (!predicate(s)) return;
        cleanup();
        resolve(s);
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(
          new Error(
            `simulation did not reach the expected state within ${timeoutMs} ms: ${JSON.stringify(this.summary())}`,
          ),
        );
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off('change', check);
      };
      this.on('change', check);
      check();
    });
  }

  async stop(): Promise<void> {
    for (const t of this.#startTimers) clearTimeout(t);
    await Promise.all(this.#devices.map((d) => d.stop().catch(() => undefined)));
    this.#agent.destroy();
  }
}

/** The final table: one line per count, then failures by kind. */
export function summaryTable(s: SimulationSummary): string {
  const rows: [string, number][] = [
    ['devices', s.devices],
    ['connected', s.connected],
    ['joined', s.joined],
    ['updating', s.updating],
    ['succeeded', s.succeeded],
    ['failed', s.failed],
    ['rolled back', s.rolledBack],
    ['hung', s.hung],
    ['resumed downloads', s.resumedDownloads],
    ['url refreshes', s.urlRefreshes],
    ...Object.entries(s.errors).map(([k, v]): [string, number] => [`failed: ${k}`, v]),
    ...Object.entries(s.connectFailures).map(([k, v]): [string, number] => [`connect failed: ${k}`, v]),
  ];
  const width = Math.max(...rows.map(([k]) => k.length));
  return `${[`${'METRIC'.padEnd(width)}  COUNT`, ...rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`)].join('\n')}\n`;
}

/** Buckets an error message for the summary (the first words before any detail). */
function errorKind(message: string): string {
  if (/sha256 mismatch/.test(message)) return 'sha256_mismatch';
  if (/signature/.test(message)) return 'signature';
  if (/installer|install command/.test(message)) return 'install_rejected';
  if (/download|connection/.test(message)) return 'download_failed';
  if (/refused the download/.test(message)) return 'url_refused';
  return 'other';
}

function pickFaults(rates: FaultRates, random: () => number): UpdateFaults | undefined {
  const faults: UpdateFaults = {};
  if (random() < rates.failDownload) faults.failDownload = true;
  if (random() < rates.corrupt) faults.corrupt = true;
  if (random() < rates.dropConnection) faults.dropAfterBytes = 16 * 1024;
  if (random() < rates.rejectInstall) faults.rejectInstall = true;
  if (rates.slowLinkKbps > 0) faults.kbps = rates.slowLinkKbps;
  return Object.keys(faults).length ? faults : undefined;
}

/** Device names without certificates, for protocols that do not use client certificates. */
function serialsOnly(o: Pick<SimulationOptions, 'count' | 'serialPrefix'>): EnrolledDevice[] {
  return Array.from({ length: o.count }, (_, i) => ({
    serial: simSerial(o.serialPrefix ?? 'sim', i, o.count),
    tls: { cert: '', key: '', ca: '' },
  }));
}

function simSerial(prefix: string, index: number, count: number): string {
  return `${prefix}-${String(index).padStart(Math.max(String(count - 1).length, 4), '0')}`;
}

interface EnrolledDevice {
  serial: string;
  tls: DeviceTls;
}

/**
 * Reads `<certsDir>/<serial>/{cert,key,ca}.pem` for every simulated device, issuing missing ones
 * through the development PKI. Simulated devices share one RSA key (generating 2048-bit keys for
 * thousands of devices would dominate start-up); identity is the certificate's CN.
 */
export async function enrollDevices(
  o: Pick<SimulationOptions, 'count' | 'certsDir' | 'pkiDir' | 'serialPrefix'>,
): Promise<EnrolledDevice[]> {
  const out: EnrolledDevice[] = [];
  let issuer:
    | {
        material: import('../certs/pki.ts').PkiMaterial;
        issue: typeof import('../certs/pki.ts').issueDeviceCertificate;
      }
    | undefined;
  let sharedKeyPem: string | undefined;
  for (let i = 0; i < o.count; i++) {
    const serial = simSerial(o.serialPrefix ?? 'sim', i, o.count);
    const dir = path.join(o.certsDir, serial);
    const files = { cert: path.join(dir, 'cert.pem'), key: path.join(dir, 'key.pem'), ca: path.join(dir, 'ca.pem') };
    if (!existsSync(files.cert) || !existsSync(files.key) || !existsSync(files.ca)) {
      if (!o.pkiDir)
        throw new Error(
          `${dir} has no device certificate; pass --pki <dir> to issue one from the development PKI (fleethub certs init)`,
        );
      if (!issuer) {
        const pki = await import('../certs/pki.ts');
        issuer = { material: pki.loadPki(o.pkiDir), issue: pki.issueDeviceCertificate };
      }
      sharedKeyPem ??= generateKeyPairSync('rsa', { modulusLength: 2048 })
        .privateKey.export({ type: 'pkcs1', format: 'pem' })
        .toString();
      const issued = issuer.issue(issuer.material, serial, { keyPem: sharedKeyPem });
      mkdirSync(dir, { recursive: true });
      writeFileSync(files.key, issued.keyPem, { mode: 0o600 });
      writeFileSync(files.cert, issued.certPem);
      writeFileSync(files.ca, issuer.material.rootCa.certPem);
    }
    out.push({
      serial,
      tls: {
        cert: readFileSync(files.cert, 'utf8'),
        key: readFileSync(files.key, 'utf8'),
        ca: readFileSync(files.ca, 'utf8'),
      },
    });
  }
  return out;
}

/** Small seeded PRNG: fault injection must be reproducible with --seed. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function sum(values: number[]): number {
  return values.reduce((a, b) => a + b, 0);
}

function assertNever(value: never): never {
  throw new Error(`unexpected simulator event ${JSON.stringify(value)}`);
}
