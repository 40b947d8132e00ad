/**
 * The GRiSP edge (grisp_connect): `/grisp-connect/ws` on the mutual-TLS device listener (subprotocol
 * `grisp-io-v1`), the package download route `/grisp/fw/<id>/<expires>/<sig>/<member>` on the
 * same listener (signed by firmware/signing.ts, served by firmware/serve-blob.ts), and the operator
 * REST routes (routes.ts).
 */
import type { IncomingMessage } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { WebSocket } from 'ws';
import type { Firmware } from '../../db/schema.ts';
import { claimCertificateDevice } from '../../fleet/edge-devices.ts';
import type { FleetContext } from '../../fleet/index.ts';
import { isUuid } from '../../fleet/errors.ts';
import type { BlobStore } from '../../firmware/blob-store.ts';
import { PRIVATE_IMMUTABLE, serveBlob } from '../../firmware/serve-blob.ts';
import { bucketedExpiry, signDownloadUrl, verifyDownload } from '../../firmware/signing.ts';
import type { DeviceIdentity } from '../../identity/resolve.ts';
import { apiErrorHandler } from '../../http/errors.ts';
import type { Logger } from '../../log.ts';
import type { EdgeRuntime } from '../runtime.ts';
import {
  DEFAULT_TIMINGS,
  defaultHealthCheck,
  GrispConnection,
  type GrispTimings,
  type HealthCheck,
} from './connection.ts';
import { GRISP_FORMAT, indexGrispPackage, type PackageIndex } from './package.ts';
import { registerGrispRoutes } from './routes.ts';

export const GRISP_SUBPROTOCOL = 'grisp-io-v1';
export const GRISP_PATH = '/grisp-connect/ws';

export interface GrispEdgeDeps {
  fleet: FleetContext;
  /** The node's edge runtime: links, their PubSub subscriptions, drain at shutdown. */
  runtime: EdgeRuntime;
  log: Logger;
  blobs: BlobStore;
  /** HMAC key of package URLs. */
  secret: string;
  /** The mutual-TLS device listener's app (sets `request.deviceIdentity`). */
  deviceApp: FastifyInstance;
  /** The operator API app: REST routes are mounted under /api/v1 when given (else mount `grispApiRoutes`). */
  api?: FastifyInstance;
  /** Public base URL of the device listener (known after listen, hence a function). */
  deviceBaseUrl: () => string;
  urlTtlSeconds?: number;
  timings?: Partial<GrispTimings>;
  /** Decides whether a freshly booted image may be validated (default: release name and version look sane). */
  healthCheck?: HealthCheck;
}

export interface GrispEdge {
  /** Boards connected to this node, by device id. */
  connections: Map<string, GrispConnection>;
  /** The signed package URL for a firmware. */
  packageUrl(firmware: Pick<Firmware, 'id'>): string;
  /** Changes timings (for connections made from now on) and the health check (tests, labs). */
  configure(o: { timings?: Partial<GrispTimings>; healthCheck?: HealthCheck }): void;
  close(): Promise<void>;
}

const edges = new WeakMap<object, GrispEdge>();

/** The GRiSP edge mounted on a device listener app, if any. */
export function grispEdgeOf(deviceApp: object): GrispEdge | undefined {
  return edges.get(deviceApp);
}

/** `handleProtocols` for the device listener: `grisp-io-v1` when offered, else `fallback`. */
export function grispProtocolHandler(fallback: (protocols: Set<string>, request: IncomingMessage) => string | false) {
  return (protocols: Set<string>, request: IncomingMessage): string | false =>
    protocols.has(GRISP_SUBPROTOCOL) ? GRISP_SUBPROTOCOL : fallback(protocols, request);
}

