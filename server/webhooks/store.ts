/**
 * Webhooks per org and their deliveries (tables `webhooks`, `webhook_deliveries`): subscriptions,
 * the translation of fleet events into webhook events, and the persisted delivery queue that
 * workers claim with `FOR UPDATE SKIP LOCKED` and a lease (so two nodes never send one delivery
 * at the same time, and a node that dies mid-attempt leaves it to the next lease).
 */
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes, randomUUID } from 'node:crypto';
import { type ColumnType, type Generated, sql } from 'kysely';
import { type Actor, audit } from '../audit.ts';
import type { Db } from '../db/index.ts';
import type { FleetEvent } from '../fleet/context.ts';

declare module '../db/schema.ts' {
  interface Database {
    webhooks: WebhooksTable;
    webhook_deliveries: WebhookDeliveriesTable;
  }
}

export interface WebhooksTable {
  id: Generated<string>;
  org_id: string;
  url: string;
  events: string[];
  description: string | null;
  secret_enc: string;
  enabled: Generated<boolean>;
  disabled_at: Date | null;
  disabled_reason: string | null;
  created_by: string | null;
  created_at: ColumnType<Date, Date | string | undefined, never>;
}

export type DeliveryState = 'pending' | 'delivered' | 'failed';

export interface WebhookDeliveriesTable {
  id: Generated<string>;
  webhook_id: string;
  event_id: string;
  event: string;
  payload: ColumnType<Record<string, unknown>, string, string>;
  state: Generated<DeliveryState>;
  attempts: Generated<number>;
  next_attempt_at: ColumnType<Date, Date | string | undefined, Date | string>;
  lease_until: Date | null;
  last_status: number | null;
  last_error: string | null;
  delivered_at: Date | null;
  created_at: ColumnType<Date, Date | string | undefined, never>;
  updated_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

/** The events an operator can subscribe to (`*`: all of them, including ones added later). */
export const WEBHOOK_EVENTS = ['device.online', 'device.offline', 'update.transition', 'target.changed'] as const;
export type WebhookEventType = (typeof WEBHOOK_EVENTS)[number];

/** A webhook as the API shows it: never its secret. */
export interface Webhook {
  id: string;
  org_id: string;
  url: string;
  events: string[];
  description: string | null;
  enabled: boolean;
  disabled_at: Date | null;
  disabled_reason: string | null;
  created_by: string | null;
  created_at: Date;
}

const WEBHOOK_COLUMNS = [
  'id',
  'org_id',
  'url',
  'events',
  'description',
  'enabled',
  'disabled_at',
  'disabled_reason',
  'created_by',
  'created_at',
] as const;

/**
 * The webhook event a fleet event is, if any: operator-topic events only. Download progress
 * (`downloading` with a percent) would be one delivery per step, so only the other update states are sent.
 */
export function webhookEventOf(event: FleetEvent): { orgId: string; type: WebhookEventType; data: object } | undefined {
  if (!event.topic.startsWith('operator:')) return undefined;
  const orgId = event.topic.slice('operator:'.length);
  const p = event.payload;
  if (event.event === 'device_status' && (p.status === 'online' || p.status === 'offline'))
    return { orgId, type: p.status === 'online' ? 'device.online' : 'device.offline', data: p };
  if (event.event === 'update_transition' && p.state !== 'downloading')
    return { orgId, type: 'update.transition', data: p };
  if (event.event === 'target_changed') return { orgId, type: 'target.changed', data: p };
  return undefined;
}

// ---- secrets: generated here, shown once, stored encrypted under the server secret

export function generateWebhookSecret(): string {
  return `whsec_${randomBytes(32).toString('base64url')}`;
}

function secretKey(serverSecret: string): Buffer {
  return Buffer.from(hkdfSync('sha256', serverSecret, 'fleethub', 'webhook signing secrets', 32));
}

export function encryptSecret(serverSecret: string, secret: string): string {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', secretKey(serverSecret), iv);
  const data = Buffer.concat([cipher.update(secret, 'utf8'), cipher.final()]);
  return [iv, cipher.getAuthTag(), data].map((b) => b.toString('base64url')).join('.');
}

export function decryptSecret(serverSecret: string, sealed: string): string {
  const [iv, tag, data] = sealed.split('.').map((part) => Buffer.from(part, 'base64url'));
  const decipher = createDecipheriv('aes-256-gcm', secretKey(serverSecret), iv!);
  decipher.setAuthTag(tag!);
  return Buffer.concat([decipher.update(data!), decipher.final()]).toString('utf8');
}

// ---- subscriptions

export async function createWebhook(
  db: Db,
  serverSecret: string,
  actor: Actor,
  input: { orgId: string; url: string; events: string[]; description?: string | null },
): Promise<Webhook & { secret: string }> {
  const secret = generateWebhookSecret();
  const webhook = await db.transaction().execute(async (trx) => {
    const row = await trx
      .insertInto('webhooks')
      .values({
        org_id: input.orgId,
        url: input.url,
        events: sql<string[]>`${sql.val([...new Set(input.events)])}::text[]` as never,
        description: input.description ?? null,
        secret_enc: encryptSecret(serverSecret, secret),
        created_by: actor.id,
      })
      .returning(WEBHOOK_COLUMNS)
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId: input.orgId,
      action: 'webhook.create',
      resourceType: 'webhook',
      resourceId: row.id,
      details: { url: row.url, events: row.events },
    });
    return row;
  });
  return { ...webhook, secret };
}

