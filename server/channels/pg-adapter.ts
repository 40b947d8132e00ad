/**
 * Cross-node PubSub over PostgreSQL LISTEN/NOTIFY (docs/cluster.md).
 *
 * Every node LISTENs on one channel with a dedicated `pg` client and publishes through the
 * Kysely pool. A notification carries an envelope `{o: origin, s: seq, m: [messages]}`; the
 * origin lets a node drop its own notifications (pubsub.ts already delivered them locally).
 * Messages are packed into as few notifications as fit under the NOTIFY limit; a message that
 * does not fit on its own is written to `pubsub_payloads` and its row id is notified instead.
 *
 * Ordering per publisher: publishes are queued and sent by one flush loop, one statement at a
 * time, and a receiver handles notifications strictly in arrival order (also while it reads a
 * large payload's row). NOTIFY is not durable: what is published while a listener reconnects
 * is lost for that node, which is logged as a sequence gap.
 *
 * Embedded PGlite delivers notifications in-process only, so a PGlite server keeps the
 * LocalAdapter (see `pubsubAdapterFor`).
 */
import { randomBytes } from 'node:crypto';
import { sql, type ColumnType, type Generated, type Kysely } from 'kysely';
import pg from 'pg';
import type { Logger } from 'pino';
import type { Database } from '../db/schema.ts';
import { binaryPayload, isBinaryPayload } from './serializers.ts';
import type { Message, Payload, PubSubAdapter } from './types.ts';

export interface PubsubPayloadsTable {
  id: Generated<number>;
  origin: string;
  body: string;
  created_at: ColumnType<Date, Date | string | undefined, never>;
}

declare module '../db/schema.ts' {
  interface Database {
    pubsub_payloads: PubsubPayloadsTable;
  }
}

/** PostgreSQL rejects NOTIFY payloads of 8000 bytes or more; stay a little below. */
export const NOTIFY_PAYLOAD_LIMIT = 7900;
/** Notifications sent per round trip (one `pg_notify` per array element, in order). */
const NOTIFICATIONS_PER_STATEMENT = 64;

export interface PgAdapterOptions {
  /** `postgres://...` for the dedicated LISTEN connection (never logged). */
  connectionString: string;
  /** The pooled handle that publishes and reads large payloads; its search_path must see `pubsub_payloads`. */
  db: Kysely<Database>;
  /** Every node of one cluster must use the same channel; default: `fleethub_pubsub[_<schema>]`. */
  channel?: string;
  /** Used only to name the channel by default (tests run one cluster per schema in one database). */
  schema?: string;
  /** This node's name, for logs and `application_name`. */
  nodeName?: string;
  log: Logger;
  /** Reconnect backoff of the LISTEN connection: first delay, doubled per failure up to `max`. */
  reconnectMs?: { initial: number; max: number };
  /** How often the LISTEN connection is checked with `SELECT 1`; a check that takes longer counts as a drop. */
  healthCheckMs?: number;
  /** Large-payload rows older than this are deleted (receivers read them within milliseconds). */
  payloadRetentionMs?: number;
}

export interface PgAdapterStats {
  /** Messages handed to `publish`. */
  published: number;
  /** NOTIFY calls made (one carries many small messages). */
  notifications: number;
  /** Messages that went through the `pubsub_payloads` table. */
  viaTable: number;
  /** Messages from other nodes delivered to the PubSub. */
  received: number;
  /** Notifications that could not be used (malformed, or their payload row was gone). */
  dropped: number;
  /** Notifications from another node that arrived after a gap in its sequence. */
  gaps: number;
  /** Times the LISTEN connection was re-established. */
  reconnects: number;
}

/** A message as it travels: JSON payloads as-is, binary payloads as base64. */
type WireMessage = { t: string; e: string; p: Payload } | { t: string; e: string; b: string };

interface Envelope {
  /** Origin: the publishing adapter's random id. */
  o: string;
  /** Per-origin sequence number (also keeps NOTIFY from merging identical payloads). */
  s: number;
  m?: WireMessage[];
  /** Id of a `pubsub_payloads` row holding `m`. */
  r?: number;
}

interface Pending {
  json: string;
  bytes: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

type Outgoing = { kind: 'inline'; notify: string[]; items: Pending[] } | { kind: 'table'; item: Pending };

/** PubSub between nodes sharing one PostgreSQL database. */
export class PgAdapter implements PubSubAdapter {
  readonly stats: PgAdapterStats = {
    published: 0,
    notifications: 0,
    viaTable: 0,
    received: 0,
    dropped: 0,
    gaps: 0,
    reconnects: 0,
  };
  /** This adapter's origin id: random per process, so two nodes with one name still see each other. */
  readonly origin = randomBytes(8).toString('hex');
  readonly channel: string;

