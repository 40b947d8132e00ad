/**
 * The WiFiDogX edge (seed 001): `/ws/wifidogx` on the API listener (plain or TLS, as the
 * listener is), the gateway firmware downloads `/fw/<id>/<expires>/<hex hmac>` on the same
 * listener (gateways have no client certificate: the signed, expiring path is the credential),
 * and the operator REST routes (routes.ts).
 */
import type { Socket } from 'node:net';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { WebSocket } from 'ws';
import type { PubSub } from '../../channels/types.ts';
import type { Firmware } from '../../db/schema.ts';
import { devicesConcernedByTargetChange, transitionAttempt } from '../../fleet/edge-devices.ts';
import { isUuid } from '../../fleet/errors.ts';
import { getOrg, getProduct, Topics, type FleetContext } from '../../fleet/index.ts';
import type { BlobStore } from '../../firmware/blob-store.ts';
import { parseRange } from '../../firmware/download.ts';
import { sendBlob } from '../../firmware/send-blob.ts';
import type { Logger } from '../../log.ts';
import { bucketedExpiry, signPathUrl, verifyPathSignature } from '../grisp/package.ts';
import { WifidogxConnection, type WifidogxTimings } from './connection.ts';
import { registerWifidogxRoutes } from './routes.ts';

export const WIFIDOGX_PATH = '/ws/wifidogx';
const URL_PREFIX = 'fw';

export interface WifidogxEdgeDeps {
  fleet: FleetContext;
  pubsub: PubSub;
  log: Logger;
  blobs: BlobStore;
  secret: string;
  /** The API listener's app (its @fastify/websocket is registered by the operator socket). */
  api: FastifyInstance;
  /** Public base URL of the API listener as gateways reach it (known after listen). */
  apiBaseUrl: () => string;
  /** Config `wifidogxAutoApprove`: approve unknown gateways automatically (labs). */
  autoApprove: boolean;
  /** Org and product (names or ids) unknown gateways are registered in (default: `default`/`default`). */
  home?: { org: string; product: string };
  urlTtlSeconds?: number;
  timings?: Partial<WifidogxTimings>;
  /** An upgrade with no outcome after this long is timed_out (default 15 min). */
  upgradeTimeoutMs?: number;
}

export interface WifidogxEdge {
  connections: Map<string, WifidogxConnection>;
  firmwareUrl(firmware: Pick<Firmware, 'id'>): string;
  configure(o: { timings?: Partial<WifidogxTimings>; upgradeTimeoutMs?: number; autoApprove?: boolean }): void;
  /** Times out upgrades without an outcome (runs periodically; safe on every node). */
  sweepUpgrades(): Promise<number>;
  close(): Promise<void>;
}

const edges = new WeakMap<object, WifidogxEdge>();

/** The WiFiDogX edge mounted on an API app, if any. */
export function wifidogxEdgeOf(api: object): WifidogxEdge | undefined {
  return edges.get(api);
}

