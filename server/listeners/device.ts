import { randomBytes, X509Certificate } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Server as HttpsServer } from 'node:https';
import type { TLSSocket } from 'node:tls';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import websocket from '@fastify/websocket';
import { createSelfSignedCa } from '../../certs/pki.ts';
import type { Db } from '../db/index.ts';
import type { DeviceProtocol } from '../db/schema.ts';
import { loggedUrl, type Logger } from '../log.ts';
import { onSignerCasChanged, trustedCaPems } from '../identity/signer-cas.ts';
import { resolveDeviceIdentity, type DeviceIdentity } from '../identity/resolve.ts';

declare module 'fastify' {
  interface FastifyRequest {
    /** The device on the other end, set on the device listener before any route or upgrade runs. */
    deviceIdentity?: DeviceIdentity;
  }
}

/** The Fastify app of the device listener (HTTPS server, routes and WebSocket routes). */
export type DeviceApp = FastifyInstance<HttpsServer, IncomingMessage, ServerResponse, FastifyBaseLogger>;

export interface DeviceListenerOptions {
  db: Db;
  log: Logger;
  /** The server certificate and key devices see (PEM). */
  tls: { certPem: string; keyPem: string };
  /** Chooses the WebSocket subprotocol (Phoenix: none, GRiSP: `grisp-io-v1`); `false` refuses. */
  handleProtocols?: (protocols: Set<string>, request: IncomingMessage) => string | false;
  /** Protocol recorded on devices registered just in time (default 'phoenix'). */
  protocol?: DeviceProtocol;
  /** Refresh trust when signer CAs change in this process (default true). */
  watchSignerCas?: boolean;
  /** Largest WebSocket message accepted (default 1 MiB). */
  maxPayload?: number;
  /** How long TLS sessions can be resumed (seconds, default 300). */
  sessionTimeoutSeconds?: number;
}

export interface DeviceListener {
  app: DeviceApp;
  /** Reloads the trusted signer CAs from the database into the running server. */
  refreshTrust(): Promise<void>;
  close(): Promise<void>;
}

const identities = new WeakMap<IncomingMessage, DeviceIdentity>();

/** The identity of an authenticated device request, for code that only sees the raw request. */
export function deviceIdentityOf(request: IncomingMessage): DeviceIdentity | undefined {
  return identities.get(request);
}

/** `request.deviceIdentity`, or an error when a route was mounted outside the device listener. */
export function requireDeviceIdentity(request: FastifyRequest): DeviceIdentity {
  const identity = request.deviceIdentity;
  if (!identity) throw new Error('no device identity on this request: the route must be mounted on the device listener');
  return identity;
}

/**
 * The mutual-TLS device listener: TLS 1.3, client certificates requested, trust = registered
 * signer CAs (refreshed without restart), session tickets for cheap reconnects, and an
 * `onRequest` hook that authenticates every request and upgrade before any route runs.
 * The caller mounts routes on `app` and calls `app.listen`.
 */
export async function createDeviceListener(opts: DeviceListenerOptions): Promise<DeviceListener> {
  const { db } = opts;
  const log = opts.log.child({ listener: 'device' });
  // One set of ticket keys for the server's lifetime: a trust refresh must not void sessions.
  const ticketKeys = randomBytes(48);
  const sessionTimeout = opts.sessionTimeoutSeconds ?? 300;

  const secureOptions = async () => ({
    cert: opts.tls.certPem,
    key: opts.tls.keyPem,
    ca: await trustAnchors(db),
    minVersion: 'TLSv1.3' as const,
    ticketKeys,
    sessionTimeout,
  });

  const app = Fastify({
    https: { ...(await secureOptions()), requestCert: true, rejectUnauthorized: false },
    loggerInstance: log as FastifyBaseLogger,
    // Connection refusals are logged once with their reason; per-request lines would double them.
    logController: new LogController({ disableRequestLogging: true }),
  }) as unknown as DeviceApp;

  await app.register(websocket, {
    options: {
      maxPayload: opts.maxPayload ?? 1024 * 1024,
      perMessageDeflate: false,
      ...(opts.handleProtocols ? { handleProtocols: opts.handleProtocols } : {}),
    },
  });

  // Registered after @fastify/websocket so its onRequest has marked upgrades (it then destroys
  // the socket of a refused upgrade once the 401/403 response is written).
  app.addHook('onRequest', async (request, reply) => {
    const socket = request.raw.socket as TLSSocket;
    const refused = await authenticate(socket, db, opts.protocol);
    if ('identity' in refused) {
      request.deviceIdentity = refused.identity;
      identities.set(request.raw, refused.identity);
      if (refused.created) request.log.info({ device_id: refused.identity.deviceId, identifier: refused.identity.identifier }, 'device registered just in time');
      return;
    }
    request.log.warn(
      {
        remote: socket.remoteAddress,
        status: refused.status,
        reason: refused.reason,
        subject_cn: refused.commonName,
        fingerprint: refused.fingerprint,
        url: loggedUrl(request.url),
      },
      'device connection refused',
    );
    return refuse(reply, refused.status, refused.reason);
  });

  const refreshTrust = async (): Promise<void> => {
    app.server.setSecureContext(await secureOptions());
    log.info('device listener trust refreshed');
  };

  const unsubscribe =
    opts.watchSignerCas === false
      ? () => undefined
      : onSignerCasChanged(() =>
          refreshTrust().catch((err: unknown) => log.error({ err }, 'refreshing device listener trust failed')),
        );

  return {
    app,
    refreshTrust,
    async close() {
      unsubscribe();
      await app.close();
    },
  };
}

