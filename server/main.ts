/**
 * Wiring and process lifecycle: database, PKI, PubSub, the fleet context, and the listeners.
 * Everything here is composition; behaviour lives in the layers it wires.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { fingerprintOfPem, initDevPki, loadServerCertificate, type PkiMaterial } from '../certs/pki.ts';
import { SYSTEM } from './audit.ts';
import {
  createEndpoint,
  createPubSub,
  PgAdapter,
  phoenixProtocolHandler,
  pubsubAdapterFor,
  type Endpoint,
  type PubSubAdapter,
  type PubSubWithStats,
} from './channels/index.ts';
import type { Config } from './config.ts';
import { openDatabase, type DatabaseHandle } from './db/index.ts';
import { startAutoAnalyze } from './db/analyze.ts';
import { migrateToLatest } from './db/migrate.ts';
import { createDeviceSocket, deviceSocketId } from './device-socket/index.ts';
import { firmwareApiRoutes } from './api/firmware.ts';
import { registerApi } from './api/index.ts';
import { createWebhookService, parseDelays } from './webhooks/index.ts';
import { registerInputGate } from './input-gate.ts';
import { GRISP_PATH, registerGrispEdge } from './edges/grisp/index.ts';
import { limitDeviceRoutes } from './listeners/rate-limit.ts';
import { keyauthApiPlugin, registerKeyauthDownloads, startKeyauth, type KeyauthServer } from './edges/keyauth/index.ts';
import { MAIN_SERVER_PREFIX, mainServerApiPlugin, registerMainServer } from './edges/main-server/index.ts';
import { registerWifidogxEdge, WIFIDOGX_PATH, type WifidogxAuthPolicy } from './edges/wifidogx/index.ts';
import { EdgeRuntime } from './edges/runtime.ts';
import { registerOperatorSocket } from './api/socket.ts';
import { registerDashboard } from './web/index.ts';
import { LocalBlobStore } from './firmware/blob-store.ts';
import { createFirmwareUrlSigner, registerFirmwareDownload } from './firmware/download.ts';
import {
  createOrg,
  createProduct,
  FINAL_STATES,
  FleetError,
  getOrg,
  getProduct,
  markNodeAlive,
  observedBus,
  pubsubBus,
  reconcileOfflineDevices,
  removeNode,
  revocationOf,
  sweepStaleUpdates,
  DEVICE_TOPIC_PREFIX,
  type FleetContext,
  type FleetObserver,
} from './fleet/index.ts';
import { DEPLOYMENTS_TOPIC, DeploymentOrchestrator } from './fleet/deployments/index.ts';
import { addSignerCa, listSignerCas, notifySignerCasChanged, onSignerCasChanged } from './identity/index.ts';
import { createDeviceListener, deviceIdentityOf, type DeviceListener } from './listeners/device.ts';
import { createLogger, RedactingLogController, type Logger } from './log.ts';
import { fleetObserver, Metrics, refusalLabel, registerMetricsRoute } from './observability.ts';
import { observeDownloads } from './firmware/serve-blob.ts';

export interface StartOptions {
  /** An already-open database (tests); otherwise opened from the config. */
  database?: DatabaseHandle;
  log?: Logger;
  /** How PubSub reaches other nodes (e.g. `PgAdapter`); default: in-process only. Stopped by `close()`. */
  pubsubAdapter?: PubSubAdapter;
}

