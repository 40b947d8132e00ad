/**
 * PgAdapter against a real PostgreSQL: two PubSubs, each with its own adapter and its own pool
 * on the same schema, stand for two nodes. Skipped on PGlite, whose LISTEN/NOTIFY stays in-process.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import pino from 'pino';
import {
  createPubSub,
  NOTIFY_PAYLOAD_LIMIT,
  PgAdapter,
  pubsubAdapterFor,
  type Message,
  type PubSubWithStats,
} from '../../server/channels/index.ts';
import { isBinaryPayload } from '../../server/channels/serializers.ts';
import { openDatabase, type DatabaseHandle } from '../../server/db/index.ts';
import { createTestDatabase } from '../helpers/db.ts';
import { waitFor } from '../helpers/phoenix.ts';

const DATABASE_URL = process.env.DATABASE_URL;
const SKIP = DATABASE_URL
  ? false
  : 'needs DATABASE_URL=postgres://… (PGlite has no LISTEN/NOTIFY between processes, so a PGlite server is single-node)';
const log = pino({ level: process.env.FLEETHUB_TEST_LOG_LEVEL ?? 'silent' });

interface Node {
  adapter: PgAdapter;
  pubsub: PubSubWithStats;
}

/** Collects what a PubSub delivers on `topic`. */
function collect(pubsub: PubSubWithStats, topic: string): Message[] {
  const got: Message[] = [];
  pubsub.subscribe(topic, (m) => got.push(m));
  return got;
}

/** A round trip through the cluster: once `to` has this marker, everything `from` published before it has arrived. */
async function settle(from: Node, to: Node): Promise<void> {
  const marker = `settle-${Math.random()}`;
  const got = collect(to.pubsub, marker);
  await from.pubsub.broadcast(marker, 'done', {});
  await waitFor(() => got.length === 1, 5000, 'the settle marker');
}

