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
import type { ConnectionOptions, TLSSocket } from 'node:tls';
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
  rejectUnauthorized?: boolean;
}

function tlsConnectionOptions(tls: TlsClientOptions): ConnectionOptions {
  const { onSession: _onSession, ...rest } = tls;
  return rest;
}

/** What phoenix constructs: `new transport(endPointURL, protocols)`. */
export type TlsWebSocketClass = new (url: string | URL, protocols?: string | string[]) => WebSocket;

/** A `ws` WebSocket class with these TLS options, usable as phoenix's `transport` option. */
export function tlsWebSocket(tls: TlsClientOptions): TlsWebSocketClass {
  const options = { ...tlsConnectionOptions(tls), perMessageDeflate: false };
  return class TlsWebSocket extends WebSocket {
    constructor(url: string | URL, protocols?: string | string[]) {
      super(url, protocols, options);
      if (tls.onSession) {
        const onSession = tls.onSession;
        this.once('upgrade', (response: http.IncomingMessage) => {
          (response.socket as TLSSocket).on('session', onSession);
        });
      }
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
