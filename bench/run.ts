/**
 * `npm run bench [-- --quick | --scale] [--profile]`: fleethub against its floors, same run.
 *   1. connections and memory   fleethub vs a raw ws+TLS server (bare connections)
 *   2. handshake + join rate    full and resumed (after a 1012 drain) vs Mosquitto mTLS connects
 *   3. fanout latency           group retarget vs raw ws broadcast vs Mosquitto QoS 0
 *   4. firmware throughput      50 × 64 MiB over mTLS vs a plain Node https server
 *   5. report ingest            progress events at 1/s per device, PGlite and PostgreSQL
 *   6. deployment               MAX devices rolled out in three stages (1 %, 10 %, the rest) with an
 *                               approval before stages 2 and 3: approve → stage told and succeeded,
 *                               server CPU and statements per device, peak RSS; devices install at once
 * Prints a markdown table; writes bench/results/<date>-<sha>.json and bench/results/latest.json.
 * `--fuzz`: instead, the device-protocol fuzz test at length (bench/fuzz.ts).
 */
import { execFileSync } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import {
  createReadStream,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { initDevPki } from '../certs/pki.ts';
import { benchSerial } from './lib/certs.ts';
import type { Rpc } from './lib/ipc.ts';
import { nowMs } from './lib/ipc.ts';
import { forkTs, killAll, startMosquitto, stopChild } from './lib/procs.ts';
import { runFuzz } from './fuzz.ts';
import { type Bag, printTable, summarize, type Results } from './lib/report.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const argv = process.argv.slice(2);
// The long protocol fuzz is its own mode: no floors, no servers of this file.
if (argv.includes('--fuzz')) process.exit(runFuzz(argv));
const scale = argv.includes('--scale');
const profile = argv.includes('--profile');
const heapSnapshots = argv.includes('--heap-snapshot');
const only = argv
  .find((a) => a.startsWith('--only='))
  ?.slice('--only='.length)
  .split(',');
const countArg = argv.find((a) => a.startsWith('--max='));

// --quick (default): N up to 10k, under 5 minutes. --scale: as far as one process allows.
const MAX = countArg ? Number(countArg.slice(6)) : scale ? 19_000 : 10_000;
const FANOUT_SIZES = [...new Set([1_000, 10_000, MAX].filter((n) => n <= MAX))];
const WORKERS = Math.max(2, Math.ceil(MAX / 4_800));
/** Devices in each handshake storm (fleethub full, resumed, Mosquitto): all of them with --scale. */
const HS_COUNT = Math.min(MAX, Number(argv.find((a) => a.startsWith('--storm='))?.slice(8) ?? (scale ? MAX : 1_000)));
const CONCURRENCY = 24;
/** Seconds a deployment stage may take before it is reported as not finished (`--stage-cap=`). */
const STAGE_CAP_S = Number(argv.find((a) => a.startsWith('--stage-cap='))?.slice(12) ?? 600);
/**
 * Devices of one worker that reconnect at once after an install (`--reconnect-limit=`; 0: no
 * bound). One process opening thousands of TLS handshakes at the same instant is not a fleet:
 * each device of a real one reconnects on its own clock.
 */
const RECONNECT_LIMIT = Number(argv.find((a) => a.startsWith('--reconnect-limit='))?.slice(18) ?? CONCURRENCY);
const DOWNLOADS = 50;
const IMAGE_MIB = 64;
const INGEST_DEVICES = Number(argv.find((a) => a.startsWith('--ingest-devices='))?.split('=')[1] ?? 1000);
const INGEST_SECONDS = scale ? 20 : 10;
const PG_URL = process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
/** Database of the main fleethub phase (connections, handshakes, fanout, firmware). */
const MAIN_DB = (argv.find((a) => a.startsWith('--db='))?.slice(5) ?? 'pglite') as 'pglite' | 'postgres';

/**
 * The allocator of the server processes (fleethub and the floors, never one without the other):
 * jemalloc when Debian's libjemalloc2 is installed, as the Docker image ships it; `--allocator=glibc`
 * measures plain `npm start`. glibc's malloc fragments under per-connection TLS buffer churn.
 */
const JEMALLOC = `/usr/lib/${process.arch === 'arm64' ? 'aarch64' : 'x86_64'}-linux-gnu/libjemalloc.so.2`;
const ALLOCATOR =
  argv.find((a) => a.startsWith('--allocator='))?.slice('--allocator='.length) ??
  (existsSync(JEMALLOC) ? 'jemalloc' : 'glibc');
if (ALLOCATOR !== 'glibc' && ALLOCATOR !== 'jemalloc')
  throw new Error(`--allocator=${ALLOCATOR}: use glibc or jemalloc`);
if (ALLOCATOR === 'jemalloc' && !existsSync(JEMALLOC))
  throw new Error(`--allocator=jemalloc needs ${JEMALLOC} (apt-get install libjemalloc2)`);
const SERVER_ENV: NodeJS.ProcessEnv = ALLOCATOR === 'jemalloc' ? { LD_PRELOAD: JEMALLOC } : {};

const runs = (phase: string) => !only || only.includes(phase);
const log = (...args: unknown[]) => console.error(`[bench ${new Date().toISOString().slice(11, 19)}]`, ...args);

const work = path.join(ROOT, '.tmp', 'bench');
const pkiDir = path.join(work, 'pki');
mkdirSync(work, { recursive: true });
await initDevPki(pkiDir);
const firmwareFile = path.join(work, `firmware-${IMAGE_MIB}m.bin`);
if (!existsSync(firmwareFile) || statSync(firmwareFile).size !== IMAGE_MIB * 1024 * 1024) {
  writeFileSync(firmwareFile, randomBytes(IMAGE_MIB * 1024 * 1024));
}
const profilesDir = path.join(work, 'profiles');
const results: Results = {
  meta: {},
  connections: {},
  handshake: {},
  fanout: {},
  firmware: {},
  ingest: {},
  deployment: {},
};

process.on('exit', killAll);
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    killAll();
    process.exit(130);
  });
}