  readonly #options: PgAdapterOptions;
  readonly #log: Logger;
  #deliver: ((message: Message) => void) | undefined;
  #client: pg.Client | undefined;
  #listenerPid: number | undefined;
  #stopped = false;
  #failures = 0;
  #reconnectTimer: NodeJS.Timeout | undefined;
  #timers: NodeJS.Timeout[] = [];
  #seq = 0;
  #queue: Pending[] = [];
  #flushing: Promise<void> | undefined;
  #inbox: Envelope[] = [];
  #draining = false;
  #lastSeq = new Map<string, number>();

  constructor(options: PgAdapterOptions) {
    this.#options = options;
    this.#log = options.log;
    this.channel = (
      options.channel ?? (options.schema ? `fleethub_pubsub_${options.schema}` : 'fleethub_pubsub')
    ).toLowerCase();
    if (!/^[a-z_][a-z0-9_]{0,62}$/.test(this.channel)) {
      throw new Error(
        `PUBSUB_CHANNEL_INVALID: channel ${JSON.stringify(this.channel)} must be letters, digits and _ (at most 63); pass a shorter \`channel\``,
      );
    }
  }

  /** The backend pid of the LISTEN connection (undefined while reconnecting). */
  get listenerPid(): number | undefined {
    return this.#listenerPid;
  }

  async start(deliver: (message: Message) => void): Promise<void> {
    this.#deliver = deliver;
    // The first connection must work: a wrong URL should fail the start, not retry forever.
    await this.#connect();
    const health = setInterval(() => void this.#checkHealth(), this.#options.healthCheckMs ?? 15_000);
    const cleanup = setInterval(
      () => void this.#deleteOldPayloads(),
      Math.max(1000, Math.min(60_000, this.#retentionMs())),
    );
    for (const t of [health, cleanup]) t.unref();
    this.#timers.push(health, cleanup);
    this.#log.info({ channel: this.channel, origin: this.origin }, 'pubsub listening on PostgreSQL');
  }

  publish(message: Message): Promise<void> {
    if (this.#stopped)
      return Promise.reject(new Error('PUBSUB_ADAPTER_STOPPED: publish after stop; create a new PubSub'));
    this.stats.published++;
    const json = JSON.stringify(toWire(message));
    return new Promise<void>((resolve, reject) => {
      this.#queue.push({ json, bytes: Buffer.byteLength(json), resolve, reject });
      this.#flushing ??= this.#flush();
    });
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    for (const t of this.#timers) clearInterval(t);
    clearTimeout(this.#reconnectTimer);
    // What was published before stop still goes out.
    await this.#flushing;
    const client = this.#client;
    this.#client = undefined;
    this.#listenerPid = undefined;
    this.#deliver = undefined;
    await client?.end().catch(() => undefined);
  }

  // ---- publishing

  /** Sends the queue in order until it is empty; publishes arriving meanwhile join the next round. */
  async #flush(): Promise<void> {
    try {
      while (this.#queue.length) {
        const out = this.#takeOutgoing();
        const items = out.kind === 'inline' ? out.items : [out.item];
        try {
          if (out.kind === 'inline') await this.#notify(out.notify);
          else await this.#notifyViaTable(out.item.json);
          for (const item of items) item.resolve();
        } catch (err) {
          for (const item of items) item.reject(err);
        }
      }
    } finally {
      // Runs in the same tick as the loop's last check: no publish can slip in unsent.
      this.#flushing = undefined;
    }
  }

  /** The next statement's worth: inline notifications packed greedily, or one oversized message. */
  #takeOutgoing(): Outgoing {
    const queue = this.#queue;
    if (this.#envelopeBytes(queue[0]!.bytes) > NOTIFY_PAYLOAD_LIMIT) return { kind: 'table', item: queue.shift()! };
    const notify: string[] = [];
    let start = 0; // first message of the open chunk
    let end = 0; // one past the last message taken
    let chunkBytes = 0;
    const close = () => {
      notify.push(
        this.#envelope(
          `"m":[${queue
            .slice(start, end)
            .map((p) => p.json)
            .join(',')}]`,
        ),
      );
      start = end;
      chunkBytes = 0;
    };
    while (end < queue.length && notify.length < NOTIFICATIONS_PER_STATEMENT) {
      const next = queue[end]!;
      if (this.#envelopeBytes(next.bytes) > NOTIFY_PAYLOAD_LIMIT) break; // goes by table, in order, next round
      const withNext = chunkBytes + next.bytes + (end > start ? 1 : 0);
      if (end > start && this.#envelopeBytes(withNext) > NOTIFY_PAYLOAD_LIMIT) {
        close();
        continue;
      }
      end++;
      chunkBytes = withNext;
    }
    if (end > start) close();
    // One splice, not a shift per message: a group change can queue 20,000 messages.
    return { kind: 'inline', notify, items: queue.splice(0, end) };
  }

  /** Upper bound of an inline envelope's size around `bytes` of messages (seq up to 16 digits). */
  #envelopeBytes(bytes: number): number {
    return bytes + this.origin.length + 40;
  }

  #envelope(body: string): string {
    return `{"o":"${this.origin}","s":${++this.#seq},${body}}`;
  }

  async #notify(payloads: string[]): Promise<void> {
    // unnest yields the array in order and NOTIFY keeps the order of one transaction.
    await sql`SELECT count(pg_notify(${this.channel}, n)) FROM unnest(${payloads}::text[]) AS n`.execute(
      this.#options.db,
    );
    this.stats.notifications += payloads.length;
  }

  async #notifyViaTable(messageJson: string): Promise<void> {
    const origin = this.origin;
    await this.#options.db.transaction().execute(async (trx) => {
      const row = await trx
        .insertInto('pubsub_payloads')
        .values({ origin, body: `[${messageJson}]` })
        .returning('id')
        .executeTakeFirstOrThrow();
      // Delivered at commit, when the row is visible to the receivers.
      await sql`SELECT pg_notify(${this.channel}, ${this.#envelope(`"r":${Number(row.id)}`)})`.execute(trx);
    });
    this.stats.notifications++;
    this.stats.viaTable++;
  }