export async function listWebhooks(db: Db, orgId: string): Promise<Webhook[]> {
  return db.selectFrom('webhooks').select(WEBHOOK_COLUMNS).where('org_id', '=', orgId).orderBy('created_at').execute();
}

export async function getWebhook(db: Db, orgId: string, id: string): Promise<Webhook | undefined> {
  return db
    .selectFrom('webhooks')
    .select(WEBHOOK_COLUMNS)
    .where('org_id', '=', orgId)
    .where('id', '=', id)
    .executeTakeFirst();
}

/** Enables or disables a webhook, or changes its url, events or description (audited). */
export async function updateWebhook(
  db: Db,
  actor: Actor,
  orgId: string,
  id: string,
  change: { enabled?: boolean; url?: string; events?: string[]; description?: string | null },
): Promise<Webhook | undefined> {
  return db.transaction().execute(async (trx) => {
    const row = await trx
      .updateTable('webhooks')
      .set({
        ...(change.url !== undefined ? { url: change.url } : {}),
        ...(change.events !== undefined
          ? { events: sql<string[]>`${sql.val([...new Set(change.events)])}::text[]` as never }
          : {}),
        ...(change.description !== undefined ? { description: change.description } : {}),
        ...(change.enabled === true ? { enabled: true, disabled_at: null, disabled_reason: null } : {}),
        ...(change.enabled === false
          ? { enabled: false, disabled_at: new Date(), disabled_reason: 'disabled by an operator' }
          : {}),
      })
      .where('org_id', '=', orgId)
      .where('id', '=', id)
      .returning(WEBHOOK_COLUMNS)
      .executeTakeFirst();
    if (row)
      await audit(trx, actor, {
        orgId,
        action: 'webhook.update',
        resourceType: 'webhook',
        resourceId: id,
        details: change,
      });
    return row;
  });
}

export async function deleteWebhook(db: Db, actor: Actor, orgId: string, id: string): Promise<boolean> {
  return db.transaction().execute(async (trx) => {
    const row = await trx
      .deleteFrom('webhooks')
      .where('org_id', '=', orgId)
      .where('id', '=', id)
      .returning(['id', 'url'])
      .executeTakeFirst();
    if (row)
      await audit(trx, actor, {
        orgId,
        action: 'webhook.delete',
        resourceType: 'webhook',
        resourceId: id,
        details: { url: row.url },
      });
    return row !== undefined;
  });
}

/** Orgs with at least one enabled webhook (the enqueue path's cheap pre-check). */
export async function orgsWithWebhooks(db: Db): Promise<Set<string>> {
  const rows = await db.selectFrom('webhooks').select('org_id').distinct().where('enabled', '=', true).execute();
  return new Set(rows.map((r) => r.org_id));
}

// ---- deliveries

/**
 * Queues one delivery per enabled webhook of the org subscribed to the event; returns how many.
 * One statement, so an event is queued for all of its webhooks or none.
 */
export async function enqueueDeliveries(
  db: Db,
  orgId: string,
  type: string,
  data: object,
  at = new Date(),
): Promise<number> {
  const eventId = randomUUID();
  const payload = JSON.stringify({ id: eventId, type, created_at: at.toISOString(), org_id: orgId, data });
  const rows = await sql<{ id: string }>`
    INSERT INTO webhook_deliveries (webhook_id, event_id, event, payload)
    SELECT w.id, ${eventId}, ${type}, ${payload}::jsonb FROM webhooks w
    WHERE w.org_id = ${orgId} AND w.enabled AND (${type} = ANY(w.events) OR '*' = ANY(w.events))
    RETURNING id`.execute(db);
  return rows.rows.length;
}

export interface ClaimedDelivery {
  id: string;
  webhook_id: string;
  event_id: string;
  event: string;
  payload: Record<string, unknown>;
  attempts: number;
  org_id: string;
  url: string;
  secret_enc: string;
}

/**
 * Claims up to `limit` due deliveries of enabled webhooks for `leaseMs`: rows another worker holds
 * (locked now, or leased and not expired) are skipped, so concurrent workers on any number of
 * nodes never send the same delivery twice at once.
 */
