/**
 * The LongPoll transport of the Phoenix protocol: the server buffers a session's frames until the client
 * polls. Bodies are always `{status, token?, messages?}` with HTTP 200; the phoenix client reads
 * `status` from the JSON. A session nobody polled for `sessionTimeoutMs` is closed by the
 * endpoint's sweep.
 */
import { randomBytes } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { OutFrame } from './serializers.ts';
import type { Connection, PhoenixSocket } from './socket.ts';
import type { EndpointStats } from './types.ts';
import { Transport } from './socket-registry.ts';

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

export interface LongPollTransportOptions {
  timings: LongPollTimings;
  /** Larger frames end the session (1009). */
  maxFrameBytes: number;
  /** A session whose unsent output exceeds this is closed. */
  maxBufferedBytes: number;
}

/**
 * The LongPoll transport (`<path>/longpoll`): a GET without a session token runs the handshake
 * and opens a session, a GET with one polls it, a POST carries frames in. The registry's sweep
 * closes sessions nobody polled for `sessionTimeoutMs`.
 */
export class LongPollTransport<A> extends Transport<A, LongPollTransportOptions> {
  readonly #sessions = new Map<string, LongPollSession<A>>();

  /** Adds the `<base>/longpoll` routes and the NDJSON body parser they need to `scope`. */
  route(scope: FastifyInstance, base: string): void {
    const bodyLimit = this.options.maxFrameBytes * 2;
    scope.addContentTypeParser('application/x-ndjson', { parseAs: 'string', bodyLimit }, (_req, body, done) =>
      done(null, body),
    );
    scope.get(`${base}/longpoll`, (request, reply) => this.#get(request, reply));
    scope.post(`${base}/longpoll`, { bodyLimit }, (request) => this.#post(request));
  }

  /** Ends every session (the server is closing). */
  closeAll(): void {
    for (const session of [...this.#sessions.values()]) session.close(1001, 'server closing');
  }

  protected sweep(now: number): void {
    for (const session of this.#sessions.values()) {
      if (!session.polling && now - session.lastPoll > this.options.timings.sessionTimeoutMs)
        session.close(1001, 'longpoll session expired');
    }
  }

  async #get(request: FastifyRequest, reply: FastifyReply): Promise<LongPollBody> {
    const token = sessionToken(request);
    if (token !== undefined) {
      const session = this.#sessions.get(token);
      // Unknown token: the session is gone; the client reconnects and rejoins.
      if (!session) return { status: 410 };
      const answered = session.poll();
      reply.raw.once('close', () => {
        if (!reply.raw.writableFinished) session.abandonPoll();
      });
      return answered;
    }
    const authHeader = request.headers['x-phoenix-authtoken'];
    const hs = await this.handshake(request, 'longpoll', typeof authHeader === 'string' ? authHeader : undefined);
    if (!hs.ok) return { status: hs.status === 403 || hs.status === 401 || hs.status === 409 ? 403 : 500 };
    // 32 random bytes: unguessable, and the map key binds it to exactly this session.
    const newToken = randomBytes(32).toString('base64url');
    const { stats } = this.registry;
    const { timings, maxBufferedBytes } = this.options;
    const session = new LongPollSession<A>(newToken, timings, maxBufferedBytes, stats, this.log, (closed, reason) => {
      this.#sessions.delete(closed.token);
      stats.longpollSessions--;
      closed.socket?.transportClosed(reason);
    });
    session.socket = this.registry.admit(hs, session);
    this.#sessions.set(newToken, session);
    stats.longpollSessions++;
    return { status: 410, token: newToken };
  }

  async #post(request: FastifyRequest): Promise<LongPollBody> {
    const token = sessionToken(request);
    const session = token === undefined ? undefined : this.#sessions.get(token);
    if (!session?.socket) return { status: 410 };
    const body = request.body;
    // Current clients send newline-delimited frames; older ones one JSON frame.
    const lines =
      typeof body === 'string'
        ? body.split(/\r?\n/)
        : body === undefined || body === null
          ? []
          : [JSON.stringify(body)];
    for (const line of lines) {
      if (line.length === 0) continue;
      if (Buffer.byteLength(line) > this.options.maxFrameBytes) {
        this.registry.stats.oversizedFrames++;
        session.close(1009, 'frame too large');
        return { status: 410 };
      }
      session.socket.handleFrame(Buffer.from(line, 'utf8'), false);
    }
    return { status: 200 };
  }
}

/** The session token of a poll or a post: the query's `token`, else the `x-phoenix-longpoll-token` header. */
function sessionToken(request: FastifyRequest): string | undefined {
  const query = request.query as Record<string, unknown> | undefined;
  const fromQuery = typeof query?.token === 'string' ? query.token : undefined;
  const header = request.headers['x-phoenix-longpoll-token'];
  return fromQuery ?? (typeof header === 'string' ? header : undefined);
}
