import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { DeviceClient, type DeviceClientOptions } from '../../device-client/index.ts';
import { uploadFirmwareStream } from '../../server/cli/firmware.ts';
import { imageChunks } from '../firmware/harness.ts';
import { createProcessDatabase } from './db.ts';
import { deviceCert, getTestPki } from './pki.ts';
import { until } from './until.ts';
import { apiCaller, type ApiCall } from './api-call.ts';

const CLI = path.resolve(import.meta.dirname, '../../server/cli/index.ts');
/** The compiled build's bin, as `npm start` and the Docker image run it (needs `npm run build`). */
export const COMPILED_BIN = path.resolve(import.meta.dirname, '../../bin/fleethub.js');

export interface ServerProcess {
  child: ChildProcess;
  /** `http://127.0.0.1:<port>` of the operator API. */
  apiUrl: string;
  /** `wss://localhost:<port>/socket` of the mutual-TLS device listener. */
  socketUrl: string;
  /** Everything the process printed (banner and log lines). */
  output(): string;
  /** `kill -9`: no drain, no shutdown hook, as a crash or the OOM killer. */
  kill(): Promise<void>;
}

export interface ServerProcessOptions {
  /** Default: `data` and `data/pki` in `cwd`, as `npm start` uses them. */
  dataDir?: string;
  certsDir?: string;
  /** Working directory of the server (default: this one). */
  cwd?: string;
  /** PostgreSQL URL; PGlite when absent. */
  databaseUrl?: string;
  nodeName?: string;
  env?: NodeJS.ProcessEnv;
  /** Run a compiled build's bin (`COMPILED_BIN`, or a copy of bin/ beside another build) instead of the sources, with no tsx. */
  compiled?: boolean | string;
  /**
   * The operator API and device listener ports (default: ephemeral). Fixed ports let a server
   * started again after a crash be where its devices reconnect (`freePort`).
   */
  ports?: { api: number; device: number };
  /** More `fleethub serve` flags. */
  extraArgs?: string[];
}

/**
 * `fleethub serve` in its own process, on ephemeral ports, as an operator starts it: resolves
 * once the banner names the listeners. Only `kill()` or the test's end stops it.
 */
export async function startServerProcess(options: ServerProcessOptions): Promise<ServerProcess> {
  const args = [
    // tsx resolved here: the server's cwd may be outside the repository.
    ...(options.compiled
      ? [typeof options.compiled === 'string' ? options.compiled : COMPILED_BIN]
      : ['--import', import.meta.resolve('tsx'), CLI]),
    'serve',
    ...(options.dataDir ? ['--data-dir', options.dataDir] : []),
    ...(options.certsDir ? ['--certs-dir', options.certsDir] : []),
    '--host',
    '127.0.0.1',
    '--api-port',
    String(options.ports?.api ?? 0),
    '--device-port',
    String(options.ports?.device ?? 0),
    '--keyauth-port',
    '-1',
    '--device-public-url',
    `https://localhost:${options.ports?.device ?? 0}`,
  ];
  if (options.nodeName) args.push('--node-name', options.nodeName);
  if (options.extraArgs) args.push(...options.extraArgs);
  const env: NodeJS.ProcessEnv = { ...process.env, FLEETHUB_LOG_LEVEL: 'warn', ...options.env };
  if (options.databaseUrl) env.DATABASE_URL = options.databaseUrl;
  else delete env.DATABASE_URL;
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env, cwd: options.cwd });
  process.once('exit', () => child.kill('SIGKILL'));
  let text = '';
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
  const exited = once(child, 'exit');
  const banner = await new Promise<{ apiUrl: string; socketUrl: string }>((resolve, reject) => {
    const check = () => {
      const api = /operator API\s+(http:\/\/\S+?)\/api\/v1/.exec(text);
      const socket = /devices \(mTLS\)\s+(wss:\/\/\S+\/socket)/.exec(text);
      if (api && socket) {
        child.stdout!.off('data', check);
        resolve({ apiUrl: api[1]!, socketUrl: socket[1]! });
      }
    };
    child.stdout!.on('data', check);
    void exited.then(([code]) => reject(new Error(`fleethub serve exited (${code}) before it was ready:\n${text}`)));
  });
  return {
    child,
    ...banner,
    output: () => text,
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGKILL');
      await exited;
    },
  };
}

