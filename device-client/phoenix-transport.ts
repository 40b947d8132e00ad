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
import { type ConnectionFailure, describeError, httpRefusal, readRefusal } from './connection-failure.ts';

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
function keepRefusal(ws: WebSocket, res: http.IncomingMessage, onRefused?: (status: number) => void): void {
  onRefused?.(res.statusCode ?? 0);
  void readRefusal(res).then((refusal) => {
    refusals.set(ws, refusal);
    ws.terminate(); // emits 'error' and 'close' as ws does for a refused upgrade
  });
}

/**
 * Explains a transport error as phoenix reports it (`socket.onError`): the server's HTTP refusal
 * with its reason, else the socket or TLS error (connection-failure.ts).
 */
export function describeConnectionError(event: unknown): ConnectionFailure {
  const target = (event as { target?: object } | null)?.target;
  const refusal = target ? refusals.get(target) : undefined;
  return refusal ? httpRefusal(refusal.status, refusal.reason) : describeError(event);
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
      this.on('unexpected-response', (_req, res) => keepRefusal(this, res, tls.onRefused));
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