describe('PgAdapter: PubSub between nodes over PostgreSQL LISTEN/NOTIFY', { skip: SKIP }, () => {
  let first: DatabaseHandle;
  let second: DatabaseHandle;
  let a: Node;
  let b: Node;
  const extra: Node[] = [];

  async function startNode(
    handle: DatabaseHandle,
    options: Partial<ConstructorParameters<typeof PgAdapter>[0]> = {},
  ): Promise<Node> {
    const adapter = new PgAdapter({
      connectionString: DATABASE_URL!,
      db: handle.db,
      schema: handle.schema,
      log,
      ...options,
    });
    const pubsub = createPubSub({ adapter, log });
    await pubsub.ready;
    return { adapter, pubsub };
  }

  before(async () => {
    first = await createTestDatabase();
    second = await openDatabase({ databaseUrl: DATABASE_URL, dataDir: 'memory://', schema: first.schema, poolSize: 3 });
    a = await startNode(first, { nodeName: 'node-a' });
    b = await startNode(second, { nodeName: 'node-b' });
  });

  after(async () => {
    for (const n of [a, b, ...extra]) await n?.pubsub.close();
    await second?.close();
    await first?.close();
  });

  test('each node receives the other node’s broadcasts exactly once, and its own only locally', async () => {
    const onA = collect(a.pubsub, 'room:1');
    const onB = collect(b.pubsub, 'room:1');
    await a.pubsub.broadcast('room:1', 'hello', { from: 'a' });
    await b.pubsub.broadcast('room:1', 'hello', { from: 'b' });
    await settle(a, b);
    await settle(b, a);
    // Order between two publishers is not defined; each message arrives once on each node.
    assert.deepEqual(onA.map((m) => m.payload.from).sort(), ['a', 'b']);
    assert.deepEqual(onB.map((m) => m.payload.from).sort(), ['a', 'b']);
    assert.deepEqual(
      onB.find((m) => m.payload.from === 'a'),
      { topic: 'room:1', event: 'hello', payload: { from: 'a' } },
    );
  });

  test('a localBroadcast stays on its node', async () => {
    const onB = collect(b.pubsub, 'room:local');
    a.pubsub.localBroadcast('room:local', 'x', {});
    await settle(a, b);
    assert.equal(onB.length, 0);
  });

  test('messages from one publisher arrive in publish order, also when published concurrently', async () => {
    const onB = collect(b.pubsub, 'room:order');
    const notificationsBefore = a.adapter.stats.notifications;
    // Like the fleet's publishAll: a batch of broadcasts started together, not awaited one by one.
    await Promise.all(
      Array.from({ length: 2000 }, (_, i) => a.pubsub.broadcast('room:order', 'n', { i, pad: 'x'.repeat(i % 50) })),
    );
    await settle(a, b);
    assert.deepEqual(
      onB.map((m) => m.payload.i),
      Array.from({ length: 2000 }, (_, i) => i),
    );
    assert.ok(a.adapter.stats.notifications - notificationsBefore < 2000, 'small messages share notifications');
  });

  test('a payload over the NOTIFY limit travels through the pubsub_payloads table and keeps its place in the order', async () => {
    const onB = collect(b.pubsub, 'room:large');
    const big = 'ünïcødé ✓ '.repeat(3000); // well over 8000 bytes once UTF-8 encoded
    assert.ok(Buffer.byteLength(big) > NOTIFY_PAYLOAD_LIMIT * 2);
    const viaTableBefore = a.adapter.stats.viaTable;
    await Promise.all([
      a.pubsub.broadcast('room:large', 'small', { n: 1 }),
      a.pubsub.broadcast('room:large', 'large', { text: big, nested: { list: [1, 2, 3] } }),
      a.pubsub.broadcast('room:large', 'small', { n: 2 }),
    ]);
    await settle(a, b);
    assert.deepEqual(
      onB.map((m) => m.event),
      ['small', 'large', 'small'],
    );
    assert.deepEqual(onB[1]!.payload, { text: big, nested: { list: [1, 2, 3] } });
    assert.equal(a.adapter.stats.viaTable - viaTableBefore, 1);
    const rows = await first.db
      .selectFrom('pubsub_payloads')
      .select(['origin', 'body'])
      .where('origin', '=', a.adapter.origin)
      .execute();
    assert.equal(rows.length, 1);
    assert.ok(rows[0]!.body.includes('✓'));
  });

  test('binary payloads arrive as the same bytes, as binary', async () => {
    const onB = collect(b.pubsub, 'room:binary');
    const bytes = new Uint8Array(256).map((_, i) => i);
    const large = new Uint8Array(20_000).map((_, i) => (i * 7) % 256);
    await a.pubsub.broadcast('room:binary', 'blob', { binary: bytes });
    await a.pubsub.broadcast('room:binary', 'blob', { binary: large.subarray(1000) });
    await settle(a, b);
    assert.equal(onB.length, 2);
    assert.ok(isBinaryPayload(onB[0]!.payload));
    assert.deepEqual(Buffer.from(onB[0]!.payload.binary as Uint8Array), Buffer.from(bytes));
    assert.ok(isBinaryPayload(onB[1]!.payload));
    assert.deepEqual(Buffer.from(onB[1]!.payload.binary as Uint8Array), Buffer.from(large.subarray(1000)));
  });

  test('large-payload rows older than the retention are deleted', async () => {
    const quick = await startNode(second, { payloadRetentionMs: 200 });
    extra.push(quick);
    await quick.pubsub.broadcast('room:gc', 'large', { text: 'y'.repeat(NOTIFY_PAYLOAD_LIMIT + 1) });
    const mine = () =>
      second.db.selectFrom('pubsub_payloads').select('id').where('origin', '=', quick.adapter.origin).execute();
    assert.equal((await mine()).length, 1);
    const deadline = Date.now() + 10_000;
    while ((await mine()).length) {
      assert.ok(Date.now() < deadline, 'the row was not deleted within 10 s');
      await new Promise((r) => setTimeout(r, 100));
    }
  });

  test('the LISTEN connection reconnects after PostgreSQL drops it, and delivery resumes', async () => {
    const c = await startNode(second, { nodeName: 'node-c', reconnectMs: { initial: 20, max: 200 } });
    extra.push(c);
    const onC = collect(c.pubsub, 'room:reconnect');
    const pid = c.adapter.listenerPid;
    assert.ok(pid, 'the adapter knows its LISTEN backend');
    const admin = new pg.Client({ connectionString: DATABASE_URL });
    await admin.connect();
    try {
      await admin.query('SELECT pg_terminate_backend($1)', [pid]);
    } finally {
      await admin.end();
    }
    await waitFor(() => c.adapter.stats.reconnects === 1, 10_000, 'the reconnect');
    assert.notEqual(c.adapter.listenerPid, pid);
    await a.pubsub.broadcast('room:reconnect', 'after', { ok: true });
    await settle(a, c);
    assert.deepEqual(
      onC.map((m) => m.event),
      ['after'],
    );
  });

  test('clusters on different channels do not hear each other', async () => {
    const other = await startNode(second, { channel: `${a.adapter.channel}_other` });
    extra.push(other);
    const onOther = collect(other.pubsub, 'room:iso');
    await a.pubsub.broadcast('room:iso', 'x', {});
    await settle(a, b);
    await other.pubsub.broadcast('room:iso', 'self', {}); // local delivery only
    assert.deepEqual(
      onOther.map((m) => m.event),
      ['self'],
    );
  });

  test('publishing after stop is refused with a code', async () => {
    const d = await startNode(second);
    await d.pubsub.close();
    await assert.rejects(d.adapter.publish({ topic: 't', event: 'e', payload: {} }), /PUBSUB_ADAPTER_STOPPED/);
  });
});

describe('pubsubAdapterFor', () => {
  test('gives no cross-node adapter on embedded PGlite, whose notifications never leave the process', () => {
    const db = {} as Parameters<typeof pubsubAdapterFor>[0]['db'];
    assert.equal(pubsubAdapterFor({ db, kind: 'pglite' }, { log }), undefined);
  });

  test('gives a PgAdapter on PostgreSQL, on a channel named after the schema', () => {
    const db = {} as Parameters<typeof pubsubAdapterFor>[0]['db'];
    const adapter = pubsubAdapterFor(
      { db, kind: 'postgres', databaseUrl: 'postgres://example.invalid/x', schema: 't_abc' },
      { log },
    );
    assert.ok(adapter instanceof PgAdapter);
    assert.equal(adapter.channel, 'fleethub_pubsub_t_abc');
  });
});