/** Mounts the GRiSP socket and package downloads on the device listener (before it listens); closes with it. */
export async function registerGrispEdge(deps: GrispEdgeDeps): Promise<GrispEdge> {
  const log = deps.log.child({ edge: 'grisp' });
  const timings: GrispTimings = { ...DEFAULT_TIMINGS, ...deps.timings };
  let healthCheck: HealthCheck = deps.healthCheck ?? defaultHealthCheck;
  const connections = new Map<string, GrispConnection>();
  const packages = new PackageCache(deps.blobs);
  const ttl = deps.urlTtlSeconds ?? 86_400;
  const packageUrl = (firmware: Pick<Firmware, 'id'>) =>
    signDownloadUrl({
      baseUrl: deps.deviceBaseUrl(),
      secret: deps.secret,
      grant: { route: 'grisp', firmwareId: firmware.id },
      expiresAt: bucketedExpiry(ttl),
    });

  deps.deviceApp.get(
    GRISP_PATH,
    {
      websocket: true,
      // Without the subprotocol this is not a grisp_connect client: refuse the upgrade.
      preValidation: async (request: FastifyRequest, reply: FastifyReply) => {
        if (!offeredProtocols(request).has(GRISP_SUBPROTOCOL)) {
          return reply
            .code(400)
            .header('connection', 'close')
            .send({
              error: {
                code: 'invalid',
                message: `offer the WebSocket subprotocol ${GRISP_SUBPROTOCOL} (Sec-WebSocket-Protocol)`,
              },
            });
        }
        // The certificate's device must be (or become) a GRiSP board: a Phoenix device's certificate is not a GRiSP credential.
        const identity = (request as FastifyRequest & { deviceIdentity?: DeviceIdentity }).deviceIdentity;
        if (identity && !(await claimCertificateDevice(deps.fleet, identity, 'grisp'))) {
          log.warn(
            { device_id: identity.deviceId, identifier: identity.identifier },
            'refused a GRiSP link for a device registered to another protocol',
          );
          return reply
            .code(409)
            .header('connection', 'close')
            .send({
              error: {
                code: 'conflict',
                message:
                  'this certificate belongs to a device registered to another protocol; a GRiSP board needs its own certificate',
              },
            });
        }
      },
    },
    (socket: WebSocket, request: FastifyRequest) => {
      const identity = (request as FastifyRequest & { deviceIdentity?: DeviceIdentity }).deviceIdentity;
      if (!identity) return socket.close(1008, 'no device identity');
      if (deps.runtime.draining) return socket.close(1012, 'server restarting');
      attach(socket, identity);
    },
  );

  // Synchronous: the board may send its first frame right after the upgrade; listeners must be there.
  function attach(socket: WebSocket, identity: DeviceIdentity): void {
    const conn = new GrispConnection(
      socket,
      {
        deviceId: identity.deviceId,
        orgId: identity.orgId,
        productId: identity.productId,
        identifier: identity.identifier,
        certificateId: identity.certificateId,
      },
      {
        fleet: deps.fleet,
        runtime: deps.runtime,
        log,
        timings: { ...timings },
        healthCheck: (input) => healthCheck(input),
        packageUrl,
        onClose: (c) => {
          if (connections.get(c.deviceId) === c) connections.delete(c.deviceId);
        },
      },
    );
    // A board that reconnects replaces its stale link on this node.
    connections.get(identity.deviceId)?.close(1000, 'replaced by a newer connection');
    connections.set(identity.deviceId, conn);
    // Revocation, approval and new targets arrive on the board's own and its groups' topics (runtime).
    conn.start();
  }

  deps.deviceApp.route({
    method: ['GET', 'HEAD'],
    url: '/grisp/fw/:id/:expires/:sig/*',
    exposeHeadRoute: false,
    handler: async (request, reply) => {
      const {
        id,
        expires,
        sig,
        '*': member,
      } = request.params as { id: string; expires: string; sig: string; '*': string };
      const verdict = verifyDownload(deps.secret, { route: 'grisp', firmwareId: id }, { expires, sig });
      if (!verdict.ok)
        return refuse(
          reply,
          403,
          'forbidden',
          verdict.reason === 'expired'
            ? 'the package URL has expired; the server sends a fresh one with the next start_update'
            : verdict.reason === 'malformed'
              ? 'the package URL is malformed: use the URL of the last start_update as it is'
              : 'the package URL signature is invalid',
        );
      const identity = (request as FastifyRequest & { deviceIdentity?: DeviceIdentity }).deviceIdentity;
      if (!identity) return refuse(reply, 401, 'unauthorized', 'connect with the device certificate');
      const firmware = isUuid(id)
        ? await deps.fleet.db.selectFrom('firmware').selectAll().where('id', '=', id).executeTakeFirst()
        : undefined;
      if (!firmware || firmware.product_id !== identity.productId)
        return refuse(reply, 403, 'forbidden', "this firmware does not belong to the device's product");
      if (!firmware.has_blob || !firmware.sha256 || firmware.format !== GRISP_FORMAT)
        return refuse(reply, 404, 'not_found', 'this firmware is not a stored GRiSP package');
      let index: PackageIndex;
      try {
        index = await packages.get(firmware.sha256);
      } catch (err) {
        log.error({ err, firmware_id: firmware.id }, 'the stored GRiSP package cannot be read');
        return refuse(reply, 500, 'internal', 'the stored package is not a valid GRiSP package; upload it again');
      }
      const entry = index.get(member);
      if (!entry) return refuse(reply, 404, 'not_found', `the package has no member ${JSON.stringify(member)}`);
      // A member is a slice of the stored archive; its tag names both.
      const blob = {
        sha256: firmware.sha256,
        offset: entry.offset,
        size: entry.size,
        etag: `"${firmware.sha256}:${member}"`,
        lastModified: new Date(firmware.uploaded_at),
      };
      return serveBlob(request, reply, blob, {
        blobs: deps.blobs,
        cacheControl: PRIVATE_IMMUTABLE,
        missing: (r) => refuse(r, 404, 'not_found', 'this firmware is not a stored GRiSP package'),
      });
    },
  });

  if (deps.api) {
    await deps.api.register(
      async (scope) => {
        scope.setErrorHandler(apiErrorHandler);
        await registerGrispRoutes(scope, { fleet: deps.fleet, blobs: deps.blobs, connections });
      },
      { prefix: '/api/v1' },
    );
  }

  let closed = false;
  const edge: GrispEdge = {
    connections,
    packageUrl,
    configure(o) {
      Object.assign(timings, o.timings);
      if (o.healthCheck) healthCheck = o.healthCheck;
    },
    async close() {
      if (closed) return;
      closed = true;
      for (const conn of connections.values()) conn.close(1012, 'server restarting');
    },
  };
  deps.deviceApp.addHook('onClose', async () => edge.close());
  edges.set(deps.deviceApp, edge);
  return edge;
}