// ---- helpers --------------------------------------------------------------------------------

interface Worker {
  rpc: Rpc;
  from: number;
  to: number;
}

async function startWorkers(): Promise<Worker[]> {
  const per = Math.ceil(MAX / WORKERS);
  return Promise.all(
    Array.from({ length: WORKERS }, async (_, w) => {
      const from = w * per;
      const to = Math.min(MAX, from + per);
      // Extra certificates past MAX for downloads and the MQTT publisher come from worker 0's range.
      const { rpc } = await forkTs(`worker-${w}`, path.join(ROOT, 'bench/worker.ts'), [], {
        env: {
          BENCH_PKI_DIR: pkiDir,
          BENCH_FROM: String(from),
          BENCH_TO: String(to),
          BENCH_LOCAL_ADDRESS: `127.0.0.${11 + w}`,
        },
        nodeFlags: ['--max-old-space-size=4096'],
      });
      return { rpc, from, to };
    }),
  );
}

/** Connects devices [0, upTo) not connected yet, spread over the workers owning them. */
async function connectUpTo(
  workers: Worker[],
  mode: string,
  port: number,
  fromIndex: number,
  upTo: number,
  extra: Record<string, unknown> = {},
) {
  const started = nowMs();
  const answers = await Promise.all(
    workers
      .map((w) => ({ w, from: Math.max(w.from, fromIndex), to: Math.min(w.to, upTo) }))
      .filter((r) => r.to > r.from)
      .map((r) =>
        r.w.rpc.call<ConnectAnswer>('connect', {
          mode,
          port,
          from: r.from,
          to: r.to,
          concurrency: CONCURRENCY,
          ...extra,
        }),
      ),
  );
  const elapsedMs = nowMs() - started;
  const connected = answers.reduce((s, a) => s + a.connected, 0);
  const failed = answers.reduce((s, a) => s + a.failed, 0);
  const resumed = answers.reduce((s, a) => s + a.resumed, 0);
  const clientCpuMs = answers.reduce((s, a) => s + a.cpuMs, 0);
  const retries = answers.reduce((s, a) => s + a.retries, 0);
  if (retries)
    log(
      `${retries} ${mode} connection attempts were retried; first reason: ${answers.find((a) => a.retryError)?.retryError}`,
    );
  const firstError = answers.find((a) => a.firstError)?.firstError;
  if (failed) log(`${failed} ${mode} connections failed; first error: ${firstError}`);
  return {
    connected,
    failed,
    resumed,
    elapsedMs,
    clientCpuMs,
    perS: connected / (elapsedMs / 1000),
    p99: Math.max(...answers.map((a) => a.latencies.p99)),
  };
}

interface ConnectAnswer {
  connected: number;
  failed: number;
  resumed: number;
  elapsedMs: number;
  /** CPU time the worker process spent in this connect (user + system). */
  cpuMs: number;
  /** Attempts that failed and were tried again (50 ms × attempt later). */
  retries: number;
  retryError?: string;
  firstError?: string;
  latencies: { p50: number; p99: number; max: number };
}

async function workersStatus(workers: Worker[]) {
  const all = await Promise.all(
    workers.map((w) => w.rpc.call<{ open: number; deviceJoined: number; groupJoined: number }>('status')),
  );
  return all.reduce(
    (s, a) => ({
      open: s.open + a.open,
      deviceJoined: s.deviceJoined + a.deviceJoined,
      groupJoined: s.groupJoined + a.groupJoined,
    }),
    { open: 0, deviceJoined: 0, groupJoined: 0 },
  );
}

async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`BENCH_TIMEOUT: ${what} did not happen within ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Receipt times of `key` for devices [0, n) from every worker, relative to `t0`. */
type Pct = { p50: number; p99: number; max: number };

async function collect<K extends string>(
  workers: Worker[],
  key: string,
  n: number,
  t0s: Record<K, number>,
  timeoutMs = 60_000,
) {
  const deadline = Date.now() + timeoutMs;
  let answers: { times: number[]; missing: number; frameBytes: number; url?: string }[] = [];
  for (;;) {
    answers = await Promise.all(
      workers.map((w) => w.rpc.call<(typeof answers)[number]>('received', { key, from: 0, to: n })),
    );
    const missing = answers.reduce((s, a) => s + a.missing, 0);
    if (missing === 0 || Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 250));
  }
  const times = answers.flatMap((a) => a.times).sort((a, b) => a - b);
  const missing = answers.reduce((s, a) => s + a.missing, 0);
  const out = {} as Record<K, Pct>;
  for (const name of Object.keys(t0s) as K[]) out[name] = percentiles(times.map((t) => t - t0s[name]));
  return {
    ...out,
    received: times.length,
    missing,
    frameBytes: answers.find((a) => a.frameBytes)?.frameBytes ?? 0,
    url: answers.find((a) => a.url)?.url,
  };
}

function percentiles(values: number[]): { p50: number; p99: number; max: number } {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
  return { p50: round(at(0.5)), p99: round(at(0.99)), max: round(sorted[sorted.length - 1] ?? NaN) };
}

/** CPU time (user + system) of another process so far, from /proc (Linux clock ticks, 100 Hz). */
function processCpuMs(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

const round = (n: number, digits = 2) => Math.round(n * 10 ** digits) / 10 ** digits;
const kib = (bytes: number) => bytes / 1024;

interface Memory {
  rss: number;
  mappings: { malloc: number; reservations: number; files: number };
  heapUsed: number;
  heapTotal: number;
  arrayBuffers: number;
  external: number;
  sockets: number;
}

/** Memory of `m.sockets` connections over `base` (before the first), each key prefixed with `prefix`. */
function memoryFigures(m: Memory, base: Memory, prefix = ''): Record<string, number> {
  const perConn = (bytes: number) => round(kib(bytes) / m.sockets);
  const figures = {
    devices: m.sockets,
    rss_mib: round(m.rss / 1048576),
    per_conn_kib: perConn(m.rss - base.rss),
    heap_per_conn_kib: perConn(m.heapUsed - base.heapUsed),
    external_per_conn_kib: perConn(m.external - base.external),
    heap_total_per_conn_kib: perConn(m.heapTotal - base.heapTotal),
    malloc_per_conn_kib: perConn(m.mappings.malloc - base.mappings.malloc),
    reservations_per_conn_kib: perConn(m.mappings.reservations - base.mappings.reservations),
  };
  return Object.fromEntries(Object.entries(figures).map(([key, value]) => [`${prefix}${key}`, value]));
}

/** Memory after GC once allocator pages freed by set-up (uploads, seeding) went back: the lowest of a few samples. */
async function settledMemory(rpc: Rpc): Promise<Memory> {
  let best: Memory | undefined;
  for (let i = 0; i < 3; i++) {
    await new Promise((r) => setTimeout(r, 700));
    const m = await rpc.call<Memory>('memory');
    if (!best || m.rss < best.rss) best = m;
  }
  return best!;
}

class Api {
  token = '';
  constructor(readonly base: string) {}

  async login(email: string, password: string): Promise<void> {
    const res = await this.call<{ token: string }>('POST', '/api/v1/auth/login', { email, password });
    this.token = res.token;
  }

  async call<T>(method: string, url: string, body?: unknown): Promise<T> {
    const res = await fetch(`${this.base}${url}`, {
      method,
      headers: {
        ...(this.token ? { authorization: `Bearer ${this.token}` } : {}),
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${url} answered ${res.status}: ${text.slice(0, 500)}`);
    return (text ? JSON.parse(text) : undefined) as T;
  }

  /** Streams an image file to `POST /api/v1/firmware`. */
  upload(version: string, file: string): Promise<{ id: string }> {
    const url = new URL(
      `${this.base}/api/v1/firmware?org=default&product=default&version=${version}&platform=bench&architecture=x86_64`,
    );
    return new Promise((resolve, reject) => {
      const req = http.request(
        url,
        {
          method: 'POST',
          headers: {
            authorization: `Bearer ${this.token}`,
            'content-type': 'application/octet-stream',
            'content-length': statSync(file).size,
          },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            if ((res.statusCode ?? 500) >= 300)
              reject(new Error(`upload ${version} answered ${res.statusCode}: ${text}`));
            else resolve(JSON.parse(text) as { id: string });
          });
        },
      );
      req.on('error', reject);
      createReadStream(file).pipe(req);
    });
  }
}