export interface RunningServer {
  config: Config;
  log: Logger;
  database: DatabaseHandle;
  pubsub: PubSubWithStats;
  fleet: FleetContext;
  /** The server certificate; the development CAs too unless in production mode. */
  pki: Pick<PkiMaterial, 'dir' | 'server'> | PkiMaterial;
  secret: string;
  deviceListener: DeviceListener;
  deviceEndpoint: Endpoint;
  operatorEndpoint: Endpoint;
  api: FastifyInstance;
  blobs: LocalBlobStore;
  /** The keyauth TCP listener, unless disabled (`--keyauth-port -1`). */
  keyauth?: KeyauthServer;
  /** The edges' links on this node (GRiSP, WiFiDogX): drained with 1012 by `close()`. */
  edgeRuntime: EdgeRuntime;
  /** `https://localhost:<port>` of the mutual-TLS device listener. */
  deviceUrl: string;
  /** `http(s)://<host>:<port>` of the operator API (https with `--api-tls`). */
  apiUrl: string;
  /** Prometheus metrics of this process (served at `/metrics` on the API listener). */
  metrics: Metrics;
  /** Stops being ready (`/readyz` answers 503) and closes device and operator sockets with 1012; listeners stay up. */
  drain(): Promise<void>;
  /** Drains (devices reconnect elsewhere) and stops everything. */
  close(): Promise<void>;
}

const NODE_HEARTBEAT_MS = 10_000;
const GRISP_SUBPROTOCOL = 'grisp-io-v1';
const UPDATE_SWEEP_MS = 60_000;
/** A partial upload in a shared blob store not written to for this long was left by a dead node. */
const ABANDONED_UPLOAD_MS = 60 * 60_000;

