/**
 * What an on-call engineer reads: Prometheus metrics (prom-client, one registry per server
 * process, served at `/metrics`) and the domain's story as log lines — a device connected or
 * disconnected (reason, duration), each update transition. Both come from the same committed
 * domain events (`FleetObserver`), so a log line and a counter never disagree.
 * Every metric is described in docs/metrics.md.
 */
import { timingSafeEqual } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import client from 'prom-client';
import type { PubSubWithStats } from './channels/index.ts';
import type { Db } from './db/index.ts';
import type { FleetEvent, FleetObserver } from './fleet/context.ts';
import type { Logger } from './log.ts';

/** Seconds: from 0.1 ms (a small broadcast) to 5 s (a 20k-device group on a busy node). */
const LATENCY_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

export interface MetricsDeps {
  db: Db;
  pubsub: PubSubWithStats;
  log: Logger;
}

export class Metrics {
  readonly registry = new client.Registry();
  readonly joins: client.Counter<'protocol'>;
  readonly disconnects: client.Counter<'protocol'>;
  readonly refusedHandshakes: client.Counter<'stage' | 'reason'>;
  readonly fanout: client.Histogram<'socket'>;
  readonly transitions: client.Counter<'state'>;
  readonly reportIngest: client.Histogram<'event'>;
  readonly pubsubLag: client.Histogram;
  readonly dbPoolWait: client.Histogram;
  readonly firmwareDownloads: client.Counter<'completed'>;
  readonly firmwareBytes: client.Counter;
  /** This node's deployment orchestrator's running totals (server/main.ts sets it once it runs). */
  deploymentStats: (() => { steps: number; retried: number; penalized: number }) | undefined;