/** A free TCP port on 127.0.0.1 (to start a server again on the same ports). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

export interface ApiSession {
  token: string;
  /** Calls the operator API; throws on a non-2xx answer with the server's error. */
  call: ApiCall;
}

/** Logs in to a server process's operator API as `admin`. */
export async function loginTo(server: ServerProcess, admin: { email: string; password: string }): Promise<ApiSession> {
  const login = await fetch(`${server.apiUrl}/api/v1/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(admin),
  });
  if (login.status !== 200) throw new Error(`login to ${server.apiUrl} → ${login.status} ${await login.text()}`);
  const { token } = (await login.json()) as { token: string };
  const call = apiCaller(server.apiUrl, token);
  return { token, call };
}

/** A server process, logged in to its operator API. */
export interface ApiServer extends ApiSession {
  server: ServerProcess;
}

/** One server to kill and start again on the same data, database and ports (crash tests). */
export interface RestartableServer {
  dataDir: string;
  /** Starts `fleethub serve` (again), logged in as the admin. */
  start(): Promise<ApiServer>;
  /** Kills what still runs, drops the database and removes the data. */
  close(): Promise<void>;
}

/** A `RestartableServer` with a fresh data directory and (on PostgreSQL) a database of its own. */
export async function restartableServer(
  name: string,
  admin: { email: string; password: string },
): Promise<RestartableServer> {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), `fleethub-${name}-`));
  const database = await createProcessDatabase(name.replace(/\W/g, '_'));
  const ports = { api: await freePort(), device: await freePort() };
  const servers: ServerProcess[] = [];
  return {
    dataDir,
    async start() {
      const server = await startServerProcess({
        dataDir,
        certsDir: (await getTestPki()).dir,
        databaseUrl: database?.url,
        env: { FLEETHUB_ADMIN_EMAIL: admin.email, FLEETHUB_ADMIN_PASSWORD: admin.password },
        // The same ports every time, so the devices reconnect to the restarted server.
        ports,
      });
      servers.push(server);
      return { server, ...(await loginTo(server, admin)) };
    },
    async close() {
      for (const server of servers) await server.kill();
      await database?.drop();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** Uploads `size` seeded bytes (`imageChunks`) as `version` of the default product of the default org. */
export async function uploadImage(
  s: ApiServer,
  version: string,
  size: number,
  seed: number,
): Promise<{ id: string; version: string }> {
  return (await uploadFirmwareStream({
    client: { url: s.server.apiUrl, token: s.token },
    query: { org: 'default', product: 'default', version },
    source: Readable.from(imageChunks(size, seed)),
    size,
  })) as { id: string; version: string };
}

/** An update attempt as the operator API lists it. */
export interface AttemptRow {
  id: string;
  state: string;
  to_version: string;
  percent: number | null;
  bytes: number | null;
  errors: string[] | null;
}

/** The update attempts of device `serial` of the default org, newest first. */
export async function attemptsOf(s: ApiSession, serial: string): Promise<AttemptRow[]> {
  return (await s.call<{ items: AttemptRow[] }>('GET', `/api/v1/orgs/default/devices/${serial}/updates?limit=100`))
    .items;
}

/** The audit records of update attempt `id` of the default org, oldest first. */
export async function attemptAudit(
  s: ApiSession,
  id: string,
): Promise<{ action: string; details: Record<string, unknown> }[]> {
  const audit = await s.call<{ items: { action: string; details: Record<string, unknown> }[] }>(
    'GET',
    `/api/v1/orgs/default/audit?resource_type=update_attempt&resource_id=${id}&limit=100`,
  );
  return audit.items.reverse();
}

/** Starts `count` device clients `<prefix>-NN` (NN from 00) on `firmware`, connecting to `url`. */
export async function startDeviceClients(o: {
  prefix: string;
  count: number;
  url: string;
  dataDir: string;
  firmware: { id: string; version: string };
  options?: Partial<DeviceClientOptions>;
}): Promise<DeviceClient[]> {
  const pki = await getTestPki();
  const clients: DeviceClient[] = [];
  for (let i = 0; i < o.count; i++) {
    const serial = `${o.prefix}-${String(i).padStart(2, '0')}`;
    const cred = await deviceCert(serial);
    const client = new DeviceClient({
      url: o.url,
      tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
      stateDir: path.join(o.dataDir, 'devices', serial),
      firmware: { uuid: o.firmware.id, version: o.firmware.version },
      reconnectAfterMs: () => 200,
      ...o.options,
    });
    clients.push(client);
    await client.start();
  }
  return clients;
}

/** Waits until `count` devices whose identifier contains `q` are online, as `s` sees them. */
export async function untilOnline(s: ApiSession, q: string, count: number, what = 'every device online') {
  await until(
    async () =>
      (
        await s.call<{ items: { connection_status: string }[] }>(
          'GET',
          `/api/v1/orgs/default/devices?q=${encodeURIComponent(q)}&limit=100`,
        )
      ).items.filter((d) => d.connection_status === 'online').length === count,
    what,
    90_000,
  );
}

/** A deployment as the operator API shows it (the fields crash and failover tests read). */
export interface DeploymentSummary {
  id: string;
  state: string;
  counts: Record<string, number>;
}

/** Waits for deployment `id` to complete, as `s` sees it; the error names the last counts and failed rows. */
export async function untilDeploymentCompleted(s: ApiSession, id: string, what: string): Promise<DeploymentSummary> {
  let last: DeploymentSummary | undefined;
  return until(
    async () => {
      last = await s.call<DeploymentSummary>('GET', `/api/v1/orgs/default/deployments/${id}`);
      return last.state === 'completed' && last;
    },
    what,
    180_000,
  ).catch(async (err: Error) => {
    const failed = await s.call('GET', `/api/v1/orgs/default/deployments/${id}/devices?state=failed`);
    throw new Error(`${err.message}; last seen ${JSON.stringify(last?.counts)}, failed: ${JSON.stringify(failed)}`);
  });
}

/**
 * What a rate-paced deployment of `count` devices of group `group` that survived a crash or a
 * failover must show: every device succeeded on its first try, the device at index `batch` was
 * told a minute after the first (the rate held), and one attempt per device (nobody told twice).
 */
export async function assertToldOnceAtRate(
  s: ApiSession,
  done: DeploymentSummary,
  o: { count: number; batch: number; group: string; version: string },
): Promise<void> {
  assert.deepEqual(done.counts, {
    total: o.count,
    pending: 0,
    told: o.count,
    in_flight: 0,
    succeeded: o.count,
    failed: 0,
    cancelled: 0,
    retrying: 0,
    penalty_box: 0,
  });
  const rows = await s.call<{ items: { tries: number; state: string; told_at: string }[] }>(
    'GET',
    `/api/v1/orgs/default/deployments/${done.id}/devices?limit=100`,
  );
  assert.equal(rows.items.length, o.count);
  assert.ok(
    rows.items.every((r) => r.tries === 1 && r.state === 'succeeded'),
    JSON.stringify(rows.items),
  );
  const told = rows.items.map((r) => new Date(r.told_at).getTime()).sort((x, y) => x - y);
  const gap = told[o.batch]! - told[0]!;
  assert.ok(gap >= 60_000, `device ${o.batch + 1} was told ${gap} ms after the first`);
  const attempts = await s.call<{ items: { device_id: string; to_version: string; state: string }[] }>(
    'GET',
    `/api/v1/orgs/default/groups/${o.group}/updates?limit=1000`,
  );
  const toRelease = attempts.items.filter((u) => u.to_version === o.version);
  assert.equal(toRelease.length, o.count);
  assert.equal(new Set(toRelease.map((u) => u.device_id)).size, o.count);
  assert.ok(toRelease.every((u) => u.state === 'succeeded'));
}