/** Starts a fleethub node: migrations, PKI, listeners. Resolves once every listener is bound. */
export async function startServer(config: Config, options: StartOptions = {}): Promise<RunningServer> {
  const log = options.log ?? createLogger({ level: config.logLevel });
  mkdirSync(config.dataDir, { recursive: true });

  const database =
    options.database ?? (await openDatabase({ databaseUrl: config.databaseUrl, dataDir: config.dataDir }));
  const ownsDatabase = !options.database;
  await migrateToLatest(database.db, database.schema);
  // PGlite has no autovacuum: analyze the tables that changed since they were last analyzed.
  const stopAutoAnalyze = await startAutoAnalyze(database, log.child({ component: 'db' }));

  const secret = config.secret ?? loadOrCreateSecret(config.dataDir);
  const developmentPki = config.production ? undefined : await devPki(config.certsDir, log);
  const pki = developmentPki ?? loadServerCertificate(config.certsDir);

  // On PostgreSQL, nodes share PubSub through LISTEN/NOTIFY; embedded PGlite is single-node.
  const adapter =
    options.pubsubAdapter ??
    pubsubAdapterFor(database, { log: log.child({ component: 'pubsub' }), nodeName: config.nodeName });
  const pubsub = createPubSub({ adapter, log: log.child({ component: 'pubsub' }) });
  const metrics = new Metrics({ db: database.db, pubsub, log });
  database.poolObserver.onWait = (seconds) => metrics.dbPoolWait.observe(seconds);
  if (adapter instanceof PgAdapter) adapter.onLag = (seconds) => metrics.pubsubLag.observe(seconds);
  // Listen before serving: a node must not miss other nodes' messages, and a bad URL must stop start-up.
  await pubsub.ready;
  const blobs = new LocalBlobStore(path.join(config.dataDir, 'blobs'));
  // Uploads a killed process left half-written. On PGlite this process owns the data directory;
  // on PostgreSQL the blob store may be shared with live nodes, whose uploads are still being written.
  const abandoned = await blobs.removeAbandonedUploads(database.kind === 'pglite' ? 0 : ABANDONED_UPLOAD_MS);
  if (abandoned) log.info({ files: abandoned }, 'removed partial uploads left by a stopped process');

  // The device listener's port is known only after listen(); signed URLs use it lazily.
  let devicePublicUrl = config.devicePublicUrl;
  let signUrl = createFirmwareUrlSigner({ baseUrl: devicePublicUrl, secret, ttlSeconds: config.firmwareUrlTtlSeconds });
  const fleetLog = log.child({ component: 'fleet' });
  // Fleet events become webhook deliveries once published (after their change committed).
  const webhooks = createWebhookService({
    db: database.db,
    log: log.child({ component: 'webhooks' }),
    secret,
    retryDelaysMs: parseDelays(config.webhookRetryDelays),
  });
  const fleet: FleetContext = {
    db: database.db,
    bus: observedBus(pubsubBus(pubsub), (event) => webhooks.onEvents([event]), fleetLog),
    log: fleetLog,
    nodeName: config.nodeName,
    firmwareUrl: (firmware) => signUrl(firmware),
    observer: withDeploymentNudges(fleetObserver(log.child({ component: 'fleet' }), metrics), pubsub),
  };

  if (config.bootstrapDev && developmentPki) await bootstrapDevelopmentTenant(fleet, developmentPki, log);

  // `--allowed-origins '*'` allows any Origin; an empty list means the Origin's host must be the Host.
  const checkOrigin = config.allowedOrigins.includes('*')
    ? '*'
    : config.allowedOrigins.length
      ? config.allowedOrigins
      : undefined;

  // Devices: mutual TLS, Phoenix socket and firmware downloads.
  const deviceListener = await createDeviceListener({
    db: database.db,
    // The listener names itself ({listener: 'device'}); a second child binding would repeat the key in every line.
    log,
    onRefused: (stage, reason) => metrics.refusedHandshakes.inc({ stage, reason: refusalLabel(reason) }),
    tls: pki.server,
    // GRiSP boards offer `grisp-io-v1` (echoed); Phoenix clients may offer a bearer token.
    handleProtocols: (protocols) =>
      protocols.has(GRISP_SUBPROTOCOL) ? GRISP_SUBPROTOCOL : phoenixProtocolHandler(protocols),
    // A LongPoll session outlives the TLS connections its polls came on: end it with them.
    onConnectionsClosed: ({ deviceId, certificateId }, reason) =>
      deviceEndpoint.closeSockets(
        deviceSocketId(deviceId),
        reason,
        (assigns) => certificateId === undefined || assigns.certificateId === certificateId,
      ),
  });
  // Before any device route: the same string gate as the API listener (registerApi adds it there).
  registerInputGate(deviceListener.app as unknown as FastifyInstance);
  await limitDeviceRoutes(deviceListener.app as unknown as FastifyInstance, {
    prefixes: [GRISP_PATH],
    perMinute: config.deviceRateLimit,
    log: log.child({ listener: 'device' }),
  });
  const countDownload = (outcome: { bytes: number; completed: boolean }) => {
    metrics.firmwareDownloads.inc({ completed: String(outcome.completed) });
    metrics.firmwareBytes.inc(outcome.bytes);
  };
  observeDownloads(deviceListener.app as unknown as FastifyInstance, countDownload);
  const deviceSocket = createDeviceSocket(fleet, {
    identityOf: deviceIdentityOf,
    closeLocal: (socketId, reason) => deviceEndpoint.closeSockets(socketId, reason),
  });
  const deviceEndpoint = createEndpoint(deviceSocket, {
    pubsub,
    log: log.child({ socket: 'device' }),
    idleTimeoutMs: config.heartbeatTimeoutMs,
    checkOrigin,
    onFanout: (seconds) => metrics.fanout.observe({ socket: 'device' }, seconds),
  });
  await deviceEndpoint.register(deviceListener.app, { path: '/socket' });
  registerFirmwareDownload(deviceListener.app, { db: database.db, blobs, secret });

  // Several nodes: a signer CA added on one node must be trusted by all.
  const stopCaRelay = relaySignerCaChanges(pubsub, config.nodeName);
  const stopRevocations = closeRevokedConnections(pubsub, deviceListener);

  // Operators: REST API, OpenAPI, live socket.
  // Plain HTTP by default (behind a TLS-terminating proxy, or on loopback); `--api-tls` serves the server certificate.
  const api = Fastify({
    loggerInstance: log.child({ listener: 'api' }),
    logController: new RedactingLogController(),
    bodyLimit: 1024 * 1024,
    ...(config.apiTls
      ? { https: { cert: pki.server.certPem, key: pki.server.keyPem, minVersion: 'TLSv1.2' as const } }
      : {}),
  }) as unknown as FastifyInstance;
  const apiScheme = config.apiTls ? 'https' : 'http';
  observeDownloads(api, countDownload);
  // Gateways, Raspberry Pis and keyauth downloads on the API listener; operators are throttled at login.
  await limitDeviceRoutes(api, {
    prefixes: [MAIN_SERVER_PREFIX, WIFIDOGX_PATH, '/fw/', '/api/keyauth/'],
    perMinute: config.deviceRateLimit,
    log: log.child({ listener: 'api' }),
  });
  let draining = false;
  // Known once listening (port 0 in tests): edges build download URLs from it lazily.
  const apiBaseUrl = () => `${apiScheme}://${hostForUrl(config.host)}:${(api.server.address() as AddressInfo).port}`;
  await registerApi(
    api,
    // identity's addSignerCa/removeSignerCa notify the listener themselves after commit.
    {
      fleet,
      db: database.db,
      log,
      pubsub,
      secret,
      blobs,
      publicUrl: apiBaseUrl,
      webhooks,
      disconnectOperatorSocket: (id, reason) => operatorEndpoint.disconnect(id, reason),
      // Not ready while draining (the balancer stops sending traffic) or when the database does not answer.
      healthy: async () => {
        if (draining) return false;
        await database.db.selectNoFrom((eb) => eb.lit(1).as('one')).execute();
        return true;
      },
    },
    [
      async (scope) => firmwareApiRoutes(scope, { fleet, blobs }),
      mainServerApiPlugin({ fleet, blobs }),
      keyauthApiPlugin({ fleet }),
    ],
  );
  // After registerApi, so the route table (authorization matrix) lists it.
  registerMetricsRoute(api, metrics, config.metricsToken);
  const operatorEndpoint = await registerOperatorSocket(api, {
    db: database.db,
    secret,
    pubsub,
    log,
    idleTimeoutMs: config.heartbeatTimeoutMs,
    checkOrigin,
  });
  // Operator dashboard at `/`: static ES modules, live over the operator socket above.
  await registerDashboard(api);

  // Edges: the other protocols, translated into the same fleet (each closes with its listener).
  const urlTtlSeconds = config.firmwareUrlTtlSeconds;
  const edgeRuntime = new EdgeRuntime({ pubsub, fleet, log: log.child({ component: 'edge-runtime' }) });
  await registerGrispEdge({
    fleet,
    runtime: edgeRuntime,
    log,
    blobs,
    secret,
    deviceApp: deviceListener.app,
    api,
    deviceBaseUrl: () => devicePublicUrl,
    urlTtlSeconds,
    timings: { startUpdateTimeoutMs: config.grispStartUpdateTimeoutMs },
  });
  await registerWifidogxEdge({
    fleet,
    pubsub,
    runtime: edgeRuntime,
    log,
    blobs,
    secret,
    api,
    urlTtlSeconds,
    apiBaseUrl,
    autoApprove: config.wifidogxAutoApprove,
    auth: config.wifidogxAuth as WifidogxAuthPolicy,
    maxUnidentified: config.wifidogxMaxUnidentified,
  });
  const mainServer = await registerMainServer(api, { fleet, blobs, log });
  registerKeyauthDownloads(api, { fleet, blobs, secret });

  // Node liveness: devices whose node is gone are offline (this process restarted, or a peer died).
  await markNodeAlive(fleet);
  // Embedded PGlite belongs to this process alone, so whatever node held a device before is dead:
  // no waiting for its heartbeat to go stale. On PostgreSQL other nodes may be alive.
  const markedOffline = await reconcileOfflineDevices(fleet, {
    ownConnections: true,
    soleNode: database.kind === 'pglite',
  });
  if (markedOffline)
    log.info({ devices: markedOffline }, 'marked devices offline that are not connected to a live node');
  webhooks.start();
  // Phased deployments: every node runs an orchestrator; a lease per deployment lets one act.
  const deployments = new DeploymentOrchestrator(fleet);
  metrics.deploymentStats = () => deployments.stats;
  const stopDeploymentNudges = pubsub.subscribe(DEPLOYMENTS_TOPIC, () => deployments.nudge());
  const timers = [
    setInterval(() => {
      markNodeAlive(fleet)
        .then(() => reconcileOfflineDevices(fleet))
        .catch((err: unknown) => log.error({ err }, 'node heartbeat failed'));
    }, NODE_HEARTBEAT_MS),
    setInterval(() => {
      sweepStaleUpdates(fleet, { defaultTimeoutS: config.updateTimeoutSeconds }).catch((err: unknown) =>
        log.error({ err }, 'update sweep failed'),
      );
    }, UPDATE_SWEEP_MS),
  ];
  for (const t of timers) t.unref();

  await deviceListener.app.listen({ host: config.host, port: config.devicePort });
  await api.listen({ host: config.host, port: config.apiPort });
  deployments.start();
  const devicePort = (deviceListener.app.server.address() as AddressInfo).port;
  const keyauth =
    config.keyauthPort >= 0
      ? await startKeyauth({
          fleet,
          pubsub,
          runtime: edgeRuntime,
          log,
          secret,
          host: config.host,
          port: config.keyauthPort,
          downloadBaseUrl: apiBaseUrl,
        })
      : undefined;
  if (config.devicePort === 0 && config.devicePublicUrl.endsWith(':0')) {
    devicePublicUrl = `https://localhost:${devicePort}`;
    signUrl = createFirmwareUrlSigner({ baseUrl: devicePublicUrl, secret, ttlSeconds: config.firmwareUrlTtlSeconds });
  }

  let closed = false;
  let drained: Promise<void> | undefined;
  const drain = () => {
    draining = true;
    drained ??= Promise.allSettled([
      deviceEndpoint.drain(1012),
      operatorEndpoint.drain(1012),
      edgeRuntime.drain(1012, 'server restarting'),
    ]).then(() => undefined);
    return drained;
  };
  return {
    config,
    log,
    database,
    pubsub,
    fleet,
    pki,
    secret,
    deviceListener,
    deviceEndpoint,
    operatorEndpoint,
    api,
    blobs,
    keyauth,
    metrics,
    edgeRuntime,
    deviceUrl: `https://localhost:${devicePort}`,
    apiUrl: apiBaseUrl(),
    drain,
    async close() {
      if (closed) return;
      closed = true;
      for (const t of timers) clearInterval(t);
      stopDeploymentNudges();
      await deployments.stop();
      await webhooks.stop();
      stopCaRelay();
      stopRevocations();
      await drain();
      await deviceEndpoint.close();
      await operatorEndpoint.close();
      await Promise.allSettled([mainServer.close(), keyauth?.close()]);
      await Promise.allSettled([deviceListener.close(), api.close()]);
      await reconcileOfflineDevices(fleet, { ownConnections: true }).catch(() => 0);
      await removeNode(fleet).catch(() => undefined);
      await pubsub.close();
      await stopAutoAnalyze();
      if (ownsDatabase) await database.close();
    },
  };
}

