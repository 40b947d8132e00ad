/**
 * Transports for the official `phoenix` client in Node with a client certificate (mutual TLS).
 *
 *   new Socket('wss://host:4001/socket', { transport: tlsWebSocket({ cert, key, ca }) })
 *
 * The LongPoll fallback uses XMLHttpRequest when the global exists (before fetch, which cannot
 * carry a client certificate in Node): `installTlsXMLHttpRequest(tls)` provides one.
 */
import http from 'node:http';
import https from 'node:https';
import { isIP } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import WebSocket from 'ws';

export interface TlsClientOptions {
  cert?: string | Buffer;
  key?: string | Buffer;
  ca?: string | Buffer | (string | Buffer)[];
  /** SNI name and name checked against the server certificate (default: the URL host). */
  servername?: string;
  /** A TLS session from an earlier connection, to resume without a full handshake. */
  session?: Buffer;
  /** Called with each new TLS session ticket, to pass as `session` next time. */
  onSession?: (session: Buffer) => void;
  /** Called with the HTTP status when the server refuses the WebSocket upgrade (401, 403, ...). */
  onRefused?: (status: number) => void;
  rejectUnauthorized?: boolean;
}

function tlsConnectionOptions(tls: TlsClientOptions): ConnectionOptions {
  const { onSession: _onSession, onRefused: _onRefused, ...rest } = tls;
  return rest;
}

/** What the server said when it refused the WebSocket upgrade (kept on the socket for the error handler). */
export interface UpgradeRefusal {
  status: number;
  /** The server's reason: `error.message` of a JSON body, else the body's text. */
  reason: string;
}

const refusals = new WeakMap<object, UpgradeRefusal>();

/** Reads the refusal's body (at most 4 KiB, 2 s), then aborts the handshake. */
function readRefusal(ws: WebSocket, res: http.IncomingMessage, onRefused?: (status: number) => void): void {
  const status = res.statusCode ?? 0;
  onRefused?.(status);
  const chunks: Buffer[] = [];
  let size = 0;
  let done = false;
  const finish = () => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    refusals.set(ws, { status, reason: refusalReason(Buffer.concat(chunks).toString('utf8'), res.statusMessage) });
    res.destroy();
    ws.terminate(); // emits 'error' and 'close' as ws does for a refused upgrade
  };
  const timer = setTimeout(finish, 2000);
  res.on('data', (chunk: Buffer) => {
    if (size < 4096) chunks.push(chunk);
    size += chunk.length;
  });
  res.once('end', finish);
  res.once('error', finish);
  res.once('close', finish);
}

function refusalReason(body: string, statusMessage: string | undefined): string {
  try {
    const parsed = JSON.parse(body) as { error?: { message?: unknown } | string; reason?: unknown };
    const error = parsed.error;
    if (typeof error === 'object' && typeof error?.message === 'string') return error.message;
    if (typeof error === 'string') return error;
    if (typeof parsed.reason === 'string') return parsed.reason;
  } catch {
    // not JSON: the text itself
  }
  return body.trim().slice(0, 300) || statusMessage || 'no reason given';
}

/** Why a connection attempt failed: a short `kind` to count by, and a message for people. */
export interface ConnectionFailure {
  kind: string;
  message: string;
}

/** `unknown CA: HTTP 403: client certificate issuer is ...` (the kind first, unless the message starts with it). */
export function formatConnectionFailure(f: ConnectionFailure): string {
  return f.message.toLowerCase().startsWith(f.kind.toLowerCase()) ? f.message : `${f.kind}: ${f.message}`;
}

const SERVER_CERT_UNTRUSTED = new Set([
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
]);

/**
 * Explains a transport error as phoenix reports it (`socket.onError`): the server's HTTP refusal
 * with its reason, a TLS alert, our own verification of the server's certificate, or a socket
 * error (connection refused, reset, unknown host).
 */
export function describeConnectionError(event: unknown): ConnectionFailure {
  const target = (event as { target?: object } | null)?.target;
  const refusal = target ? refusals.get(target) : undefined;
  if (refusal) {
    const message = `HTTP ${refusal.status}: ${refusal.reason}`;
    const r = refusal.reason;
    if (/not a registered signer CA|UNABLE_TO_GET_ISSUER|UNABLE_TO_VERIFY_LEAF/.test(r))
      return { kind: 'unknown CA', message };
    if (/CERT_HAS_EXPIRED|certificate (has )?expired/i.test(r)) return { kind: 'certificate expired', message };
    if (/not valid yet|CERT_NOT_YET_VALID/.test(r)) return { kind: 'certificate not yet valid', message };
    if (/self-signed/.test(r)) return { kind: 'self-signed certificate', message };
    if (/revoked/.test(r)) return { kind: 'revoked', message };
    return { kind: `HTTP ${refusal.status}`, message };
  }
  const err = ((event as { error?: unknown } | null)?.error ?? event) as NodeJS.ErrnoException & {
    address?: string;
    port?: number;
  };
  const code = typeof err?.code === 'string' ? err.code : '';
  const text = err instanceof Error ? err.message : String((event as { message?: unknown })?.message ?? event);
  const alert = /^ERR_SSL_(?:TLSV1|SSLV3|TLSV13)_ALERT_(.+)$/.exec(code)?.[1];
  if (alert) {
    const name = alert
      .toLowerCase()
      .replace(/_/g, ' ')
      .replace(/\bca\b/, 'CA');
    return { kind: name, message: `TLS alert from the server: ${name} (${code})` };
  }
  if (SERVER_CERT_UNTRUSTED.has(code))
    return {
      kind: 'unknown CA',
      message: `the server's certificate is not signed by the CA given to the device (${code})`,
    };
  if (code === 'CERT_HAS_EXPIRED')
    return { kind: 'certificate expired', message: `the server's certificate has expired (${code})` };
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return { kind: 'wrong host name', message: text };
  if (
    code === 'ERR_SSL_WRONG_VERSION_NUMBER' ||
    code === 'ERR_SSL_PACKET_LENGTH_TOO_LONG' ||
    (code === 'EPROTO' && /wrong version number|packet length too long|http request/.test(text))
  )
    return { kind: 'not TLS', message: `the port does not speak TLS (${code}); is it the device port?` };
  const where = err?.address ? ` (${err.address}${err.port ? `:${err.port}` : ''})` : '';
  switch (code) {
    case 'ECONNREFUSED':
      return { kind: 'connection refused', message: `connection refused${where}: is the server running on that port?` };
    case 'ECONNRESET':
      return { kind: 'connection reset', message: `the server reset the connection${where}` };
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return { kind: 'host not found', message: text };
    case 'ETIMEDOUT':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return { kind: 'unreachable', message: text };
  }
  return { kind: code || 'other', message: text || 'unknown error' };
}

