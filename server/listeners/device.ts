import { randomBytes, X509Certificate } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Server as HttpsServer } from 'node:https';
import type { TLSSocket } from 'node:tls';
import Fastify, {
  LogController,
  type FastifyBaseLogger,
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
} from 'fastify';
import websocket from '@fastify/websocket';
import { createSelfSignedCa } from '../../certs/pki.ts';
import type { Db } from '../db/index.ts';
import type { DeviceProtocol } from '../db/schema.ts';
import { loggedUrl, rateLimitedWarning, type Logger } from '../log.ts';
import { onSignerCasChanged, trustedCaPems } from '../identity/signer-cas.ts';
import { issuerChain, resolveDeviceIdentity, type DeviceIdentity } from '../identity/resolve.ts';

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
  /**
   * How often connections whose certificate has expired are closed (ms, default 5000): one sweep
   * over the live connections, so a connection outlives its certificate by at most this long.
   */
  expirySweepMs?: number;
  /**
   * Called on a revocation or an expiry before the listener cuts its TLS connections: the
   * protocols close what they hold with their own close code (a Phoenix socket, and a LongPoll
   * session, which outlives a TLS connection).
   */
  onConnectionsClosed?: (ended: RevokedIdentity, reason: string) => void;
  /** Told about every refused TLS handshake (`tls`) and refused request or upgrade (`upgrade`), with the reason. */
  onRefused?: (stage: 'tls' | 'upgrade', reason: string) => void;
}

export interface DeviceListener {
  app: DeviceApp;
  /** Reloads the trusted signer CAs from the database into the running server. */
  refreshTrust(): Promise<void>;
  /**
   * Closes this node's connections (WebSockets, downloads, idle keep-alives) authenticated as the
   * device — or, with `certificateId`, by that one certificate — and refuses an authentication
   * of them that was in flight. Plain HTTP connections are cut at once; a WebSocket gets
   * `UPGRADED_CLOSE_GRACE_MS` for its protocol's close frame (sent by `onConnectionsClosed` or by
   * the link on it) before it is cut. Returns how many connections it closed.
   */
  closeConnections(revoked: RevokedIdentity, reason: string): number;
  close(): Promise<void>;
}

/** A revoked device, or one revoked certificate of it. */
export interface RevokedIdentity {
  deviceId: string;
  certificateId?: string;
}

const identities = new WeakMap<IncomingMessage, DeviceIdentity>();

/** The identity of an authenticated device request, for code that only sees the raw request. */
export function deviceIdentityOf(request: IncomingMessage): DeviceIdentity | undefined {
  return identities.get(request);
}

/** `request.deviceIdentity`, or an error when a route was mounted outside the device listener. */
export function requireDeviceIdentity(request: FastifyRequest): DeviceIdentity {
  const identity = request.deviceIdentity;
  if (!identity)
    throw new Error('no device identity on this request: the route must be mounted on the device listener');
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
  // A scanner or a misconfigured device retries in a loop: one line per address and reason a minute, with a count.
  const logTlsRefusal = rateLimitedWarning(log, 'TLS handshake refused', 60_000, 'info');
  // One set of ticket keys for the server's lifetime: a trust refresh must not void sessions.
  const ticketKeys = randomBytes(48);
  const sessionTimeout = opts.sessionTimeoutSeconds ?? 300;

  // The signer CAs of the current secure context: a resumed session is checked against these.
  let trusted: X509Certificate[] = [];
  const secureOptions = async () => {
    const pems = await trustedCaPems(db);
    trusted = pems.map((pem) => new X509Certificate(pem));
    return {
      cert: opts.tls.certPem,
      key: opts.tls.keyPem,
      ca: trustAnchors(pems),
      minVersion: 'TLSv1.3' as const,
      ticketKeys,
      sessionTimeout,
    };
  };
  const live = new LiveConnections();
  const sweep = setInterval(() => {
    for (const ended of live.closeExpired(Date.now())) {
      log.info(
        {
          device_id: ended.deviceId,
          certificate_id: ended.certificateId,
          connections: ended.connections,
          reason: 'certificate expired',
        },
        'device connections closed',
      );
      opts.onConnectionsClosed?.(ended, 'certificate expired');
    }
  }, opts.expirySweepMs ?? 5_000);
  sweep.unref();

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
    const startedAt = performance.now();
    let refused = await authenticate(socket, db, opts.protocol, trusted);
    if ('identity' in refused && !live.track(socket, refused.identity, startedAt)) {
      refused = {
        status: 403,
        reason: `certificate ${refused.identity.certificateId} was revoked`,
        fingerprint: refused.identity.fingerprint,
      };
    }
    if ('identity' in refused) {
      // @fastify/websocket's onRequest (registered before this hook) marks upgrades.
      if ((request as FastifyRequest & { ws?: boolean }).ws) live.upgraded(socket);
      request.deviceIdentity = refused.identity;
      identities.set(request.raw, refused.identity);
      if (refused.created)
        request.log.info(
          { device_id: refused.identity.deviceId, identifier: refused.identity.identifier },
          'device registered just in time',
        );
      return;
    }
    opts.onRefused?.('upgrade', refused.reason);
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
    return refuse(reply, refused.status, refused.reason, request.url.split('?')[0].endsWith('/longpoll'));
  });

  // A handshake that fails (no shared protocol or cipher, not TLS at all, reset mid-way): no request ever exists.
  app.server.on('tlsClientError', (err: NodeJS.ErrnoException, socket: TLSSocket) => {
    const reason = err.code ?? err.message;
    opts.onRefused?.('tls', reason);
    logTlsRefusal(`${socket.remoteAddress}:${reason}`, { remote: socket.remoteAddress, reason, message: err.message });
    socket.destroy();
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
    closeConnections(revoked, reason) {
      // The protocols first, so their close frames go out before any connection is cut.
      opts.onConnectionsClosed?.(revoked, reason);
      const closed = live.close(revoked);
      if (closed > 0)
        log.info(
          { device_id: revoked.deviceId, certificate_id: revoked.certificateId, connections: closed, reason },
          'device connections closed',
        );
      return closed;
    },
    async close() {
      clearInterval(sweep);
      unsubscribe();
      await app.close();
    },
  };
}