/**
 * The fleet observer, plus: an update attempt of a deployment reached a final state, so every
 * node's orchestrator hears `deployment_nudge` (the one holding the deployment's lease steps it);
 * one of a plain group target nudges this node's orchestrator only.
 */
function withDeploymentNudges(observer: FleetObserver, pubsub: PubSubWithStats): FleetObserver {
  const finals: readonly string[] = FINAL_STATES;
  return {
    ...observer,
    committed(event) {
      observer.committed?.(event);
      const p = event.payload;
      if (event.event !== 'update_transition' || typeof p.via !== 'string' || !finals.includes(String(p.state))) return;
      if (p.via.startsWith('deployment:'))
        void pubsub.broadcast(DEPLOYMENTS_TOPIC, 'deployment_nudge', { deployment_id: p.via.slice(11) });
      // A plain group target's attempt: its target deployment counts it at this node's next step
      // (a node that does not hold the lease catches up at its idle tick), with no cluster message.
      else if (p.via.startsWith('group:')) pubsub.localBroadcast(DEPLOYMENTS_TOPIC, 'deployment_nudge', {});
    },
  };
}

/** The development PKI, created where missing (never in production mode). */
async function devPki(dir: string, log: Logger): Promise<PkiMaterial> {
  const { created, material } = await initDevPki(dir);
  if (created.length) log.info({ dir, created }, 'created development PKI');
  return material;
}