  #retentionMs(): number {
    return this.#options.payloadRetentionMs ?? 5 * 60_000;
  }

  async #deleteOldPayloads(): Promise<void> {
    try {
      const cutoff = new Date(Date.now() - this.#retentionMs());
      await this.#options.db.deleteFrom('pubsub_payloads').where('created_at', '<', cutoff).execute();
    } catch (err) {
      this.#log.warn({ err }, 'could not delete old pubsub payloads; will retry');
    }
  }

  // ---- receiving

  #receive(raw: string): void {
    let envelope: Envelope;
    try {
      envelope = JSON.parse(raw) as Envelope;
      if (typeof envelope.o !== 'string' || typeof envelope.s !== 'number')
        throw new Error('envelope without origin or sequence');
    } catch (err) {
      this.stats.dropped++;
      this.#log.warn({ err, bytes: raw.length }, 'dropped a malformed pubsub notification');
      return;
    }
    if (envelope.o === this.origin) return; // pubsub.ts delivered it locally already
    const last = this.#lastSeq.get(envelope.o);
    if (last !== undefined && envelope.s !== last + 1) {
      this.stats.gaps++;
      this.#log.warn(
        { from: envelope.o, expected: last + 1, got: envelope.s },
        'missed pubsub notifications from another node',
      );
    }
    this.#lastSeq.set(envelope.o, envelope.s);
    this.#inbox.push(envelope);
    if (!this.#draining) void this.#drain();
  }

  /** Delivers envelopes in arrival order; inline ones synchronously when nothing waits before them. */
  async #drain(): Promise<void> {
    this.#draining = true;
    try {
      while (this.#inbox.length) {
        const envelope = this.#inbox.shift()!;
        const wire = envelope.r === undefined ? envelope.m : await this.#readPayload(envelope.r);
        for (const w of wire ?? []) {
          const deliver = this.#deliver;
          if (!deliver) return;
          let message: Message;
          try {
            message = fromWire(w);
          } catch (err) {
            this.stats.dropped++;
            this.#log.warn({ err, from: envelope.o }, 'dropped a malformed pubsub message');
            continue;
          }
          this.stats.received++;
          deliver(message);
        }
      }
    } finally {
      this.#draining = false;
    }
  }

  async #readPayload(id: number): Promise<WireMessage[] | undefined> {
    try {
      const row = await this.#options.db
        .selectFrom('pubsub_payloads')
        .select('body')
        .where('id', '=', id)
        .executeTakeFirst();
      if (row) return JSON.parse(row.body) as WireMessage[];
      this.#log.error(
        { payload_id: id },
        'pubsub payload row is gone (deleted before this node read it); message lost',
      );
    } catch (err) {
      this.#log.error({ err, payload_id: id }, 'could not read a pubsub payload row; message lost');
    }
    this.stats.dropped++;
    return undefined;
  }

  // ---- the LISTEN connection

  async #connect(): Promise<void> {
    const client = new pg.Client({
      connectionString: this.#options.connectionString,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
      application_name: `fleethub pubsub ${this.#options.nodeName ?? ''}`.trim().slice(0, 63),
    });
    client.on('error', (err) => this.#lost(client, err));
    client.on('end', () => this.#lost(client));
    client.on('notification', (n) => {
      if (client === this.#client && n.channel === this.channel) this.#receive(n.payload ?? '');
    });
    try {
      await client.connect();
      await client.query(`LISTEN "${this.channel}"`);
      const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
      if (this.#stopped) throw new Error('PUBSUB_ADAPTER_STOPPED: stopped while connecting');
      this.#client = client;
      this.#listenerPid = rows[0]?.pid;
    } catch (err) {
      await client.end().catch(() => undefined);
      throw err;
    }
  }

  /** The LISTEN connection failed or ended: drop it and reconnect with backoff. */
  #lost(client: pg.Client, err?: Error): void {
    if (client !== this.#client || this.#stopped) return;
    this.#client = undefined;
    this.#listenerPid = undefined;
    this.#log.warn(
      { err, channel: this.channel },
      'pubsub LISTEN connection lost; messages from other nodes are missed until it reconnects',
    );
    void client.end().catch(() => undefined);
    this.#scheduleReconnect();
  }

  #scheduleReconnect(): void {
    if (this.#stopped) return;
    const { initial, max } = this.#options.reconnectMs ?? { initial: 100, max: 10_000 };
    const base = Math.min(max, initial * 2 ** this.#failures);
    const delay = Math.round(base / 2 + Math.random() * (base / 2)); // jitter: nodes do not reconnect in lockstep
    this.#reconnectTimer = setTimeout(() => {
      this.#connect().then(
        () => {
          this.#failures = 0;
          this.stats.reconnects++;
          this.#log.info({ channel: this.channel }, 'pubsub LISTEN connection re-established');
        },
        (err: unknown) => {
          if (this.#stopped) return;
          this.#failures++;
          this.#log.warn({ err, attempt: this.#failures }, 'pubsub LISTEN reconnect failed; retrying');
          this.#scheduleReconnect();
        },
      );
    }, delay);
    this.#reconnectTimer.unref();
  }

  /** A silently dead TCP connection shows up only when used: ping it and treat a stall as a drop. */
  async #checkHealth(): Promise<void> {
    const client = this.#client;
    if (!client) return;
    const timeoutMs = this.#options.healthCheckMs ?? 15_000;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        client.query('SELECT 1'),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no answer to SELECT 1 within ${timeoutMs} ms`)), timeoutMs);
        }),
      ]);
    } catch (err) {
      this.#lost(client, err instanceof Error ? err : new Error(String(err)));
    } finally {
      clearTimeout(timer);
    }
  }
}

