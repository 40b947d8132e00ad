/**
 * The WiFiDogX edge: `/ws/wifidogx` on the API listener (plain or TLS, as the
 * listener is; approved gateways add `?credential=<theirs>`, credentials.ts), the gateway firmware
 * downloads `/fw/<firmware id>/<device id>/<expires>/<hex hmac>` on the same listener (gateways
 * have no client certificate: the signed, expiring path bound to the gateway is the credential,
 * and the gateway must still be approved when it downloads; download.ts), and the operator REST
 * routes (routes.ts).
 */
import type { Socket } from 'node:net';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { WebSocket } from 'ws';
import type { PubSub } from '../../channels/types.ts';
import type { Firmware } from '../../db/schema.ts';
import { deviceById } from '../../fleet/devices.ts';
import { productResolver, type FleetContext } from '../../fleet/index.ts';
import type { BlobStore } from '../../firmware/blob-store.ts';
import { apiErrorHandler } from '../../http/errors.ts';
import type { Logger } from '../../log.ts';
import type { EdgeRuntime } from '../runtime.ts';
import { WifidogxConnection, type WifidogxTimings } from './connection.ts';
import { CLOSE, WIFIDOGX_AUTH_POLICIES, WIFIDOGX_PATH, type WifidogxAuthPolicy } from './credentials.ts';
import { registerWifidogxDownloads, wifidogxFirmwareUrl } from './download.ts';

export { WIFIDOGX_PATH };
import { registerWifidogxRoutes } from './routes.ts';

export interface WifidogxEdgeDeps {
  fleet: FleetContext;
  /** Operator commands are published on it (routes.ts). */
  pubsub: PubSub;
  /** The node's edge runtime: links, their PubSub subscriptions, drain at shutdown. */
  runtime: EdgeRuntime;
  log: Logger;
  blobs: BlobStore;
  secret: string;
  /** The API listener's app (its @fastify/websocket is registered by the operator socket). */
  api: FastifyInstance;
  /** Public base URL of the API listener as gateways reach it (known after listen). */
  apiBaseUrl: () => string;
  /** Config `wifidogxAutoApprove`: approve unknown gateways automatically (labs; needs `auth: 'open'`). */
  autoApprove: boolean;
  /** Config `wifidogxAuth` (default `secure`): see credentials.ts. */
  auth?: WifidogxAuthPolicy;
  /** Config `wifidogxMaxUnidentified`: connections that have not sent `connect` yet, at most (default 1000). */
  maxUnidentified?: number;
  /** Org and product (names or ids) unknown gateways are registered in (default: `default`/`default`). */
  home?: { org: string; product: string };
  urlTtlSeconds?: number;
  timings?: Partial<WifidogxTimings>;
}

export interface WifidogxEdge {
  connections: Map<string, WifidogxConnection>;
  /** The signed image URL for one gateway (device id). */
  firmwareUrl(firmware: Pick<Firmware, 'id'>, deviceId: string): string;
  configure(o: {
    timings?: Partial<WifidogxTimings>;
    autoApprove?: boolean;
    auth?: WifidogxAuthPolicy;
    maxUnidentified?: number;
  }): void;
  /** Connections open now that have not identified themselves. */
  unidentified(): number;
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
  const timings: WifidogxTimings = { livenessMs: 150_000, frameGapMs: 100, identifyTimeoutMs: 10_000, ...deps.timings };
  const settings = {
    autoApprove: deps.autoApprove,
    auth: deps.auth ?? 'secure',
    maxUnidentified: deps.maxUnidentified ?? 1000,
  };
  checkSettings(settings);
  const connections = new Map<string, WifidogxConnection>();
  const unidentified = new Set<WifidogxConnection>();
  const ttl = deps.urlTtlSeconds ?? 86_400;
  const firmwareUrl = (firmware: Pick<Firmware, 'id'>, deviceId: string) =>
    wifidogxFirmwareUrl({ baseUrl: deps.apiBaseUrl(), secret: deps.secret, ttlSeconds: ttl, firmware, deviceId });
  const homeProduct = productResolver(fleet, deps.home?.org, deps.home?.product);
  const resolveHome = async () => {
    const product = await homeProduct();
    return { orgId: product.org_id, productId: product.id };
  };

