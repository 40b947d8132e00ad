/**
 * The WebSocket side of the transport: subprotocol negotiation, token extraction and the
 * `Connection` a socket writes to (with back-pressure: a consumer that stays too slow is cut).
 */
import type { WebSocket } from 'ws';
import type { OutFrame } from './serializers.ts';
import type { Connection, EndpointStats } from './socket.ts';
import type { Logger } from 'pino';

export const AUTH_TOKEN_PREFIX = 'base64url.bearer.phx.';

/**
 * `handleProtocols` for the `ws` server: answer `phoenix` when the client offers it (the
 * official client offers `["phoenix", "base64url.bearer.phx.<token>"]`), never echo the token.
 */
export function phoenixProtocolHandler(protocols: Set<string>): string | false {
  return protocols.has('phoenix') ? 'phoenix' : false;
}

/** The bearer token from `Sec-WebSocket-Protocol` (base64 or base64url, padding optional). */
export function tokenFromProtocolHeader(header: string | undefined): string | undefined {
  if (!header) return undefined;
  for (const entry of header.split(',')) {
    const value = entry.trim();
    if (value.startsWith(AUTH_TOKEN_PREFIX)) {
      // Node's base64 decoder accepts both alphabets; the phoenix client uses btoa minus '='.
      return Buffer.from(value.slice(AUTH_TOKEN_PREFIX.length), 'base64').toString('utf8');
    }
  }
  return undefined;
}

const TEXT = { binary: false } as const;
const BINARY = { binary: true } as const;
const OPEN = 1;

export class WsConnection implements Connection {
  readonly transport = 'websocket' as const;

  constructor(
    readonly ws: WebSocket,
    readonly maxBufferedBytes: number,
    readonly stats: EndpointStats,
    readonly log: Logger,
  ) {}

  write(frame: OutFrame): void {
    const ws = this.ws;
    if (ws.readyState !== OPEN) return;
    if (ws.bufferedAmount > this.maxBufferedBytes) {
      // Buffering without bound would let one slow device exhaust memory: cut it; it reconnects.
      this.stats.slowConsumers++;
      this.log.warn({ buffered: ws.bufferedAmount }, 'slow consumer disconnected');
      ws.terminate();
      return;
    }
    // The same Buffer goes to every subscriber; ws writes it without copying.
    ws.send(frame.bytes, frame.binary ? BINARY : TEXT);
  }

  close(code: number, reason: string): void {
    // Already closing or closed: the 'close' event follows on its own.
    if (this.ws.readyState === OPEN) this.ws.close(code, reason);
  }

  destroy(): void {
    this.ws.terminate();
  }
}
