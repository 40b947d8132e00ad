/**
 * Helpers to speak Phoenix Channels in tests: the official `phoenix` client over mutual TLS,
 * promises for join/push replies, and a raw-frame `ws` client for cases the client cannot produce.
 */
import { once } from 'node:events';
import { Socket, LongPoll, type Channel, type SocketConnectOption } from 'phoenix';
import WebSocket from 'ws';
import {
  installTlsXMLHttpRequest,
  tlsWebSocket,
  type TlsClientOptions,
} from '../../device-client/phoenix-transport.ts';

export type { TlsClientOptions };

export interface OpenSocketOptions extends Partial<SocketConnectOption> {
  tls: TlsClientOptions;
  /** Use phoenix's LongPoll transport (over the global XMLHttpRequest shim) instead of WebSocket. */
  longpoll?: boolean;
}

/** Opens an official phoenix `Socket` to `url` (e.g. `wss://127.0.0.1:port/socket`) and waits until it is open. */
export async function openSocket(url: string, options: OpenSocketOptions): Promise<Socket> {
  const { tls, longpoll, ...rest } = options;
  if (longpoll) installTlsXMLHttpRequest(tls);
  const socket = new Socket(url, {
    transport: (longpoll ? LongPoll : tlsWebSocket(tls)) as unknown as SocketConnectOption['transport'],
    reconnectAfterMs: () => 50,
    rejoinAfterMs: () => 50,
    ...rest,
  });
  await new Promise<void>((resolve, reject) => {
    const refs: string[] = [];
    refs.push(
      socket.onOpen(() => {
        socket.off(refs);
        resolve();
      }),
      socket.onError((error: unknown) => {
        socket.off(refs);
        socket.disconnect();
        reject(new Error(`socket error: ${String((error as { message?: string })?.message ?? error)}`));
      }),
    );
    socket.connect();
  });
  return socket;
}

/** Resolves with the ok response, rejects with the error response (or timeout). */
export function joinChannel(channel: Channel, timeoutMs = 5000): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    channel
      .join(timeoutMs)
      .receive('ok', (response: Record<string, unknown>) => resolve(response))
      .receive('error', (response: Record<string, unknown>) =>
        reject(Object.assign(new Error(`join error: ${JSON.stringify(response)}`), { response })),
      )
      .receive('timeout', () => reject(new Error('join timeout')));
  });
}

export interface PushOutcome {
  status: 'ok' | 'error' | 'timeout';
  response: Record<string, unknown>;
}

/** Pushes and resolves with whichever reply comes (ok, error or timeout). */
export function pushAndWait(channel: Channel, event: string, payload: object, timeoutMs = 5000): Promise<PushOutcome> {
  return new Promise((resolve) => {
    channel
      .push(event, payload, timeoutMs)
      .receive('ok', (response: Record<string, unknown>) => resolve({ status: 'ok', response }))
      .receive('error', (response: Record<string, unknown>) => resolve({ status: 'error', response }))
      .receive('timeout', () => resolve({ status: 'timeout', response: {} }));
  });
}

/** Resolves with the payload of the next `event` on `channel`. */
export function nextEvent(channel: Channel, event: string, timeoutMs = 5000): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      channel.off(event, ref);
      reject(new Error(`no ${event} within ${timeoutMs} ms`));
    }, timeoutMs);
    const ref = channel.on(event, (payload: Record<string, unknown>) => {
      clearTimeout(timer);
      channel.off(event, ref);
      resolve(payload);
    });
  });
}

/** Disconnects and resolves once the transport is closed. */
export function disconnectSocket(socket: Socket): Promise<void> {
  return new Promise((resolve) => socket.disconnect(() => resolve(), 1000, 'test done'));
}

/** Waits until `predicate` holds (polling), or fails after `timeoutMs`. */
export async function waitFor(predicate: () => boolean, timeoutMs = 20_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export type RawFrame = { binary: false; text: string; json: unknown } | { binary: true; data: Buffer };

/** A raw `ws` client that records every frame, for protocol cases the official client cannot produce. */
export class RawClient {
  readonly frames: RawFrame[] = [];
  #waiters: (() => void)[] = [];
  closeCode: number | undefined;
  readonly closed: Promise<number>;

  private constructor(readonly ws: WebSocket) {
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (isBinary) this.frames.push({ binary: true, data });
      else {
        const text = data.toString('utf8');
        let json: unknown;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        this.frames.push({ binary: false, text, json });
      }
      for (const wake of this.#waiters.splice(0)) wake();
    });
    this.closed = new Promise((resolve) => {
      ws.on('close', (code: number) => {
        this.closeCode = code;
        for (const wake of this.#waiters.splice(0)) wake();
        resolve(code);
      });
    });
  }

  /** Connects; rejects with the HTTP status (`err.status`) when the upgrade is refused. */
  static async connect(
    url: string,
    tls: TlsClientOptions,
    options: { protocols?: string[]; headers?: Record<string, string> } = {},
  ): Promise<RawClient> {
    const ws = new WebSocket(url, options.protocols, { ...tls, headers: options.headers, perMessageDeflate: false });
    const refused = new Promise<never>((_, reject) => {
      ws.once('unexpected-response', (_req, res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          ws.terminate();
          reject(
            Object.assign(new Error(`HTTP ${res.statusCode}`), {
              status: res.statusCode,
              body: Buffer.concat(chunks).toString('utf8'),
            }),
          );
        });
      });
      ws.once('error', (err) => reject(err));
    });
    await Promise.race([once(ws, 'open'), refused]);
    return new RawClient(ws);
  }

  send(frame: unknown): void {
    this.ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame));
  }

  sendBinary(data: Buffer): void {
    this.ws.send(data, { binary: true });
  }

  /** Waits for the first recorded frame (from index `from`) matching `match`. */
  async waitFrame(match: (frame: RawFrame) => boolean, timeoutMs = 5000, from = 0): Promise<RawFrame> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.frames.slice(from).find(match);
      if (found) return found;
      if (this.closeCode !== undefined) throw new Error(`socket closed (${this.closeCode}) before the expected frame`);
      const left = deadline - Date.now();
      if (left <= 0)
        throw new Error(
          `no matching frame within ${timeoutMs} ms; got ${JSON.stringify(this.frames.map((f) => (f.binary ? '<binary>' : f.text)))}`,
        );
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** Waits for a V2 JSON frame `[jr, ref, topic, event, payload]` with this ref and event. */
  async waitArray(pred: (f: unknown[]) => boolean, timeoutMs = 5000): Promise<unknown[]> {
    const frame = await this.waitFrame((f) => !f.binary && Array.isArray(f.json) && pred(f.json), timeoutMs);
    return (frame as { json: unknown[] }).json;
  }

  async close(): Promise<void> {
    if (this.closeCode !== undefined) return;
    this.ws.close(1000);
    await this.closed;
  }
}