  /** The takeover rule (docs/edges/wifidogx.md): a newer link replaces a pending or authenticated one here. */
  async function claim(deviceId: string, conn: WifidogxConnection): Promise<boolean> {
    const device = await deviceById(fleet.db, deviceId);
    const local = connections.get(deviceId);
    const approved = device?.approval === 'approved';
    if (local && local !== conn) {
      if (approved && !conn.authenticated) return false;
      local.close(CLOSE.connectedElsewhere, 'replaced by a newer claim');
    }
    unidentified.delete(conn);
    if (
      approved &&
      device.connection_status === 'online' &&
      device.connected_node &&
      device.connected_node !== fleet.nodeName
    )
      return false;
    // Its topic (revocation, approval, commands, targets) reaches it through the runtime.
    connections.set(deviceId, conn);
    return true;
  }

  await deps.api.register(async (scope) => {
    scope.get(WIFIDOGX_PATH, { websocket: true }, (socket: WebSocket, request: FastifyRequest) => {
      const remote = request.raw.socket.remoteAddress ?? null;
      if (deps.runtime.draining) return socket.close(1012, 'server restarting');
      if (unidentified.size >= settings.maxUnidentified) {
        log.warn(
          { remote, limit: settings.maxUnidentified },
          'too many wifidogx connections waiting for their connect; refusing one',
        );
        socket.close(CLOSE.tooManyUnidentified, 'too many unidentified connections; try again later');
        return;
      }
      const query = request.query as Record<string, unknown>;
      // A repeated or non-string credential is presented but matches nothing.
      const credential =
        query.credential === undefined ? undefined : typeof query.credential === 'string' ? query.credential : '';
      const conn = new WifidogxConnection(socket, request.raw.socket as Socket, {
        fleet,
        runtime: deps.runtime,
        log,
        timings: { ...timings },
        autoApprove: settings.autoApprove,
        policy: settings.auth,
        credential,
        remote,
        home: resolveHome,
        firmwareUrl,
        claim,
        onClose: (c) => {
          unidentified.delete(c);
          if (c.ref && connections.get(c.ref.deviceId) === c) connections.delete(c.ref.deviceId);
        },
      });
      unidentified.add(conn);
      conn.start();
    });

    registerWifidogxDownloads(scope, { fleet, blobs: deps.blobs, secret: deps.secret, log });
  });

  await deps.api.register(
    async (scope) => {
      scope.setErrorHandler(apiErrorHandler);
      await registerWifidogxRoutes(scope, { fleet, pubsub: deps.pubsub, connections, policy: () => settings.auth });
    },
    { prefix: '/api/v1' },
  );

  let closed = false;
  const edge: WifidogxEdge = {
    connections,
    firmwareUrl,
    configure(o) {
      const next = { ...settings };
      if (o.autoApprove !== undefined) next.autoApprove = o.autoApprove;
      if (o.auth !== undefined) next.auth = o.auth;
      if (o.maxUnidentified !== undefined) next.maxUnidentified = o.maxUnidentified;
      checkSettings(next);
      Object.assign(settings, next);
      Object.assign(timings, o.timings);
    },
    unidentified: () => unidentified.size,
    async close() {
      if (closed) return;
      closed = true;
      for (const conn of new Set(connections.values())) conn.close(1012, 'server restarting');
    },
  };
  deps.api.addHook('onClose', async () => edge.close());
  edges.set(deps.api, edge);
  return edge;
}

/** Options are checked when the edge is mounted (and reconfigured), not when a gateway shows up. */
function checkSettings(s: { autoApprove: boolean; auth: string; maxUnidentified: number }): void {
  if (!WIFIDOGX_AUTH_POLICIES.includes(s.auth as WifidogxAuthPolicy))
    throw new Error(
      `--wifidogx-auth must be one of ${WIFIDOGX_AUTH_POLICIES.join(', ')}, got ${JSON.stringify(s.auth)}`,
    );
  if (!Number.isInteger(s.maxUnidentified) || s.maxUnidentified < 1)
    throw new Error(`--wifidogx-max-unidentified must be a positive integer, got ${s.maxUnidentified}`);
  // Auto-approval trusts a bare device_id claim, which is exactly what the secure policy refuses to do.
  if (s.autoApprove && s.auth === 'secure')
    throw new Error(
      '--wifidogx-auto-approve approves gateways on their bare claim: it needs --wifidogx-auth open (labs only)',
    );
}

export { isSafeFirmwareUrl, gatewayVersion, MAX_FRAME_BYTES } from './frames.ts';
export { CLOSE as WIFIDOGX_CLOSE, type WifidogxAuthPolicy } from './credentials.ts';