function toWire(message: Message): WireMessage {
  const { topic: t, event: e, payload } = message;
  if (isBinaryPayload(payload))
    return {
      t,
      e,
      b: Buffer.from(payload.binary.buffer, payload.binary.byteOffset, payload.binary.byteLength).toString('base64'),
    };
  return { t, e, p: payload };
}

function fromWire(w: WireMessage): Message {
  if (typeof w.t !== 'string' || typeof w.e !== 'string') throw new Error('message without topic or event');
  if ('b' in w) return { topic: w.t, event: w.e, payload: binaryPayload(Buffer.from(w.b, 'base64')) };
  if (typeof w.p !== 'object' || w.p === null) throw new Error('message without a payload object');
  return { topic: w.t, event: w.e, payload: w.p };
}

/** What a server needs to pick its adapter: the opened database handle. */
export interface PubSubDatabase {
  db: Kysely<Database>;
  kind: 'postgres' | 'pglite';
  databaseUrl?: string;
  schema?: string;
}

/**
 * The adapter for a node on `database`: `PgAdapter` on PostgreSQL, none (LocalAdapter) on
 * embedded PGlite, whose notifications never leave the process.
 */
export function pubsubAdapterFor(
  database: PubSubDatabase,
  options: { log: Logger; nodeName?: string },
): PgAdapter | undefined {
  if (database.kind !== 'postgres' || !database.databaseUrl) return undefined;
  return new PgAdapter({
    connectionString: database.databaseUrl,
    db: database.db,
    schema: database.schema,
    nodeName: options.nodeName,
    log: options.log,
  });
}
