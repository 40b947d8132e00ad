/**
 * The keyauth edge: a TCP listener speaking newline-delimited JSON with public-key
 * authorisation (101 → 102/103) and AES-256-GCM/RSA-OAEP envelopes, mapped to the fleet.
 *
 * Wiring (server/main.ts):
 *   registerKeyauthDownloads(api, { fleet, blobs, secret });                    // before api.listen
 *   registerApi(api, deps, [..., keyauthApiPlugin({ fleet })]);                // operator routes
 *   const keyauth = config.keyauthPort ? await startKeyauth({ fleet, pubsub, log, secret, host, port, downloadBaseUrl: () => apiUrl }) : undefined;
 *   ... await keyauth?.close() on shutdown.
 */
import net, { type AddressInfo, type Socket } from 'node:net';
import type { RoutePlugin } from '../../http/errors.ts';
import type { PubSub } from '../../channels/types.ts';
import type { FleetContext } from '../../fleet/context.ts';
import { productResolver } from '../../fleet/orgs.ts';
import type { Logger } from '../../log.ts';
import { EdgeRuntime } from '../runtime.ts';
import { keyauthAdminRoutes } from './admin.ts';
import { handleConnection, type ConnectionLimits } from './connection.ts';
import { fingerprintOf, generateRsaKeyPair } from '../../../shared/keyauth-envelope.ts';

export { registerKeyauthDownloads, keyauthDownloadUrl, KEYAUTH_DOWNLOAD_PREFIX } from './downloads.ts';
export { seal, open, parseClientKey, generateRsaKeyPair, type Envelope } from '../../../shared/keyauth-envelope.ts';

export interface KeyauthOptions {
  fleet: FleetContext;
  pubsub: PubSub;
  /** The node's edge runtime (default: one of its own on `pubsub`); drained with 1012 at shutdown. */
  runtime?: EdgeRuntime;
  log: Logger;
  /** HMAC key for download URLs (the server secret). */
  secret: string;
  host?: string;
  /** TCP port (0: ephemeral). */
  port: number;
  /** Base URL of the API listener, where `check_update` URLs point. */
  downloadBaseUrl: () => string;
  /** Org and product (name or id) new client keys join; default `default`/`default`. */
  org?: string;
  product?: string;
  limits?: Partial<ConnectionLimits>;
  /** At most this many simultaneous connections (default 10 000). */
  maxConnections?: number;
  /** Lifetime of download URLs (default 3600 s). */
  urlTtlSeconds?: number;
}

export interface KeyauthServer {
  port: number;
  /** This run's server public key (SPKI PEM) and its fingerprint. */
  publicKeyPem: string;
  fingerprint: string;
  connections(): number;
  close(): Promise<void>;
}

export const DEFAULT_LIMITS: ConnectionLimits = {
  maxLineBytes: 64 * 1024,
  handshakeTimeoutMs: 10_000,
  idleTimeoutMs: 150_000,
  maxFailures: 3,
  maxRequestsPerSecond: 20,
  maxBufferedBytes: 1024 * 1024,
};

/** Starts the keyauth listener with a fresh server key pair. */
export async function startKeyauth(options: KeyauthOptions): Promise<KeyauthServer> {
  const serverKey = generateRsaKeyPair();
  const log = options.log.child({ listener: 'keyauth' });
  const limits = { ...DEFAULT_LIMITS, ...options.limits };
  const tenant = productResolver(options.fleet, options.org, options.product);
  const runtime = options.runtime ?? new EdgeRuntime({ pubsub: options.pubsub, fleet: options.fleet, log });
  const sockets = new Set<Socket>();
  const handlers = new Set<Promise<void>>();
  const server = net.createServer({ noDelay: true, allowHalfOpen: false }, (socket) => {
    sockets.add(socket);
    const done = handleConnection(socket, {
      fleet: options.fleet,
      log,
      tenant,
      serverKey,
      limits,
      secret: options.secret,
      downloadBaseUrl: options.downloadBaseUrl,
      urlTtlSeconds: options.urlTtlSeconds ?? 3600,
      runtime,
    });
    handlers.add(done);
    void done.finally(() => {
      sockets.delete(socket);
      handlers.delete(done);
    });
  });
  server.maxConnections = options.maxConnections ?? 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: options.host ?? '127.0.0.1', port: options.port }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const fingerprint = fingerprintOf(serverKey.publicKey.export({ type: 'spki', format: 'der' }));
  log.info({ port, fingerprint }, 'keyauth listener started with a fresh server key');
  return {
    port,
    publicKeyPem: serverKey.publicKeyPem,
    fingerprint,
    connections: () => sockets.size,
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const s of sockets) s.destroy();
      await closed;
      // Each handler marks its client offline on close.
      await Promise.allSettled([...handlers]);
    },
  };
}

/** The operator routes (`/api/v1/keyauth/...`) as a `RoutePlugin` for `registerApi`. */
export function keyauthApiPlugin(options: { fleet: FleetContext; org?: string; product?: string }): RoutePlugin {
  const tenant = productResolver(options.fleet, options.org, options.product);
  return (api) => keyauthAdminRoutes(api, { fleet: options.fleet, tenant });
}