function hostForUrl(host: string): string {
  if (host === '0.0.0.0' || host === '::') return '127.0.0.1';
  return host.includes(':') ? `[${host}]` : host;
}

/** The signing secret for firmware URLs and JWTs: generated once into the data directory. */
function loadOrCreateSecret(dataDir: string): string {
  const file = path.join(dataDir, 'secret');
  if (existsSync(file)) return readFileSync(file, 'utf8').trim();
  const secret = randomBytes(32).toString('base64url');
  writeFileSync(file, `${secret}\n`, { mode: 0o600, flag: 'wx' });
  return secret;
}

/** First start: an org and product named `default`, with the development signer CA registered for them. */
async function bootstrapDevelopmentTenant(fleet: FleetContext, pki: PkiMaterial, log: Logger): Promise<void> {
  const org = await getOrg(fleet, 'default').catch(async (err: unknown) => {
    if (err instanceof FleetError && err.code === 'not_found') return createOrg(fleet, SYSTEM, { name: 'default' });
    throw err;
  });
  const product = await getProduct(fleet, org.id, 'default').catch(async (err: unknown) => {
    if (err instanceof FleetError && err.code === 'not_found')
      return createProduct(fleet, SYSTEM, { orgId: org.id, name: 'default' });
    throw err;
  });
  const registered = await listSignerCas(fleet.db, { orgId: org.id });
  const fingerprint = fingerprintOfPem(pki.signerCa.certPem);
  if (!registered.some((ca) => ca.fingerprint === fingerprint)) {
    await addSignerCa(fleet.db, SYSTEM, {
      orgId: org.id,
      productId: product.id,
      pem: pki.signerCa.certPem,
      description: 'development signer CA',
    });
    log.info({ org: org.name, product: product.name }, 'registered the development signer CA');
  }
}