  constructor(deps: MetricsDeps) {
    const registers = [this.registry];
    const { db, pubsub, log } = deps;
    // Event-loop lag, heap, RSS, GC, handles: prom-client's standard process and Node.js metrics.
    client.collectDefaultMetrics({ register: this.registry });

    new client.Gauge({
      name: 'fleethub_connected_devices',
      help: 'Devices online, by protocol and by the node holding the connection (whole cluster, from the database)',
      labelNames: ['protocol', 'node'],
      registers,
      async collect() {
        try {
          const rows = await db
            .selectFrom('devices')
            .select(['protocol', 'connected_node', (eb) => eb.fn.countAll<number>().as('n')])
            .where('connection_status', '=', 'online')
            .groupBy(['protocol', 'connected_node'])
            .execute();
          this.reset();
          for (const r of rows) this.set({ protocol: r.protocol, node: r.connected_node ?? '' }, Number(r.n));
        } catch (err) {
          log.warn({ err }, 'metrics: could not count connected devices');
        }
      },
    });
    byState(
      'fleethub_update_attempts',
      'Update attempts by state (whole cluster, from the database)',
      'update attempts',
      () =>
        db
          .selectFrom('update_attempts')
          .select(['state', (eb) => eb.fn.countAll<number>().as('n')])
          .groupBy('state')
          .execute(),
    );
    byState('fleethub_deployments', 'Deployments by state (whole cluster, from the database)', 'deployments', () =>
      db
        .selectFrom('deployments')
        .select(['state', (eb) => eb.fn.countAll<number>().as('n')])
        .groupBy('state')
        .execute(),
    );
    byState(
      'fleethub_deployment_devices',
      'Devices of active deployments (draft, awaiting approval, running, paused) by their state there, penalty_box included (whole cluster)',
      'deployment devices',
      () =>
        db
          .selectFrom('deployment_devices as dd')
          .innerJoin('deployments as dp', 'dp.id', 'dd.deployment_id')
          .select(['dd.state', (eb) => eb.fn.countAll<number>().as('n')])
          .where('dp.state', 'in', ['draft', 'awaiting_approval', 'running', 'paused'])
          .groupBy('dd.state')
          .execute(),
    );
    const stats = () => this.deploymentStats?.() ?? { steps: 0, retried: 0, penalized: 0 };
    followCounter(
      'fleethub_deployment_steps_total',
      "Deployment steps this node's orchestrator ran (rate() is its activity: a second per held phased deployment at most while one runs, none while only plain targets wait)",
      () => stats().steps,
    );
    followCounter(
      'fleethub_deployment_retries_total',
      "Devices this node's orchestrator told again after a failure or timeout (a deployment retry)",
      () => stats().retried,
    );
    followCounter(
      'fleethub_deployment_penalty_boxed_total',
      "Devices this node's orchestrator put in a deployment's penalty box",
      () => stats().penalized,
    );
    this.joins = new client.Counter({
      name: 'fleethub_device_joins_total',
      help: 'Device connections accepted on this node, by protocol (rate() gives joins per second)',
      labelNames: ['protocol'],
      registers,
    });
    this.disconnects = new client.Counter({
      name: 'fleethub_device_disconnects_total',
      help: 'Device connections ended on this node, by protocol',
      labelNames: ['protocol'],
      registers,
    });
    this.refusedHandshakes = new client.Counter({
      name: 'fleethub_refused_handshakes_total',
      help: 'Device connections refused on the device listener: stage tls (handshake) or upgrade (certificate checks)',
      labelNames: ['stage', 'reason'],
      registers,
    });
    this.fanout = new client.Histogram({
      name: 'fleethub_fanout_seconds',
      help: "Time for one broadcast to be encoded and written to every subscribed socket of this node's endpoint",
      labelNames: ['socket'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.fanout.zero({ socket: 'device' });
    this.transitions = new client.Counter({
      name: 'fleethub_update_transitions_total',
      help: 'Update attempt transitions committed by this node, by the state reached',
      labelNames: ['state'],
      registers,
    });
    this.reportIngest = new client.Histogram({
      name: 'fleethub_report_ingest_seconds',
      help: 'Time from receiving a device update report to its commit, by report event',
      labelNames: ['event'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    followCounter('fleethub_pubsub_published_total', 'Messages this node published', () => pubsub.stats.published);
    followCounter('fleethub_pubsub_received_total', 'Messages received from other nodes', () => pubsub.stats.received);
    this.pubsubLag = new client.Histogram({
      name: 'fleethub_pubsub_lag_seconds',
      help: "Time from another node's publish to its arrival here (PostgreSQL LISTEN/NOTIFY; includes clock skew)",
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.dbPoolWait = new client.Histogram({
      name: 'fleethub_db_pool_wait_seconds',
      help: 'Time a query waited for a database connection from the pool',
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.firmwareDownloads = new client.Counter({
      name: 'fleethub_firmware_downloads_total',
      help: 'Firmware downloads served on this node, by whether the response was sent whole',
      labelNames: ['completed'],
      registers,
    });
    this.firmwareBytes = new client.Counter({
      name: 'fleethub_firmware_bytes_total',
      help: 'Firmware bytes sent on this node',
      registers,
    });

    /** A gauge by `state` counted in the database at scrape time (the whole cluster). */
    function byState(
      name: string,
      help: string,
      what: string,
      count: () => Promise<Array<{ state: string; n: number | string | bigint }>>,
    ): void {
      new client.Gauge({
        name,
        help,
        labelNames: ['state'],
        registers,
        async collect() {
          try {
            const rows = await count();
            this.reset();
            for (const r of rows) this.set({ state: r.state }, Number(r.n));
          } catch (err) {
            log.warn({ err }, `metrics: could not count ${what}`);
          }
        },
      });
    }

    /** A counter that follows a running total kept elsewhere (PubSub's stats, the orchestrator's). */
    function followCounter(name: string, help: string, total: () => number): client.Counter {
      let seen = 0;
      return new client.Counter({
        name,
        help,
        registers,
        collect() {
          const now = total();
          if (now > seen) this.inc(now - seen);
          seen = now;
        },
      });
    }
  }

  /** Prometheus text exposition of every metric. */
  async scrape(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}

/**
 * The label for a refusal reason: ids and fingerprints replaced, so the label has a small,
 * fixed set of values whatever devices send.
 */
export function refusalLabel(reason: string): string {
  return reason
    .replace(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/gi, '<id>')
    .replace(/\b[0-9a-f]{16,}\b/gi, '<hex>')
    .slice(0, 120);
}

/** Attempts whose last logged state we remember, so progress reports do not each log a line. */
const MAX_TRACKED_ATTEMPTS = 50_000;
/** States an attempt never leaves (OPEN_STATES in fleet/reconcile.ts are the others). */
const TERMINAL = new Set(['succeeded', 'failed', 'rolled_back', 'timed_out', 'cancelled']);

/**
 * The domain observer: one log line per device connect and disconnect (protocol, node, reason,
 * duration) and per update transition (a change of state; progress within `downloading` is not a
 * transition), and the matching counters.
 */
export function fleetObserver(log: Logger, metrics?: Metrics): FleetObserver {
  const lastState = new Map<string, string>();
  return {
    committed(event: FleetEvent) {
      const p = event.payload;
      if (event.event === 'device_status') {
        const protocol = typeof p.protocol === 'string' ? p.protocol : 'unknown';
        if (p.status === 'online') {
          if (p.already_online === true) return;
          metrics?.joins.inc({ protocol });
          log.info({ device_id: p.device_id, protocol, node: p.node, firmware_version: p.version }, 'device connected');
        } else if (p.status === 'offline') {
          metrics?.disconnects.inc({ protocol });
          log.info(
            { device_id: p.device_id, protocol, reason: p.reason, connected_ms: p.connected_ms },
            'device disconnected',
          );
        }
        return;
      }
      if (event.event === 'firmware_update') {
        // A target change pushing an update: to one device (its attempt is `sent`) or to a whole group at once.
        const to = event.topic.startsWith('device_id:')
          ? { device_id: event.topic.slice('device_id:'.length) }
          : { topic: event.topic };
        // Never the payload's url: its signature is a credential.
        log.info({ ...to, firmware_id: p.firmware_uuid, version: p.version, size: p.size }, 'update sent');
        return;
      }
      if (event.event === 'update_transition' && typeof p.id === 'string' && typeof p.state === 'string') {
        if (lastState.get(p.id) === p.state) return;
        if (TERMINAL.has(p.state)) lastState.delete(p.id);
        else {
          if (lastState.size >= MAX_TRACKED_ATTEMPTS) lastState.delete(lastState.keys().next().value!);
          lastState.set(p.id, p.state);
        }
        metrics?.transitions.inc({ state: p.state });
        log.info(
          { attempt_id: p.id, device_id: p.device_id, to_version: p.to_version, state: p.state, percent: p.percent },
          'update transition',
        );
      }
    },
    reportIngested(event, seconds) {
      metrics?.reportIngest.observe({ event }, seconds);
    },
  };
}

/**
 * `GET /metrics` on `app`: Prometheus text format. With `token`, only `Authorization: Bearer
 * <token>` is served (401 otherwise); without, anyone who reaches the listener may scrape.
 */
export function registerMetricsRoute(app: FastifyInstance, metrics: Metrics, token?: string): void {
  const expected = token ? Buffer.from(`Bearer ${token}`) : undefined;
  app.get('/metrics', { schema: { hide: true } }, async (request, reply) => {
    if (expected) {
      const got = Buffer.from(request.headers.authorization ?? '');
      if (got.length !== expected.length || !timingSafeEqual(got, expected))
        return reply
          .status(401)
          .header('www-authenticate', 'Bearer')
          .send({ error: { code: 'unauthorized', message: 'scraping needs Authorization: Bearer <metrics token>' } });
    }
    const { contentType, body } = await metrics.scrape();
    return reply.header('content-type', contentType).send(body);
  });
}