type AuthOutcome =
  | { identity: DeviceIdentity; created: boolean }
  | { status: 401 | 403; reason: string; commonName?: string; fingerprint?: string };

/**
 * The early-return chain: certificate present, TLS verification passed (and, for a resumed
 * session, still passes against today's signer CAs), identity resolves.
 */
async function authenticate(
  socket: TLSSocket,
  db: Db,
  protocol: DeviceProtocol | undefined,
  trusted: readonly X509Certificate[],
): Promise<AuthOutcome> {
  if (typeof socket.getPeerCertificate !== 'function') {
    return { status: 401, reason: 'not a TLS connection' };
  }
  // The leaf only: the issuer chain is built only for a certificate that is not registered yet.
  const peer = socket.getPeerCertificate(false);
  if (!peer?.raw) return { status: 401, reason: 'no client certificate presented' };
  const commonName = Array.isArray(peer.subject?.CN) ? peer.subject.CN[0] : peer.subject?.CN;
  const fingerprint = peer.fingerprint256?.replaceAll(':', '').toLowerCase();
  if (!socket.authorized) {
    return { status: 403, reason: verificationReason(socket.authorizationError), commonName, fingerprint };
  }
  // `authorized` of a resumed session is the verdict of the handshake that created it.
  if (socket.isSessionReused()) {
    const stale = resumedSessionRefusal(socket, peer.raw, trusted);
    if (stale) return { status: 403, reason: stale, commonName, fingerprint };
  }
  const result = await resolveDeviceIdentity(db, peer, {
    protocol,
    detailedPeer: () => socket.getPeerCertificate(true),
  });
  if (!result.ok) return { status: result.status, reason: result.reason, commonName, fingerprint };
  return { identity: result.identity, created: result.created };
}