/** `grispApiRoutes({fleet, blobs})`: the REST routes as an `ApiPlugin` for `registerApi`'s extra list. */
export function grispApiRoutes(deps: { fleet: FleetContext; blobs: BlobStore; edge?: GrispEdge }) {
  return async (api: FastifyInstance) =>
    registerGrispRoutes(api, {
      fleet: deps.fleet,
      blobs: deps.blobs,
      connections: deps.edge?.connections ?? new Map(),
    });
}

function offeredProtocols(request: FastifyRequest): Set<string> {
  const header = request.headers['sec-websocket-protocol'];
  const raw = Array.isArray(header) ? header.join(',') : (header ?? '');
  return new Set(
    raw
      .split(',')
      .map((p) => p.trim())
      .filter(Boolean),
  );
}

function refuse(reply: FastifyReply, status: number, code: string, message: string): FastifyReply {
  return reply.status(status).send({ error: { code, message } });
}

/** Member indexes of stored packages, by sha256 (immutable, so cached; bounded). */
class PackageCache {
  readonly #blobs: BlobStore;
  readonly #entries = new Map<string, Promise<PackageIndex>>();

  constructor(blobs: BlobStore) {
    this.#blobs = blobs;
  }

  get(sha256: string): Promise<PackageIndex> {
    let entry = this.#entries.get(sha256);
    if (!entry) {
      entry = this.#blobs.open(sha256).then((stream) => indexGrispPackage(stream));
      entry.catch(() => this.#entries.delete(sha256));
      if (this.#entries.size >= 64) this.#entries.delete(this.#entries.keys().next().value!);
      this.#entries.set(sha256, entry);
    }
    return entry;
  }
}

export { defaultHealthCheck, type HealthCheck, type GrispTimings } from './connection.ts';
export { GRISP_FORMAT, indexGrispPackage } from './package.ts';