type AuthOutcome =
  | { identity: DeviceIdentity; created: boolean }
  | { status: 401 | 403; reason: string; commonName?: string; fingerprint?: string };

/** The early-return chain: certificate present, TLS verification passed, identity resolves. */
async function authenticate(socket: TLSSocket, db: Db, protocol: DeviceProtocol | undefined): Promise<AuthOutcome> {
  if (typeof socket.getPeerCertificate !== 'function') {
    return { status: 401, reason: 'not a TLS connection' };
  }
  // The leaf only: the issuer chain is built only for a certificate that is not registered yet.
  const peer = socket.getPeerCertificate(false);
  if (!peer || !peer.raw) return { status: 401, reason: 'no client certificate presented' };
  const commonName = Array.isArray(peer.subject?.CN) ? peer.subject.CN[0] : peer.subject?.CN;
  const fingerprint = peer.fingerprint256?.replaceAll(':', '').toLowerCase();
  if (!socket.authorized) {
    return { status: 403, reason: verificationReason(socket.authorizationError), commonName, fingerprint };
  }
  const result = await resolveDeviceIdentity(db, peer, { protocol, detailedPeer: () => socket.getPeerCertificate(true) });
  if (!result.ok) return { status: result.status, reason: result.reason, commonName, fingerprint };
  return { identity: result.identity, created: result.created };
}

/** Why OpenSSL refused the client certificate, in words an operator can act on. */
function verificationReason(error: Error | string | undefined): string {
  const code = typeof error === 'string' ? error : ((error as { code?: string } | undefined)?.code ?? error?.message ?? 'unknown');
  switch (code) {
    case 'DEPTH_ZERO_SELF_SIGNED_CERT':
    case 'SELF_SIGNED_CERT_IN_CHAIN':
      return `self-signed client certificate (${code}); devices need a certificate from a registered signer CA`;
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE':
    case 'UNABLE_TO_GET_ISSUER_CERT':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
      return `client certificate issuer is not a registered signer CA (${code})`;
    case 'CERT_HAS_EXPIRED':
      return 'client certificate has expired (CERT_HAS_EXPIRED)';
    case 'CERT_NOT_YET_VALID':
      return 'client certificate is not valid yet (CERT_NOT_YET_VALID); check the device clock';
    default:
      return `client certificate failed verification (${code})`;
  }
}

function refuse(reply: FastifyReply, status: 401 | 403, reason: string): FastifyReply {
  const code = status === 401 ? 'unauthorized' : 'forbidden';
  return reply
    .code(status)
    .header('connection', 'close')
    .send({ error: { code, message: status === 401 ? `${reason}; connect with the device certificate and key` : reason } });
}

let placeholderCa: string | undefined;

/**
 * The registered signer CAs, or — when none is registered yet — a throwaway CA whose key was
 * never kept: Node needs a non-empty `ca`, and without one it would fall back to the public roots.
 */
async function trustAnchors(db: Db): Promise<string[]> {
  const pems = await trustedCaPems(db);
  if (pems.length > 0) return pems.map(trustedForClientAuth);
  placeholderCa ??= createSelfSignedCa('fleethub placeholder CA (no signer CA registered)').certPem;
  return [placeholderCa];
}

// X509_CERT_AUX { trust: SEQUENCE { id-kp-clientAuth } }
const CLIENT_AUTH_TRUST = Buffer.from('300c300a06082b06010505070302', 'hex');

/**
 * Signer CAs are usually intermediates, and OpenSSL only ends a chain at a self-signed anchor
 * unless partial chains are allowed, which Node 20 cannot ask for (`allowPartialTrustChain`
 * arrived in Node 22.9). A "TRUSTED CERTIFICATE" carrying explicit clientAuth trust is an anchor
 * in its own right, for client certificates only, whatever signed it.
 */
export function trustedForClientAuth(pem: string): string {
  const der = new X509Certificate(pem).raw;
  const body = Buffer.concat([der, CLIENT_AUTH_TRUST]).toString('base64').replace(/.{64}/g, '$&\n').trimEnd();
  return `-----BEGIN TRUSTED CERTIFICATE-----\n${body}\n-----END TRUSTED CERTIFICATE-----\n`;
}