const SIGNER_CA_TOPIC = 'fleethub:signer_cas';

/** Local CA changes are published to other nodes; their changes refresh our trust. */
function relaySignerCaChanges(pubsub: PubSubWithStats, nodeName: string): () => void {
  // Listeners run synchronously inside notify, so this flag stops a relayed change from echoing back.
  let relaying = false;
  const stopLocal = onSignerCasChanged(() => {
    if (!relaying) void pubsub.broadcast(SIGNER_CA_TOPIC, 'changed', { node: nodeName });
  });
  const stopRemote = pubsub.subscribe(SIGNER_CA_TOPIC, (message) => {
    if (message.payload.node === nodeName) return;
    relaying = true;
    const done = notifySignerCasChanged();
    relaying = false;
    void done;
  });
  return () => {
    stopLocal();
    stopRemote();
  };
}

/**
 * Every node closes the device connections that a revoked certificate or device authenticated on
 * it, also those no link speaks for yet (sockets before their join, GRiSP boards before they are
 * attached, downloads): it reads the revocations off every device topic, the one publication
 * that also closes the joined channels and the edge links.
 */
function closeRevokedConnections(pubsub: PubSubWithStats, listener: DeviceListener): () => void {
  return pubsub.subscribePrefix(DEVICE_TOPIC_PREFIX, (message) => {
    const revoked = revocationOf(message);
    if (!revoked) return;
    const deviceId = message.topic.slice(DEVICE_TOPIC_PREFIX.length);
    listener.closeConnections({ deviceId, ...revoked }, message.event);
  });
}