interface FleethubServer {
  rpc: Rpc;
  api: Api;
  devicePort: number;
  stop(): Promise<void>;
}

async function startFleethub(name: string, databaseUrl?: string): Promise<FleethubServer> {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-bench-'));
  const args = [
    '--data-dir',
    dataDir,
    '--certs-dir',
    pkiDir,
    '--api-port',
    '0',
    '--device-port',
    '0',
    '--keyauth-port',
    '0',
    '--log-level',
    'warn',
    '--node-name',
    name,
  ];
  if (databaseUrl) args.push('--database-url', databaseUrl);
  const nodeFlags = ['--expose-gc'];
  const { rpc, ready, child } = await forkTs<{ apiUrl: string; deviceUrl: string; email: string; password: string }>(
    name,
    path.join(ROOT, 'bench/server-process.ts'),
    args,
    { nodeFlags, env: SERVER_ENV },
  );
  const api = new Api(ready.apiUrl);
  await api.login(ready.email, ready.password);
  return {
    rpc,
    api,
    devicePort: Number(new URL(ready.deviceUrl).port),
    async stop() {
      await stopChild(rpc, child);
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

async function addToGroup(server: FleethubServer, group: string, from: number, to: number): Promise<void> {
  const identifiers = Array.from({ length: to - from }, (_, i) => benchSerial(from + i));
  const ids = await server.rpc.call<(string | null)[]>('deviceIds', { identifiers });
  const missing = ids.filter((id) => id === null).length;
  if (missing) throw new Error(`BENCH_DEVICES_MISSING: ${missing} devices of [${from}, ${to}) are not registered`);
  for (let i = 0; i < ids.length; i += 2000) {
    await server.api.call('POST', `/api/v1/orgs/default/groups/${group}/devices`, { devices: ids.slice(i, i + 2000) });
  }
}

/**
 * Waits until the server is quiet: no socket left and at most 5 statements/s over the last 2 s
 * (disconnects written; the idle background work — orchestrator, webhook poll, analyze check —
 * runs far less). At most 5 minutes. `withDevices`: devices stay joined; only the statements count.
 */
async function settle(server: FleethubServer, options: { withDevices?: boolean } = {}): Promise<void> {
  const started = nowMs();
  const WINDOW_MS = 2000;
  const samples: { at: number; statements: number }[] = [];
  for (;;) {
    const { statements, endpoint } = await server.rpc.call<{ statements: number; endpoint: { sockets: number } }>(
      'stats',
    );
    const at = nowMs();
    samples.push({ at, statements });
    while (samples.length > 1 && at - samples[1]!.at >= WINDOW_MS) samples.shift();
    const first = samples[0]!;
    const quiet = at - first.at >= WINDOW_MS && (statements - first.statements) / ((at - first.at) / 1000) <= 5;
    if (quiet && (options.withDevices || endpoint.sockets === 0)) break;
    if (at - started > 300_000) break;
    await new Promise((r) => setTimeout(r, 250));
  }
  log(`server settled after ${round((nowMs() - started) / 1000, 1)} s`);
}

async function snapshot(server: FleethubServer, name: string): Promise<void> {
  mkdirSync(profilesDir, { recursive: true });
  const file = path.join(profilesDir, `${name}.heapsnapshot`);
  await server.rpc.call('heapSnapshot', { file });
  log(`heap snapshot: ${path.relative(ROOT, file)}`);
}

async function profiled<T>(server: FleethubServer, name: string, work: () => Promise<T>): Promise<T> {
  if (!profile) return work();
  mkdirSync(profilesDir, { recursive: true });
  await server.rpc.call('profile', { start: true });
  try {
    return await work();
  } finally {
    const file = path.join(profilesDir, `${name}.cpuprofile`);
    await server.rpc.call('profile', { start: false, file });
    log(`cpu profile: ${path.relative(ROOT, file)}`);
  }
}

/** A fresh PostgreSQL database for one server, dropped afterwards; undefined when PostgreSQL is unreachable. */
async function withPostgres<T>(fn: (url: string) => Promise<T>): Promise<T | undefined> {
  const admin = new pg.Client({ connectionString: PG_URL });
  try {
    await admin.connect();
  } catch (err) {
    log(`PostgreSQL not reachable at ${PG_URL} (${(err as Error).message}); skipped`);
    return undefined;
  }
  const dbName = `fleethub_bench_${process.pid}_${Date.now() % 100000}`;
  await admin.query(`CREATE DATABASE ${dbName}`);
  const url = new URL(PG_URL);
  url.pathname = `/${dbName}`;
  try {
    return await fn(url.toString());
  } finally {
    await admin
      .query(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`)
      .catch((err: unknown) => log(`could not drop ${dbName}: ${(err as Error).message}`));
    await admin.end();
  }
}

// ---- phase: fleethub on PGlite (connections, handshakes, fanout, ingest, firmware) ---------------

async function fleethubPhase(workers: Worker[], databaseUrl?: string): Promise<void> {
  log(`fleethub (${MAIN_DB}): ${MAX} devices over ${workers.length} workers`);
  results.meta.main_database = MAIN_DB;
  const server = await startFleethub(`bench-${MAIN_DB}`, databaseUrl);
  try {
    const firmwareUuid = randomUUID();
    const group = 'bench';
    const created = await server.api.call<{ topic: string }>('POST', '/api/v1/orgs/default/groups', {
      product: 'default',
      name: group,
    });
    const topic = created.topic;
    await server.rpc.call('watch', { topic });
    const seedStarted = nowMs();
    await server.rpc.call('seed', { from: 0, to: MAX });
    await addToGroup(server, group, 0, MAX);
    log(`seeded ${MAX} devices into group ${group} in ${round((nowMs() - seedStarted) / 1000, 1)} s`);
    // Small images for the intermediate fanouts; the 64 MiB image for the last (it is then downloaded).
    const tiny = path.join(work, 'tiny.bin');
    writeFileSync(tiny, randomBytes(1024));
    const versions = new Map<number, string>();
    for (const [i, n] of FANOUT_SIZES.entries()) {
      const version =
        i === FANOUT_SIZES.length - 1 ? `2.0.${Date.now() % 100000}` : `1.${i + 1}.${Date.now() % 100000}`;
      versions.set(n, version);
      const file = i === FANOUT_SIZES.length - 1 ? firmwareFile : `${tiny}`;
      // Distinct bytes per version: identical images would be the same firmware.
      if (file === tiny) writeFileSync(tiny, randomBytes(1024));
      await server.api.upload(version, file);
    }

    const base = await settledMemory(server.rpc);
    if (heapSnapshots) await snapshot(server, 'base');
    let connected = 0;
    const lastSize = FANOUT_SIZES[FANOUT_SIZES.length - 1]!;
    const memorySizes = [...new Set([10_000, MAX].filter((n) => n <= MAX))];
    const stops = [...new Set([...FANOUT_SIZES, ...memorySizes, HS_COUNT])].sort((a, b) => a - b);
    for (const n of stops) {
      const ramp = await profiled(server, `connect-${n}`, () =>
        connectUpTo(workers, 'phoenix', server.devicePort, connected, n, { firmwareUuid }),
      );
      log(`connected ${connected}→${n}: ${ramp.connected} ok, ${ramp.failed} failed, ${round(ramp.perS)}/s`);
      if (connected === 0) results.handshake.ramp_per_s = round(ramp.perS);
      connected = n;
      await waitFor(
        `${n} devices in their group channel`,
        async () => (await workersStatus(workers)).groupJoined >= n - ramp.failed,
      );
      if (memorySizes.includes(n)) {
        const m = await server.rpc.call<Memory>('memory');
        results.connections[n] = memoryFigures(m, base);
        log(`memory at ${n}: ${JSON.stringify(results.connections[n])}`);
        if (heapSnapshots && n === MAX) await snapshot(server, `joined-${n}`);
      }
      // Handshake storms once HS_COUNT devices are joined: the server closes every socket with 1012.
      if (n === HS_COUNT && runs('handshake')) {
        for (const resume of [false, true]) {
          const before = await server.rpc.call<{ statements: number }>('stats');
          await server.rpc.call('drain');
          await Promise.all(workers.map((w) => w.rpc.call('awaitClosed')));
          const cpuBefore = (await server.rpc.call<{ cpuMs: number }>('stats')).cpuMs;
          const storm = await profiled(server, resume ? 'storm-resumed' : 'storm-full', () =>
            connectUpTo(workers, 'phoenix', server.devicePort, 0, HS_COUNT, { firmwareUuid, resume }),
          );
          await waitFor(
            'devices back in their group channel',
            async () => (await workersStatus(workers)).groupJoined >= HS_COUNT - storm.failed,
          );
          const after = await server.rpc.call<{ statements: number; cpuMs: number }>('stats');
          // Drain (disconnect) + connect + device join + group join, per device.
          if (MAIN_DB === 'pglite')
            results.handshake.statements_per_reconnect = round((after.statements - before.statements) / HS_COUNT, 1);
          const key = resume ? 'resumed' : 'full';
          results.handshake[`${key}_per_s`] = round(storm.perS);
          results.handshake[`${key}_p99_ms`] = round(storm.p99);
          if (resume) results.handshake.resumed_sessions = storm.resumed;
          // Where the time goes: both sides share the machine's cores.
          results.handshake[`${key}_server_cpu_ms`] = round((after.cpuMs - cpuBefore) / HS_COUNT, 2);
          results.handshake[`${key}_client_cpu_ms`] = round(storm.clientCpuMs / HS_COUNT, 2);
          log(
            `${key} storm: ${storm.connected} in ${round(storm.elapsedMs)} ms = ${round(storm.perS)}/s (${storm.resumed} resumed)`,
          );
        }
      }
      if (FANOUT_SIZES.includes(n) && n !== lastSize)
        await fleethubFanout(server, workers, group, topic, n, versions.get(n)!, true);
    }

    const last = await fleethubFanout(server, workers, group, topic, lastSize, versions.get(lastSize)!, false);
    if (runs('ingest') && MAIN_DB === 'pglite') await ingestPhase(server, workers, versions.get(lastSize)!, 'pglite');
    await Promise.all(workers.map((w) => w.rpc.call('closeAll')));
    await settle(server);

    if (runs('firmware') && last.url) {
      await server.rpc.call('sampleRss', { on: true });
      const before = await server.rpc.call<Memory>('memory');
      const dl = await profiled(server, 'firmware', () =>
        workers[0]!.rpc.call<{ mibPerS: number; downloads: number; bytes: number }>('download', {
          urls: Array(DOWNLOADS).fill(last.url),
        }),
      );
      const { peakRss } = await server.rpc.call<{ peakRss: number }>('sampleRss', { on: false });
      results.firmware.mib_s = round(dl.mibPerS);
      results.firmware.rss_before_mib = round(before.rss / 1048576);
      results.firmware.peak_rss_mib = round(peakRss / 1048576);
      results.firmware.rss_growth_mib = round((peakRss - before.rss) / 1048576);
      log(`firmware: ${dl.downloads} downloads, ${round(dl.mibPerS)} MiB/s, peak RSS ${round(peakRss / 1048576)} MiB`);
      await floorFirmware(workers);
    }
  } finally {
    await server.stop();
  }
}

async function fleethubFanout(
  server: FleethubServer,
  workers: Worker[],
  group: string,
  topic: string,
  n: number,
  version: string,
  clear: boolean,
) {
  if (!runs('fanout') && clear) return { url: undefined };
  const issued = nowMs();
  await profiled(server, `fanout-${n}`, () =>
    server.api.call('PUT', `/api/v1/orgs/default/groups/${group}/target`, { version }),
  );
  const returned = nowMs();
  const starts = await server.rpc.call<number[]>('broadcastStarts', { topic });
  const broadcastAt = starts[starts.length - 1] ?? returned;
  const r = await collect(workers, version, n, { broadcast: broadcastAt, returned, issued });
  results.fanout[n] = {
    ...(results.fanout[n] ?? {}),
    p50_ms: r.broadcast.p50,
    p99_ms: r.broadcast.p99,
    max_ms: r.broadcast.max,
    from_api_return_p50_ms: r.returned.p50,
    from_api_return_p99_ms: r.returned.p99,
    from_api_request_p99_ms: r.issued.p99,
    api_ms: round(returned - issued),
    received: r.received,
    missing: r.missing,
    frame_bytes: r.frameBytes,
  };
  lastFrameBytes = r.frameBytes || lastFrameBytes;
  log(`fanout ${n}: ${JSON.stringify(results.fanout[n])}`);
  if (clear) await server.api.call('DELETE', `/api/v1/orgs/default/groups/${group}/target`);
  return r;
}

let lastFrameBytes = 300;

async function ingestPhase(
  server: FleethubServer,
  workers: Worker[],
  version: string,
  db: 'pglite' | 'postgres',
): Promise<void> {
  const count = Math.min(INGEST_DEVICES, MAX);
  log(`ingest on ${db}: ${count} devices × 1 progress event/s for ${INGEST_SECONDS} s`);
  type IngestStats = { statements: number; cpuMs: number; progress: Record<string, number> };
  const stats0 = await server.rpc.call<IngestStats>('stats');
  const answers = await profiled(server, `ingest-${db}`, () =>
    Promise.all(
      workers
        .map((w) => ({ w, from: w.from, to: Math.min(w.to, w.from + Math.ceil(count / workers.length)) }))
        .map((r) =>
          r.w.rpc.call<{
            devices: number;
            begun: number;
            beginErrors: number;
            sent: number;
            acked: number;
            errors: number;
            firstError?: string;
            sendingMs: number;
            totalMs: number;
            latencies: { p50: number; p99: number; max: number };
          }>('ingest', { version, seconds: INGEST_SECONDS, from: r.from, to: r.to }),
        ),
    ),
  );
  const stats1 = await server.rpc.call<IngestStats>('stats');
  const reports = Math.max(1, (stats1.progress.reports ?? 0) - (stats0.progress.reports ?? 0));
  const acked = answers.reduce((s, a) => s + a.acked, 0);
  const sent = answers.reduce((s, a) => s + a.sent, 0);
  const devices = answers.reduce((s, a) => s + a.devices, 0);
  // Acks over the window progress events were sent in (each device sends one per second).
  const sendingMs = Math.max(...answers.map((a) => a.sendingMs));
  const errors = answers.reduce((s, a) => s + a.errors + a.beginErrors, 0);
  const firstError = answers.find((a) => a.firstError)?.firstError;
  results.ingest[db] = {
    devices,
    // Offered and persisted over the same window (the last device's last tick ends it).
    offered_per_s: round(sent / (sendingMs / 1000)),
    events_s: round(acked / (sendingMs / 1000)),
    acked,
    p50_ack_ms: round(Math.max(...answers.map((a) => a.latencies.p50))),
    p99_ack_ms: round(Math.max(...answers.map((a) => a.latencies.p99))),
    errors,
    // Per progress report the server took in (the begins' cost included; statements on PGlite only).
    ...(db === 'pglite' && { statements_per_event: round((stats1.statements - stats0.statements) / reports, 2) }),
    server_cpu_ms_per_event: round((stats1.cpuMs - stats0.cpuMs) / reports, 3),
    // The progress batcher over the phase: reports, batch statements, single-report fallbacks.
    ...Object.fromEntries(
      Object.entries(stats1.progress).map(([k, v]) => [`progress_${k}`, v - (stats0.progress[k] ?? 0)]),
    ),
  };
  if (firstError) log(`ingest error: ${firstError}`);
  log(`ingest ${db}: ${JSON.stringify(results.ingest[db])}`);
}

// ---- phase: the floor (raw ws + TLS, plain https) ------------------------------------------------

async function floorPhase(workers: Worker[]): Promise<void> {
  log('floor: raw ws+TLS and plain https');
  const { rpc, ready, child } = await forkTs<{ port: number }>('floor', path.join(ROOT, 'bench/floor-server.ts'), [], {
    env: { ...SERVER_ENV, BENCH_PKI_DIR: pkiDir, BENCH_FIRMWARE_FILE: firmwareFile },
    nodeFlags: ['--expose-gc'],
  });
  try {
    const base = await settledMemory(rpc);
    let connected = 0;
    let seq = 0;
    const stops = [...new Set([...FANOUT_SIZES, 10_000, MAX].filter((n) => n <= MAX))].sort((a, b) => a - b);
    for (const n of stops) {
      await connectUpTo(workers, 'ws', ready.port, connected, n);
      connected = n;
      if (n === 10_000 || n === MAX) {
        const m = await rpc.call<Memory>('memory');
        results.connections[n] = { ...(results.connections[n] ?? {}), ...memoryFigures(m, base, 'floor_') };
      }
      if (FANOUT_SIZES.includes(n) && runs('fanout')) {
        seq++;
        const b = await rpc.call<{ t0: number; done: number }>('broadcast', { bytes: lastFrameBytes, seq });
        const r = await collect(workers, String(seq), n, { t0: b.t0 });
        results.fanout[n] = {
          ...(results.fanout[n] ?? {}),
          floor_p50_ms: r.t0.p50,
          floor_p99_ms: r.t0.p99,
          floor_max_ms: r.t0.max,
          floor_missing: r.missing,
        };
        log(`floor fanout ${n}: p50 ${r.t0.p50} p99 ${r.t0.p99} max ${r.t0.max} missing ${r.missing}`);
      }
    }
    await Promise.all(workers.map((w) => w.rpc.call('closeAll')));
  } finally {
    await stopChild(rpc, child);
  }
}

/** The plain https floor for firmware, run right after fleethub's downloads so both see the same machine. */
async function floorFirmware(workers: Worker[]): Promise<void> {
  const { rpc, ready, child } = await forkTs<{ port: number }>(
    'floor-https',
    path.join(ROOT, 'bench/floor-server.ts'),
    [],
    {
      env: { ...SERVER_ENV, BENCH_PKI_DIR: pkiDir, BENCH_FIRMWARE_FILE: firmwareFile },
      nodeFlags: ['--expose-gc'],
    },
  );
  try {
    const before = await rpc.call<Memory>('memory');
    await rpc.call('sampleRss', { on: true });
    const dl = await workers[0]!.rpc.call<{ mibPerS: number }>('download', {
      urls: Array(DOWNLOADS).fill(`https://localhost:${ready.port}/firmware`),
    });
    const { peakRss } = await rpc.call<{ peakRss: number }>('sampleRss', { on: false });
    results.firmware.floor_mib_s = round(dl.mibPerS);
    results.firmware.floor_rss_before_mib = round(before.rss / 1048576);
    results.firmware.floor_peak_rss_mib = round(peakRss / 1048576);
    results.firmware.floor_rss_growth_mib = round((peakRss - before.rss) / 1048576);
    log(`floor firmware: ${round(dl.mibPerS)} MiB/s, peak RSS ${round(peakRss / 1048576)} MiB`);
  } finally {
    await stopChild(rpc, child);
  }
}

// ---- phase: Mosquitto with mutual TLS -------------------------------------------------------------

async function mosquittoPhase(workers: Worker[]): Promise<void> {
  log('mosquitto (mTLS)');
  const { port, child } = await startMosquitto(pkiDir);
  try {
    let connected = 0;
    let seq = 100;
    const fanout = async (n: number) => {
      seq++;
      const p = await workers[0]!.rpc.call<{ t0: number }>('mqttPublish', {
        port,
        bytes: lastFrameBytes,
        seq,
        publisherIndex: workers[0]!.from,
        clientId: `publisher-${seq}`,
      });
      const r = await collect(workers, String(seq), n, { t0: p.t0 });
      results.fanout[n] = {
        ...(results.fanout[n] ?? {}),
        mosquitto_p50_ms: r.t0.p50,
        mosquitto_p99_ms: r.t0.p99,
        mosquitto_max_ms: r.t0.max,
        mosquitto_missing: r.missing,
      };
      log(`mosquitto fanout ${n}: p50 ${r.t0.p50} p99 ${r.t0.p99} max ${r.t0.max} missing ${r.missing}`);
    };
    for (const n of FANOUT_SIZES.filter((n) => n < MAX)) {
      await connectUpTo(workers, 'mqtt', port, connected, n);
      connected = n;
      if (runs('fanout')) await fanout(n);
    }
    if (runs('handshake')) {
      await Promise.all(workers.map((w) => w.rpc.call('closeAll')));
      const cpuBefore = processCpuMs(child.pid!);
      const storm = await connectUpTo(workers, 'mqtt', port, 0, HS_COUNT);
      results.handshake.mosquitto_server_cpu_ms = round((processCpuMs(child.pid!) - cpuBefore) / HS_COUNT, 2);
      results.handshake.mosquitto_client_cpu_ms = round(storm.clientCpuMs / HS_COUNT, 2);
      results.handshake.mosquitto_per_s = round(storm.perS);
      results.handshake.mosquitto_p99_ms = round(storm.p99);
      results.handshake.storm_devices = HS_COUNT;
      log(`mosquitto connect storm: ${storm.connected} in ${round(storm.elapsedMs)} ms = ${round(storm.perS)}/s`);
      connected = HS_COUNT;
    }
    await connectUpTo(workers, 'mqtt', port, connected, MAX);
    if (runs('fanout') && FANOUT_SIZES.includes(MAX)) await fanout(MAX);
    await Promise.all(workers.map((w) => w.rpc.call('closeAll')));
  } finally {
    child.kill('SIGTERM');
  }
}

// ---- phase: ingest on PostgreSQL ----------------------------------------------------------------

async function ingestOnlyPhase(workers: Worker[], db: 'pglite' | 'postgres', databaseUrl?: string): Promise<void> {
  const server = await startFleethub(`bench-ingest-${db}`, databaseUrl);
  try {
    const count = Math.min(INGEST_DEVICES, MAX);
    const per = Math.ceil(count / workers.length);
    const firmwareUuid = randomUUID();
    const group = 'ingest';
    await server.api.call('POST', '/api/v1/orgs/default/groups', { product: 'default', name: group });
    const version = `3.0.${Date.now() % 100000}`;
    const tiny = path.join(work, 'tiny.bin');
    writeFileSync(tiny, randomBytes(1024));
    await server.api.upload(version, tiny);
    for (const w of workers) {
      await server.rpc.call('seed', { from: w.from, to: w.from + per });
      await addToGroup(server, group, w.from, w.from + per);
    }
    await Promise.all(
      workers.map((w) =>
        w.rpc.call('connect', {
          mode: 'phoenix',
          port: server.devicePort,
          from: w.from,
          to: w.from + per,
          concurrency: CONCURRENCY,
          firmwareUuid,
        }),
      ),
    );
    await waitFor(
      'ingest devices in their group',
      async () => (await workersStatus(workers)).groupJoined >= per * workers.length,
    );
    await server.api.call('PUT', `/api/v1/orgs/default/groups/${group}/target`, { version });
    await waitFor('firmware_update at every ingest device', async () => {
      const answers = await Promise.all(
        workers.map((w) =>
          w.rpc.call<{ missing: number }>('received', { key: version, from: w.from, to: w.from + per }),
        ),
      );
      return answers.every((a) => a.missing === 0);
    });
    await ingestPhase(server, workers, version, db);
    await Promise.all(workers.map((w) => w.rpc.call('closeAll')));
  } finally {
    await server.stop();
  }
}

// ---- phase: a deployment over MAX devices ------------------------------------------------------

interface StageJson {
  size: number;
  told: number;
  pending: number;
  in_flight: number;
  retrying: number;
  penalty_box: number;
  succeeded: number;
  failed: number;
  succeeded_at: string | null;
}
interface WorkerUpdates {
  updated: number;
  installing: number;
  failures: number;
  failuresBy: Record<string, number>;
  firstError?: string;
}

/** The workers' install counts for `version`, summed (autoUpdate). */
async function workerUpdates(workers: Worker[], version: string) {
  const all = await Promise.all(workers.map((w) => w.rpc.call<WorkerUpdates>('updated', { version })));
  return {
    updated: all.reduce((n, u) => n + u.updated, 0),
    installing: all.reduce((n, u) => n + u.installing, 0),
    failures: all.reduce((n, u) => n + u.failures, 0),
    failuresBy: all.reduce<Record<string, number>>((t, u) => {
      for (const [k, v] of Object.entries(u.failuresBy)) t[k] = (t[k] ?? 0) + v;
      return t;
    }, {}),
    firstError: all.find((u) => u.firstError)?.firstError,
  };
}
interface DeploymentJson {
  id: string;
  state: string;
  stages: StageJson[];
}

/**
 * Every device of the bench joined, one deployment of a new release in three stages: a 1 % canary,
 * then 10 % and the rest, each after an approval. The devices install at once (worker autoUpdate:
 * begin, finish, rejoin on the new firmware). Per stage: approve (or create) → every device of
 * the stage told, → the stage succeeded; the server's CPU and statements over the stage per
 * device; peak RSS over the rollout against the RSS of the joined fleet before it.
 */
async function deploymentPhase(workers: Worker[], databaseUrl?: string): Promise<void> {
  log(`deployment (${MAIN_DB}): ${MAX} devices`);
  const server = await startFleethub(`bench-deploy-${MAIN_DB}`, databaseUrl);
  try {
    const firmwareUuid = randomUUID();
    await server.api.call('POST', '/api/v1/orgs/default/groups', { product: 'default', name: 'deploy' });
    await server.rpc.call('seed', { from: 0, to: MAX });
    await addToGroup(server, 'deploy', 0, MAX);
    const version = `3.0.${Date.now() % 100000}`;
    const tiny = path.join(work, 'deploy.bin');
    writeFileSync(tiny, randomBytes(1024));
    await server.api.upload(version, tiny);
    const ramp = await connectUpTo(workers, 'phoenix', server.devicePort, 0, MAX, { firmwareUuid });
    await waitFor(
      `${MAX} devices in their group channel`,
      async () => (await workersStatus(workers)).groupJoined >= MAX - ramp.failed,
    );
    await Promise.all(workers.map((w) => w.rpc.call('autoUpdate', { on: true, reconnectLimit: RECONNECT_LIMIT })));
    await settle(server, { withDevices: true });
    const before = await server.rpc.call<Memory>('memory');
    await server.rpc.call('sampleRss', { on: true });

    const show = (id: string) => server.api.call<DeploymentJson>('GET', `/api/v1/orgs/default/deployments/${id}`);
    let deployment: DeploymentJson | undefined;
    const stageFigures: Bag[] = [];
    for (let stage = 0; stage < 3; stage++) {
      const stats0 = await server.rpc.call<{ statements: number; cpuMs: number; deploymentSteps: number }>('stats');
      const installs0 = await workerUpdates(workers, version);
      const t0 = nowMs();
      if (stage === 0) {
        deployment = await server.api.call<DeploymentJson>('POST', '/api/v1/orgs/default/deployments', {
          product: 'default',
          version,
          groups: ['deploy'],
          stages: [
            { size: { percent: 1 } },
            { size: { percent: 10 }, requires_approval: true },
            { size: 'rest', requires_approval: true },
          ],
        });
      } else {
        await server.api.call('POST', `/api/v1/orgs/default/deployments/${deployment!.id}/approve`);
      }
      const id = deployment!.id;
      let toldAt: number | undefined;
      let last: DeploymentJson | undefined;
      // A poll the API does not answer in time (a busy server answers 408) is counted, not fatal.
      let pollErrors = 0;
      let pollError: string | undefined;
      // A stage that does not finish within the cap (10 minutes) is reported with its counts, not
      // thrown: the other phases' figures still get printed.
      const finished = await profiled(server, `deployment-stage-${stage + 1}`, () =>
        waitFor(
          `stage ${stage + 1} to succeed`,
          async () => {
            try {
              last = await show(id);
            } catch (err) {
              pollErrors++;
              pollError ??= (err as Error).message;
              return false;
            }
            const st = last.stages[stage]!;
            if (toldAt === undefined && st.told >= st.size) toldAt = nowMs();
            return st.succeeded_at !== null || st.failed > 0;
          },
          STAGE_CAP_S * 1000,
        ),
      ).then(
        () => true,
        (err: Error) => {
          log(`${err.message}; stage ${stage + 1} at ${JSON.stringify(last?.stages[stage])}`);
          return false;
        },
      );
      const doneAt = nowMs();
      const stats1 = await server.rpc.call<{ statements: number; cpuMs: number; deploymentSteps: number }>('stats');
      const installs1 = await workerUpdates(workers, version);
      last = await show(id).catch(() => last);
      const st = last?.stages[stage] ?? ({ size: 0 } as StageJson);
      const figures: Bag = {
        devices: st.size,
        told_ms: round((toldAt ?? doneAt) - t0),
        succeeded_ms: round(doneAt - t0),
        failed: st.failed,
        server_cpu_ms_per_device: round((stats1.cpuMs - stats0.cpuMs) / st.size, 2),
        statements_per_device: round((stats1.statements - stats0.statements) / st.size, 1),
        orchestrator_steps: stats1.deploymentSteps - stats0.deploymentSteps,
        // Installs the simulated devices gave up on during the stage (begin, finish or reconnect).
        install_failures: installs1.failures - installs0.failures,
        poll_errors: pollErrors,
      };
      if (!finished) {
        // Where the stage stood at the cap: the server's per-device counts and the devices' side.
        figures.timed_out = 1;
        for (const k of ['succeeded', 'told', 'pending', 'in_flight', 'retrying', 'penalty_box'] as const)
          figures[k] = st[k];
        figures.installing = installs1.installing;
        for (const [k, v] of Object.entries(installs1.failuresBy))
          figures[`install_failures_${k}`] = v - (installs0.failuresBy[k] ?? 0);
      }
      stageFigures.push(figures);
      log(
        `deployment stage ${stage + 1}: ${JSON.stringify(figures)}${installs1.firstError ? `; first install error: ${installs1.firstError}` : ''}${pollError ? `; first poll error: ${pollError}` : ''}`,
      );
      if (!finished) break;
    }
    const { peakRss } = await server.rpc.call<{ peakRss: number }>('sampleRss', { on: false });
    const final = await show(deployment!.id);
    const installs = await workerUpdates(workers, version);
    results.deployment = {
      devices: MAX,
      state: final.state,
      devices_updated: installs.updated,
      device_failures: installs.failures,
      reconnect_limit: RECONNECT_LIMIT,
      rss_before_mib: round(before.rss / 1048576),
      peak_rss_mib: round(peakRss / 1048576),
      rss_growth_mib: round((peakRss - before.rss) / 1048576),
    };
    for (const [i, f] of stageFigures.entries())
      for (const [k, v] of Object.entries(f)) results.deployment[`stage${i + 1}_${k}`] = v;
    log(`deployment: ${JSON.stringify(results.deployment)}`);
    await Promise.all(workers.map((w) => w.rpc.call('autoUpdate', { on: false })));
    await Promise.all(workers.map((w) => w.rpc.call('closeAll')));
  } finally {
    await server.stop();
  }
}

// ---- main -----------------------------------------------------------------------------------

const started = Date.now();
let sha = 'unknown';
try {
  sha = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT }).toString().trim();
} catch {
  // not a git checkout
}
results.meta = {
  date: new Date().toISOString(),
  git_sha: sha,
  mode: scale ? 'scale' : 'quick',
  max_devices: MAX,
  workers: WORKERS,
  cpus: os.cpus().length,
  node: process.version,
  allocator: ALLOCATOR,
  loadavg_start: os.loadavg().map((l) => round(l)),
};