export async function claimDueDeliveries(db: Db, limit: number, leaseMs: number): Promise<ClaimedDelivery[]> {
  const rows = await sql<ClaimedDelivery>`
    UPDATE webhook_deliveries d
    SET lease_until = now() + make_interval(secs => ${leaseMs / 1000}), updated_at = now()
    FROM webhooks w
    WHERE w.id = d.webhook_id AND d.id IN (
      SELECT x.id FROM webhook_deliveries x JOIN webhooks y ON y.id = x.webhook_id
      WHERE x.state = 'pending' AND x.next_attempt_at <= now() AND y.enabled
        AND (x.lease_until IS NULL OR x.lease_until < now())
      ORDER BY x.next_attempt_at
      LIMIT ${limit}
      FOR UPDATE OF x SKIP LOCKED)
    RETURNING d.id, d.webhook_id, d.event_id, d.event, d.payload, d.attempts, w.org_id, w.url, w.secret_enc`.execute(
    db,
  );
  return rows.rows;
}

/**
 * When the next pending delivery of an enabled webhook falls due (its retry time, or the end of
 * another worker's lease on it); null when none is pending.
 */
export async function nextDueAt(db: Db): Promise<Date | null> {
  const { rows } = await sql<{ at: Date | null }>`
    SELECT min(greatest(x.next_attempt_at, coalesce(x.lease_until, x.next_attempt_at))) AS at
    FROM webhook_deliveries x JOIN webhooks y ON y.id = x.webhook_id
    WHERE x.state = 'pending' AND y.enabled`.execute(db);
  return rows[0]?.at ?? null;
}

/** Records a 2xx answer: the delivery is done. */
export async function markDelivered(db: Db, id: string, status: number): Promise<void> {
  await db
    .updateTable('webhook_deliveries')
    .set((eb) => ({
      state: 'delivered',
      attempts: eb('attempts', '+', 1),
      last_status: status,
      last_error: null,
      delivered_at: new Date(),
      lease_until: null,
      updated_at: new Date(),
    }))
    .where('id', '=', id)
    .execute();
}

/**
 * Records a failed attempt. With a retry left the delivery is due again after `retryInMs`;
 * without, it is `failed` and its webhook is disabled (audited as `webhook.disabled`), in one
 * transaction. Its other pending deliveries wait: enabling the webhook again sends them.
 */
export async function markAttemptFailed(
  db: Db,
  delivery: ClaimedDelivery,
  failure: { status: number | null; error: string },
  retryInMs: number | undefined,
): Promise<'retry' | 'disabled'> {
  return db.transaction().execute(async (trx) => {
    const now = Date.now();
    await trx
      .updateTable('webhook_deliveries')
      .set((eb) => ({
        state: retryInMs === undefined ? 'failed' : 'pending',
        attempts: eb('attempts', '+', 1),
        last_status: failure.status,
        last_error: failure.error.slice(0, 500),
        next_attempt_at: new Date(now + (retryInMs ?? 0)),
        lease_until: null,
        updated_at: new Date(now),
      }))
      .where('id', '=', delivery.id)
      .execute();
    if (retryInMs !== undefined) return 'retry';
    const attempts = delivery.attempts + 1;
    const reason = `delivery ${delivery.id} (${delivery.event}) failed ${attempts} times; last: ${failure.error}`.slice(
      0,
      500,
    );
    const disabled = await trx
      .updateTable('webhooks')
      .set({ enabled: false, disabled_at: new Date(now), disabled_reason: reason })
      .where('id', '=', delivery.webhook_id)
      .where('enabled', '=', true)
      .returning('id')
      .executeTakeFirst();
    if (disabled)
      await audit(
        trx,
        { type: 'system', id: null },
        {
          orgId: delivery.org_id,
          action: 'webhook.disabled',
          resourceType: 'webhook',
          resourceId: delivery.webhook_id,
          details: { url: delivery.url, delivery_id: delivery.id, attempts, last_status: failure.status, reason },
        },
      );
    return 'disabled';
  });
}

export interface DeliveryRecord {
  id: string;
  webhook_id: string;
  event_id: string;
  event: string;
  state: DeliveryState;
  attempts: number;
  next_attempt_at: Date;
  last_status: number | null;
  last_error: string | null;
  delivered_at: Date | null;
  created_at: Date;
  payload: Record<string, unknown>;
}

/** One page of a webhook's delivery log, newest first, with the total. */
export async function listDeliveries(
  db: Db,
  webhookId: string,
  options: { state?: DeliveryState; limit: number; offset: number },
): Promise<{ items: DeliveryRecord[]; total: number }> {
  let q = db.selectFrom('webhook_deliveries').where('webhook_id', '=', webhookId);
  if (options.state) q = q.where('state', '=', options.state);
  const [items, count] = await Promise.all([
    q
      .select([
        'id',
        'webhook_id',
        'event_id',
        'event',
        'state',
        'attempts',
        'next_attempt_at',
        'last_status',
        'last_error',
        'delivered_at',
        'created_at',
        'payload',
      ])
      .orderBy('created_at', 'desc')
      .orderBy('id')
      .limit(options.limit)
      .offset(options.offset)
      .execute(),
    q.select((eb) => eb.fn.countAll<string>().as('n')).executeTakeFirstOrThrow(),
  ]);
  return { items, total: Number(count.n) };
}