/** Why OpenSSL refused the client certificate, in words an operator can act on. */
function verificationReason(error: Error | string | undefined): string {
  const code =
    typeof error === 'string' ? error : ((error as { code?: string } | undefined)?.code ?? error?.message ?? 'unknown');
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

/**
 * A LongPoll client reads the outcome from the body's `status`, and knows only 403 as a refusal
 * (the official client throws on any other), so LongPoll refusals carry `status: 403`.
 */
function refuse(reply: FastifyReply, status: 401 | 403, reason: string, longPoll: boolean): FastifyReply {
  const code = status === 401 ? 'unauthorized' : 'forbidden';
  const error = { code, message: status === 401 ? `${reason}; connect with the device certificate and key` : reason };
  return reply
    .code(status)
    .header('connection', 'close')
    .send(longPoll ? { status: 403, error } : { error });
}

/**
 * Why a resumed TLS session may not authenticate, or undefined when it may: OpenSSL does not
 * verify the certificate again on resumption, so the leaf must still be within its validity
 * window and chain to a signer CA trusted now (one removed or expired since fails here).
 */
function resumedSessionRefusal(
  socket: TLSSocket,
  raw: Buffer,
  trusted: readonly X509Certificate[],
): string | undefined {
  const now = Date.now();
  const leaf = new X509Certificate(raw);
  if (Date.parse(leaf.validTo) <= now) return 'client certificate has expired (resumed TLS session)';
  if (Date.parse(leaf.validFrom) > now)
    return 'client certificate is not valid yet (resumed TLS session); check the device clock';
  const valid = (ca: X509Certificate) => Date.parse(ca.validFrom) <= now && Date.parse(ca.validTo) > now;
  // Common case: a signer CA issued the leaf directly (no chain to build).
  if (trusted.some((ca) => valid(ca) && leaf.checkIssued(ca) && leaf.verify(ca.publicKey))) return undefined;
  // Otherwise the chain Node completes from the current trust store must reach one.
  const chain = issuerChain(socket.getPeerCertificate(true));
  let subject = leaf;
  for (const issuer of chain) {
    if (!subject.checkIssued(issuer) || !subject.verify(issuer.publicKey)) break;
    if (trusted.some((ca) => ca.raw.equals(issuer.raw) && valid(ca))) return undefined;
    subject = issuer;
  }
  return 'resumed TLS session: the client certificate no longer chains to a registered signer CA';
}

/**
 * The connections this node authenticated, by device, so a revocation closes every one of them.
 * A revocation that arrives while a connection of that device is being authenticated (its
 * lookup may have read the database before the revocation committed) refuses it.
 */
class LiveConnections {
  /** Per connection: the certificate that authenticated it and when that expires (small: 20,000 per process). */
  readonly #byDevice = new Map<string, Map<TLSSocket, Authenticated>>();
  /** When recent revocations arrived (performance.now()), by device id and by certificate id. */
  readonly #recent = new Map<string, number>();
  /** Connections upgraded to a WebSocket: their protocol closes them first, with its own code. */
  readonly #upgraded = new WeakSet<TLSSocket>();

  /** `socket` carries a WebSocket from now on. */
  upgraded(socket: TLSSocket): void {
    this.#upgraded.add(socket);
  }

  /** Remembers `socket` as authenticated by `identity`; false when it was revoked since `startedAt`. */
  track(socket: TLSSocket, identity: DeviceIdentity, startedAt: number): boolean {
    const revokedAt = Math.max(
      this.#recent.get(identity.deviceId) ?? -1,
      this.#recent.get(identity.certificateId) ?? -1,
    );
    if (revokedAt >= startedAt) return false;
    let sockets = this.#byDevice.get(identity.deviceId);
    if (!sockets) {
      sockets = new Map();
      this.#byDevice.set(identity.deviceId, sockets);
    }
    if (sockets.has(socket)) return true;
    sockets.set(socket, { certificateId: identity.certificateId, notAfter: identity.notAfter.getTime() });
    socket.once('close', () => {
      sockets.delete(socket);
      if (sockets.size === 0 && this.#byDevice.get(identity.deviceId) === sockets)
        this.#byDevice.delete(identity.deviceId);
    });
    return true;
  }

  close(revoked: RevokedIdentity): number {
    const now = performance.now();
    for (const [key, at] of this.#recent) if (now - at > RECENT_REVOCATION_MS) this.#recent.delete(key);
    this.#recent.set(revoked.certificateId ?? revoked.deviceId, now);
    let closed = 0;
    for (const [socket, { certificateId }] of this.#byDevice.get(revoked.deviceId) ?? []) {
      if (revoked.certificateId !== undefined && certificateId !== revoked.certificateId) continue;
      if (this.#upgraded.has(socket)) setTimeout(() => socket.destroy(), UPGRADED_CLOSE_GRACE_MS).unref();
      else socket.destroy();
      closed++;
    }
    return closed;
  }

  /** Closes the connections whose certificate is no longer valid at `now` (epoch ms), by certificate. */
  closeExpired(now: number): Array<Required<RevokedIdentity> & { connections: number }> {
    const ended = new Map<string, Required<RevokedIdentity> & { connections: number }>();
    for (const [deviceId, sockets] of this.#byDevice) {
      for (const [socket, { certificateId, notAfter }] of sockets) {
        if (notAfter > now) continue;
        // The close listener removes it from `sockets`; deleting during iteration is safe for a Map.
        socket.destroy();
        const entry = ended.get(certificateId);
        if (entry) entry.connections++;
        else ended.set(certificateId, { deviceId, certificateId, connections: 1 });
      }
    }
    return [...ended.values()];
  }
}

interface Authenticated {
  certificateId: string;
  /** The certificate's not_after, epoch ms. */
  notAfter: number;
}

/**
 * How long a revoked WebSocket's protocol has to send its close frame (and the client to answer)
 * before the TLS connection is cut anyway: ample on any link, short for a client that ignores it.
 */
export const UPGRADED_CLOSE_GRACE_MS = 1000;

/** Longer than any authentication takes: after that, a revocation is in the database for every lookup. */
const RECENT_REVOCATION_MS = 60_000;

let placeholderCa: string | undefined;

/**
 * The registered signer CAs, or — when none is registered yet — a throwaway CA whose key was
 * never kept: Node needs a non-empty `ca`, and without one it would fall back to the public roots.
 */
function trustAnchors(pems: string[]): string[] {
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
