/**
 * LongPoll transport session (PROTOCOL.md): the server buffers frames until the client polls.
 * Bodies are always `{status, token?, messages?}` with HTTP 200; the phoenix client reads
 * `status` from the JSON. A session nobody polled for `sessionTimeoutMs` is closed by the
 * endpoint's sweep.
 */
import type { Logger } from 'pino';
import type { OutFrame } from './serializers.ts';
import type { Connection, EndpointStats, PhoenixSocket } from './socket.ts';

export interface LongPollBody {
  status: 200 | 204 | 403 | 410 | 500;
  token?: string;
  messages?: string[];
}

export interface LongPollTimings {
  /** How long a GET waits for messages before answering 204 (default 10 s). */
  pollTimeoutMs: number;
  /** A session with no poll for this long ends (default 15 s). */
  sessionTimeoutMs: number;
}

interface PendingPoll {
  resolve(body: LongPollBody): void;
  timer: NodeJS.Timeout;
}

export class LongPollSession<A> implements Connection {
  readonly transport = 'longpoll' as const;
  socket: PhoenixSocket<A> | undefined;
  lastPoll = Date.now();
  closed = false;
  #buffer: string[] = [];
  #bufferedBytes = 0;
  #pending: PendingPoll | undefined;
  #flushScheduled = false;

  constructor(
    readonly token: string,
    readonly timings: LongPollTimings,
    readonly maxBufferedBytes: number,
    readonly stats: EndpointStats,
    readonly log: Logger,
    readonly onClosed: (session: LongPollSession<A>, reason: string) => void,
  ) {}

  get polling(): boolean {
    return this.#pending !== undefined;
  }

  write(frame: OutFrame): void {
    if (this.closed) return;
    if (frame.binary) {
      // LongPoll carries JSON strings only; binary payloads need the WebSocket transport.
      this.log.warn('binary frame dropped on longpoll transport');
      return;
    }
    frame.text ??= frame.bytes.toString('utf8');
    const text = frame.text;
    this.#bufferedBytes += text.length;
    if (this.#bufferedBytes > this.maxBufferedBytes) {
      this.stats.slowConsumers++;
      this.log.warn({ buffered: this.#bufferedBytes }, 'slow longpoll consumer disconnected');
      this.close(1013, 'slow consumer');
      return;
    }
    this.#buffer.push(text);
    if (this.#pending && !this.#flushScheduled) {
      // Batch frames written in the same turn into one poll response.
      this.#flushScheduled = true;
      setImmediate(() => {
        this.#flushScheduled = false;
        if (this.#buffer.length > 0) this.#answer(this.#take());
      });
    }
  }

  /** A GET: answers buffered messages now, or waits up to `pollTimeoutMs`. */
  poll(): Promise<LongPollBody> {
    this.lastPoll = Date.now();
    // One poll at a time: an older one still waiting is released empty.
    if (this.#pending) this.#answer({ status: 204, token: this.token });
    if (this.#buffer.length > 0) return Promise.resolve(this.#take());
    return new Promise<LongPollBody>((resolve) => {
      const timer = setTimeout(() => this.#answer({ status: 204, token: this.token }), this.timings.pollTimeoutMs);
      timer.unref();
      this.#pending = { resolve, timer };
    });
  }

  /** The client went away before its poll was answered: keep messages for the next poll. */
  abandonPoll(): void {
    if (!this.#pending) return;
    clearTimeout(this.#pending.timer);
    this.#pending = undefined;
    this.lastPoll = Date.now();
  }

  #take(): LongPollBody {
    const messages = this.#buffer;
    this.#buffer = [];
    this.#bufferedBytes = 0;
    return { status: 200, token: this.token, messages };
  }

  #answer(body: LongPollBody): void {
    const pending = this.#pending;
    if (!pending) return;
    this.#pending = undefined;
    clearTimeout(pending.timer);
    this.lastPoll = Date.now();
    pending.resolve(body);
  }

  destroy(): void {
    this.close(1006, 'destroyed');
  }

  close(_code: number, reason: string): void {
    if (this.closed) return;
    this.closed = true;
    // 410 tells a client holding a token that its session is gone: it reconnects and rejoins.
    this.#answer({ status: 410 });
    this.#buffer = [];
    this.onClosed(this, reason);
  }
}