/** Mounts the gateway socket, firmware downloads and REST routes on the API app (before it listens); closes with it. */
export async function registerWifidogxEdge(deps: WifidogxEdgeDeps): Promise<WifidogxEdge> {
  const log = deps.log.child({ edge: 'wifidogx' });
  const { fleet } = deps;
  const timings: WifidogxTimings = { livenessMs: 150_000, frameGapMs: 100, ...deps.timings };
  const settings = { autoApprove: deps.autoApprove, upgradeTimeoutMs: deps.upgradeTimeoutMs ?? 15 * 60_000 };
  const connections = new Map<string, WifidogxConnection>();
  const ttl = deps.urlTtlSeconds ?? 86_400;
  const firmwareUrl = (firmware: Pick<Firmware, 'id'>) => signPathUrl({ baseUrl: deps.apiBaseUrl(), prefix: URL_PREFIX, secret: deps.secret, firmwareId: firmware.id, expiresAt: bucketedExpiry(ttl) });
  let home: Promise<{ orgId: string; productId: string }> | undefined;
  const resolveHome = () =>
    (home ??= (async () => {
      const org = await getOrg(fleet, deps.home?.org ?? 'default');
      const product = await getProduct(fleet, org.id, deps.home?.product ?? 'default');
      return { orgId: org.id, productId: product.id };
    })().catch((err: unknown) => {
      home = undefined;
      throw err;
    }));

  const unsubscribers = new Map<WifidogxConnection, () => void>();

  /** The takeover rule (docs/edges/wifidogx.md). */
  async function claim(deviceId: string, conn: WifidogxConnection): Promise<boolean> {
    const device = await fleet.db.selectFrom('devices').select(['approval', 'connection_status', 'connected_node']).where('id', '=', deviceId).executeTakeFirst();
    const local = connections.get(deviceId);
    const approved = device?.approval === 'approved';
    if (local && local !== conn) {
      if (approved) return false;
      local.close(4009, 'replaced by a newer claim');
    }
    if (approved && device.connection_status === 'online' && device.connected_node && device.connected_node !== fleet.nodeName) return false;
    connections.set(deviceId, conn);
    unsubscribers.set(
      conn,
      deps.pubsub.subscribe(Topics.device(deviceId), (message) => {
        switch (message.event) {
          case 'device_revoked':
          case 'device_deleted':
          case 'wifidogx_release':
            conn.close(4003, message.event);
            return;
          case 'device_approved':
            void conn.run(() => conn.becomeApproved());
            return;
          case 'wifidogx_command':
            if (typeof message.payload.command_id === 'string') void conn.run(() => conn.runCommand(message.payload.command_id as string));
            return;
        }
      }),
    );
    return true;
  }

  await deps.api.register(async (scope) => {
    scope.get(WIFIDOGX_PATH, { websocket: true }, (socket: WebSocket, request: FastifyRequest) => {
      const conn = new WifidogxConnection(socket, request.raw.socket as Socket, {
        fleet,
        log,
        timings: { ...timings },
        autoApprove: settings.autoApprove,
        home: resolveHome,
        firmwareUrl,
        claim,
        onClose: (c) => {
          if (c.ref && connections.get(c.ref.deviceId) === c) connections.delete(c.ref.deviceId);
          unsubscribers.get(c)?.();
          unsubscribers.delete(c);
        },
      });
      conn.start();
    });

    scope.route({
      method: ['GET', 'HEAD'],
      url: `/${URL_PREFIX}/:id/:expires/:sig`,
      exposeHeadRoute: false,
      schema: { hide: true },
      handler: async (request, reply) => {
        const { id, expires, sig } = request.params as { id: string; expires: string; sig: string };
        const verdict = verifyPathSignature({ secret: deps.secret, prefix: URL_PREFIX, firmwareId: id, expires, sig });
        if (!verdict.ok) return reply.status(403).send({ error: { code: 'forbidden', message: verdict.reason === 'expired' ? 'the firmware URL has expired' : 'the firmware URL signature is invalid' } });
        const firmware = isUuid(id) ? await fleet.db.selectFrom('firmware').select(['sha256', 'has_blob']).where('id', '=', id).executeTakeFirst() : undefined;
        const stat = firmware?.has_blob && firmware.sha256 ? await deps.blobs.stat(firmware.sha256) : null;
        if (!stat || !firmware?.sha256) return reply.status(404).send({ error: { code: 'not_found', message: 'the firmware image is not stored on the server' } });
        reply.header('accept-ranges', 'bytes').header('etag', `"${firmware.sha256}"`).header('content-type', 'application/octet-stream');
        const range = parseRange(request.headers.range, stat.size);
        if (range === 'unsatisfiable') return reply.status(416).header('content-range', `bytes */${stat.size}`).send();
        if (range) reply.status(206).header('content-range', `bytes ${range.start}-${range.end}/${stat.size}`).header('content-length', range.end - range.start + 1);
        else reply.header('content-length', stat.size);
        if (request.method === 'HEAD') return reply.send();
        return sendBlob(reply, deps.blobs, firmware.sha256, range);
      },
    });
  });

  await deps.api.register(
    async (scope) => {
      const { apiErrorHandler } = await import('../../api/errors.ts');
      scope.setErrorHandler(apiErrorHandler);
      await registerWifidogxRoutes(scope, { fleet, pubsub: deps.pubsub, connections });
    },
    { prefix: '/api/v1' },
  );

  // Retargeting reaches every node; each asks its own gateways for their version (the answer upgrades them).
  const stopTargets = deps.pubsub.subscribe(Topics.targets, (message) => {
    if (message.event !== 'target_changed' || connections.size === 0) return;
    devicesConcernedByTargetChange(fleet.db, message.payload, [...connections.keys()])
      .then((ids) => {
        for (const id of ids) {
          const conn = connections.get(id);
          if (conn) void conn.run(() => conn.recheckFirmware());
        }
      })
      .catch((err: unknown) => log.error({ err }, 'applying a target change to WiFiDogX gateways failed'));
  });

  async function sweepUpgrades(): Promise<number> {
    const cutoff = new Date(Date.now() - settings.upgradeTimeoutMs);
    const stale = await fleet.db
      .selectFrom('update_attempts')
      .select(['device_id', 'org_id', 'firmware_id'])
      .where('via', '=', 'edge:wifidogx')
      .where('state', 'in', ['sent', 'begun', 'downloading', 'finished'])
      .where('updated_at', '<', cutoff)
      .execute();
    let n = 0;
    for (const a of stale) {
      const moved = await transitionAttempt(fleet, { deviceId: a.device_id, orgId: a.org_id }, {
        to: 'timed_out',
        firmwareId: a.firmware_id,
        from: ['sent', 'begun', 'downloading', 'finished'],
        errors: [`the gateway did not come back reporting the target version within ${Math.round(settings.upgradeTimeoutMs / 1000)} s`],
        reason: 'no report within the upgrade timeout',
      });
      if (moved) n++;
    }
    return n;
  }
  const sweeper = setInterval(() => void sweepUpgrades().catch((err: unknown) => log.error({ err }, 'wifidogx upgrade sweep failed')), Math.min(30_000, Math.max(1000, settings.upgradeTimeoutMs / 4)));
  sweeper.unref();

  let closed = false;
  const edge: WifidogxEdge = {
    connections,
    firmwareUrl,
    configure(o) {
      Object.assign(timings, o.timings);
      if (o.upgradeTimeoutMs !== undefined) settings.upgradeTimeoutMs = o.upgradeTimeoutMs;
      if (o.autoApprove !== undefined) settings.autoApprove = o.autoApprove;
    },
    sweepUpgrades,
    async close() {
      if (closed) return;
      closed = true;
      clearInterval(sweeper);
      stopTargets();
      for (const conn of new Set(connections.values())) conn.close(1012, 'server restarting');
    },
  };
  deps.api.addHook('onClose', async () => edge.close());
  edges.set(deps.api, edge);
  return edge;
}

export { isSafeFirmwareUrl, gatewayVersion, MAX_FRAME_BYTES } from './frames.ts';