// --only=deployment runs that phase alone (no main phase, no baselines).
const deploymentOnly = only?.every((p) => p === 'deployment') ?? false;
const workers = await startWorkers();
try {
  if (!deploymentOnly) {
    if (MAIN_DB === 'postgres') await withPostgres((url) => fleethubPhase(workers, url));
    else await fleethubPhase(workers);
  }
  // --fleethub-only: profiling runs without the baselines (their table has no ratios).
  if (!argv.includes('--fleethub-only') && !deploymentOnly) {
    await floorPhase(workers);
    await mosquittoPhase(workers);
  }
  if (runs('deployment')) {
    if (MAIN_DB === 'postgres') await withPostgres((url) => deploymentPhase(workers, url));
    else await deploymentPhase(workers);
  }
  if (runs('ingest') && !deploymentOnly) {
    if (MAIN_DB === 'postgres') await ingestOnlyPhase(workers, 'pglite');
    await withPostgres((url) => ingestOnlyPhase(workers, 'postgres', url));
  }
} finally {
  killAll();
}
results.meta.duration_s = round((Date.now() - started) / 1000, 1);
results.meta.loadavg_end = os.loadavg().map((l) => round(l));

const summary = summarize(results, MAX);
console.log(printTable(summary));
const dir = path.join(ROOT, 'bench', 'results');
mkdirSync(dir, { recursive: true });
const json = JSON.stringify({ ...summary, details: results }, null, 2);
writeFileSync(path.join(dir, `${new Date().toISOString().slice(0, 10)}-${sha}.json`), json);
// A run without baselines has no ratios: it must not replace the latest full results.
if (!argv.includes('--fleethub-only') && !deploymentOnly) writeFileSync(path.join(dir, 'latest.json'), json);
log(`done in ${results.meta.duration_s} s; results in bench/results/latest.json`);
process.exit(0);
