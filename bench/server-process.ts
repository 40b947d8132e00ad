/**
 * The fleethub server under test, in its own process: `startServer(config)` exactly as
 * `fleethub serve` runs it (flags after the script name), plus an IPC side door for the
 * coordinator — memory after GC, drain-and-resume (the 1012 reconnect storm), a marker of when
 * a topic's broadcast starts, and on-demand CPU profiles. Run with `--expose-gc`.
 */
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { loadConfig } from '../server/config.ts';
import { startServer } from '../server/main.ts';
import { createUser } from '../server/api/index.ts';
import { progressIngestStats } from '../server/fleet/index.ts';
import { parseCertificatePem } from '../server/identity/index.ts';
import { deviceCredentials } from './lib/certs.ts';
import { nowMs, serveRpc } from './lib/ipc.ts';
import { residentByMapping } from './lib/smaps.ts';

const argv = process.argv.slice(2);
const config = loadConfig(argv);
const server = await startServer(config);
const email = 'bench@example.com';
const password = 'bench-password-123456';
await createUser(server.database.db, { email, password, role: 'admin' });

const gc = (globalThis as { gc?: () => void }).gc;

// Statements executed by the database (PGlite only): the cost model of a connect + join. The pool
// runs data statements as prepared statements (one exchange starting with a Bind message each) and
// everything else through `query`.
let statements = 0;
const BIND = 0x42;
type Pglite = {
  query: (...args: unknown[]) => Promise<unknown>;
  execProtocol: (message: Uint8Array, ...rest: unknown[]) => Promise<unknown>;
};
const pglite = server.database.pglite as unknown as Pglite | undefined;
if (pglite) {
  const query = pglite.query.bind(pglite);
  pglite.query = (...args: unknown[]) => {
    statements++;
    return query(...args);
  };
  const execProtocol = pglite.execProtocol.bind(pglite);
  pglite.execProtocol = (message: Uint8Array, ...rest: unknown[]) => {
    if (message[0] === BIND) statements++;
    return execProtocol(message, ...rest);
  };
}

function memory() {
  if (gc) {
    // Twice: the first pass may only promote.
    gc();
    gc();
  }
  const m = process.memoryUsage();
  return {
    rss: m.rss,
    heapUsed: m.heapUsed,
    heapTotal: m.heapTotal,
    external: m.external,
    arrayBuffers: m.arrayBuffers,
    mappings: residentByMapping(),
    sockets: server.deviceEndpoint.stats.sockets,
    channels: server.deviceEndpoint.stats.channels,
  };
}

/** Broadcast start times per topic: this listener is subscribed before any device joins, so it runs first. */
const broadcastStarts = new Map<string, number[]>();
let peakRss = 0;
let rssTimer: NodeJS.Timeout | undefined;
let profiler: Session | undefined;

serveRpc({
  memory,
  stats: () => {
    const cpu = process.cpuUsage();
    return {
      endpoint: server.deviceEndpoint.stats,
      pubsub: server.pubsub.stats,
      statements,
      // Orchestrator steps (the runtime object is the orchestrator's full stats).
      deploymentSteps: (server.metrics.deploymentStats?.() as { steps?: number } | undefined)?.steps ?? 0,
      cpuMs: (cpu.user + cpu.system) / 1000,
      progress: progressIngestStats(server.fleet),
    };
  },
  async drain() {
    const started = nowMs();
    await server.deviceEndpoint.drain(1012);
    server.deviceEndpoint.resume();
    return { drainMs: nowMs() - started };
  },
  watch(request) {
    const topic = String(request.topic);
    broadcastStarts.set(topic, []);
    server.pubsub.subscribe(topic, (message) => {
      if (message.event === 'firmware_update') broadcastStarts.get(topic)!.push(nowMs());
    });
    return null;
  },
  /**
   * Registers devices [from, to) with their bench certificates in bulk: the same rows
   * just-in-time registration writes, without one transaction per device (setup, not measured).
   */
  async seed(request) {
    const db = server.database.db;
    const org = await db.selectFrom('orgs').select('id').where('name', '=', 'default').executeTakeFirstOrThrow();
    const product = await db
      .selectFrom('products')
      .select('id')
      .where('org_id', '=', org.id)
      .where('name', '=', 'default')
      .executeTakeFirstOrThrow();
    const creds = deviceCredentials(config.certsDir, Number(request.from), Number(request.to));
    const entries = [...creds.certs.entries()];
    for (let i = 0; i < entries.length; i += 500) {
      const chunk = entries.slice(i, i + 500).map(([, pem]) => parseCertificatePem(pem));
      const devices = await db
        .insertInto('devices')
        .values(
          chunk.map((c) => ({
            org_id: org.id,
            product_id: product.id,
            identifier: c.commonName!,
            protocol: 'phoenix' as const,
          })),
        )
        .onConflict((oc) => oc.columns(['product_id', 'identifier']).doNothing())
        .returning(['id', 'identifier'])
        .execute();
      const ids = new Map(devices.map((d) => [d.identifier, d.id]));
      const certs = chunk.filter((c) => ids.has(c.commonName!));
      if (certs.length === 0) continue;
      await db
        .insertInto('device_certificates')
        .values(
          certs.map((c) => ({
            device_id: ids.get(c.commonName!)!,
            fingerprint_sha256: c.fingerprint,
            serial: c.serialNumber,
            subject: c.subject,
            issuer: c.issuer,
            not_before: c.notBefore,
            not_after: c.notAfter,
            pem: c.pem,
          })),
        )
        .onConflict((oc) => oc.column('fingerprint_sha256').doNothing())
        .execute();
    }
    return { seeded: entries.length };
  },
  /** Device ids by identifier (the bench adds devices to groups by id: no lookup per device). */
  async deviceIds(request) {
    const identifiers = request.identifiers as string[];
    const rows = await server.database.db
      .selectFrom('devices')
      .select(['id', 'identifier'])
      .where('identifier', 'in', identifiers)
      .execute();
    const byIdentifier = new Map(rows.map((r) => [r.identifier, r.id]));
    return identifiers.map((i) => byIdentifier.get(i) ?? null);
  },
  broadcastStarts: (request) => broadcastStarts.get(String(request.topic)) ?? [],
  sampleRss(request) {
    if (request.on) {
      peakRss = process.memoryUsage().rss;
      rssTimer = setInterval(() => (peakRss = Math.max(peakRss, process.memoryUsage().rss)), 100);
      return null;
    }
    clearInterval(rssTimer);
    return { peakRss };
  },
  /** A heap snapshot (after GC) to `file`, for per-connection memory analysis. */
  async heapSnapshot(request) {
    gc?.();
    const { writeHeapSnapshot } = await import('node:v8');
    return { file: writeHeapSnapshot(String(request.file)) };
  },
  async profile(request) {
    if (request.start) {
      profiler = new Session();
      profiler.connect();
      await profiler.post('Profiler.enable');
      await profiler.post('Profiler.start');
      return null;
    }
    if (!profiler) return null;
    const { profile } = await profiler.post('Profiler.stop');
    writeFileSync(String(request.file), JSON.stringify(profile));
    profiler.disconnect();
    profiler = undefined;
    return { file: request.file };
  },
  async stop() {
    setTimeout(() => process.exit(0), 15_000).unref();
    await server.close();
    setImmediate(() => process.exit(0));
    return null;
  },
});

process.send?.({ ready: true, apiUrl: server.apiUrl, deviceUrl: server.deviceUrl, email, password, pid: process.pid });