/** What phoenix constructs: `new transport(endPointURL, protocols)`. */
export type TlsWebSocketClass = new (url: string | URL, protocols?: string | string[]) => WebSocket;

/** A `ws` WebSocket class with these TLS options, usable as phoenix's `transport` option. */
export function tlsWebSocket(tls: TlsClientOptions): TlsWebSocketClass {
  const onSession = tls.onSession;
  const options: WebSocket.ClientOptions = {
    ...tlsConnectionOptions(tls),
    perMessageDeflate: false,
    // TLS 1.3 tickets arrive right after the handshake, before the HTTP answer: listen from the start.
    ...(onSession
      ? {
          createConnection: (o: ConnectionOptions) => {
            // As ws's own tlsConnect: `path` is the HTTP path here, not a unix socket.
            const socket = tlsConnect({
              ...o,
              path: undefined,
              servername: o.servername ?? (isIP(o.host ?? '') ? undefined : o.host),
            });
            socket.on('session', onSession);
            return socket;
          },
        }
      : {}),
  } as WebSocket.ClientOptions;
  return class TlsWebSocket extends WebSocket {
    constructor(url: string | URL, protocols?: string | string[]) {
      super(url, protocols, options);
      // A refused upgrade keeps the server's reason, for describeConnectionError.
      this.on('unexpected-response', (_req, res) => readRefusal(this, res, tls.onRefused));
    }
  };
}

type Handler = ((this: unknown, ...args: unknown[]) => void) | null;

/**
 * The part of XMLHttpRequest phoenix's LongPoll uses (open, setRequestHeader, timeout, send,
 * abort, readyState, status, responseText, onreadystatechange, onerror, ontimeout), over
 * node:https with the client certificate.
 */
export function tlsXMLHttpRequest(tls: TlsClientOptions) {
  const connection = tlsConnectionOptions(tls);
  return class TlsXMLHttpRequest {
    readyState = 0;
    status = 0;
    responseText = '';
    timeout = 0;
    onreadystatechange: Handler = null;
    onerror: Handler = null;
    ontimeout: Handler = null;
    #method = 'GET';
    #url = '';
    #headers: Record<string, string> = {};
    #request: http.ClientRequest | undefined;
    #aborted = false;

    open(method: string, url: string): void {
      this.#method = method;
      this.#url = url;
      this.readyState = 1;
    }

    setRequestHeader(name: string, value: string): void {
      this.#headers[name] = value;
    }

    send(body?: string | null): void {
      const url = new URL(this.#url);
      const request = (url.protocol === 'https:' ? https : http).request(url, {
        method: this.#method,
        headers: body ? { ...this.#headers, 'content-length': Buffer.byteLength(body) } : this.#headers,
        ...(url.protocol === 'https:' ? connection : {}),
        agent: false,
      });
      this.#request = request;
      if (this.timeout > 0) {
        request.setTimeout(this.timeout, () => {
          if (this.#aborted) return;
          this.#aborted = true;
          request.destroy();
          this.ontimeout?.call(this);
        });
      }
      request.on('response', (response) => {
        const chunks: Buffer[] = [];
        response.on('data', (chunk: Buffer) => chunks.push(chunk));
        response.on('end', () => {
          if (this.#aborted) return;
          this.status = response.statusCode ?? 0;
          this.responseText = Buffer.concat(chunks).toString('utf8');
          this.readyState = 4;
          this.onreadystatechange?.call(this);
        });
      });
      request.on('error', () => {
        if (this.#aborted) return;
        this.#aborted = true;
        this.readyState = 4;
        this.onerror?.call(this);
      });
      request.end(body ?? undefined);
    }

    abort(): void {
      this.#aborted = true;
      this.#request?.destroy();
    }
  };
}

/** Makes phoenix's LongPoll (and anything else using the global XMLHttpRequest) use `tls`. */
export function installTlsXMLHttpRequest(tls: TlsClientOptions): () => void {
  const g = globalThis as { XMLHttpRequest?: unknown };
  const previous = g.XMLHttpRequest;
  g.XMLHttpRequest = tlsXMLHttpRequest(tls);
  return () => {
    g.XMLHttpRequest = previous;
  };
}
