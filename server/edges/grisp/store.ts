/** GRiSP persistence: board state from system_info, device logs, linking tokens. */
import { createHash, randomBytes } from 'node:crypto';
import { sql, type ColumnType, type Generated } from 'kysely';
import { audit, type Actor } from '../../audit.ts';
import type { Db } from '../../db/index.ts';
import { deviceById } from '../../fleet/devices.ts';

declare module '../../db/schema.ts' {
  interface Database {
    grisp_devices: GrispDevicesTable;
    grisp_log_events: GrispLogEventsTable;
    grisp_link_tokens: GrispLinkTokensTable;
  }
}

type Json<T> = ColumnType<T, string | undefined, string>;

export interface GrispDevicesTable {
  device_id: string;
  serial: string | null;
  hardware_serial: string | null;
  relname: string | null;
  relvsn: string | null;
  update_status: string | null;
  update_message: string | null;
  action_required: string | null;
  system_info: Json<Record<string, unknown>>;
  linked_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  linked_by: string | null;
  log_seq: ColumnType<string | number | null, number | null | undefined, number | null>;
  log_dropped: ColumnType<string | number, number | undefined, number>;
  updated_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

export interface GrispLogEventsTable {
  id: Generated<string>;
  device_id: string;
  /** null: an event the board made up, not one of its log (the `log_drop` event after its buffer overflowed). */
  seq: ColumnType<string | number | null, number | null, number | null>;
  time_us: ColumnType<string | number | null, number | null, number | null>;
  level: string | null;
  msg: Json<unknown>;
  meta: Json<Record<string, unknown>>;
  received_at: ColumnType<Date, Date | string | undefined, never>;
}

export interface GrispLinkTokensTable {
  id: Generated<string>;
  org_id: string;
  token_hash: string;
  created_by: string | null;
  expires_at: ColumnType<Date, Date | string, Date | string>;
  used_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  used_by_device: string | null;
  created_at: ColumnType<Date, Date | string | undefined, never>;
}

/** What `get system_info` answered, as stored. */
export interface SystemInfoPatch {
  serial?: string | null;
  hardware_serial?: string | null;
  relname?: string | null;
  relvsn?: string | null;
  update_status?: string | null;
  update_message?: string | null;
  action_required?: string | null;
  system_info?: Record<string, unknown>;
}

/** Creates or updates the board's row. */
export async function saveGrispState(db: Db, deviceId: string, patch: SystemInfoPatch): Promise<void> {
  const values = {
    ...patch,
    ...(patch.system_info ? { system_info: JSON.stringify(patch.system_info) } : {}),
  } as Record<string, unknown>;
  await db
    .insertInto('grisp_devices')
    .values({ device_id: deviceId, ...values })
    .onConflict((oc) => oc.column('device_id').doUpdateSet({ ...values, updated_at: sql`now()` }))
    .execute();
}

export async function getGrispState(db: Db, deviceId: string) {
  return db.selectFrom('grisp_devices').selectAll().where('device_id', '=', deviceId).executeTakeFirst();
}

/**
 * One event of a `log.get` result: `[seq, {meta, msg, level}]`. After its buffer overflowed the
 * board puts a made-up event first, `[null, {level: "warning", msg: {event: "log_drop", count}}]`.
 */
export interface LogEventInput {
  seq: number | null;
  time_us: number | null;
  level: string | null;
  msg: unknown;
  meta: Record<string, unknown>;
}

export interface LogBatch {
  /** Events without a seq (the board's `log_drop` event) first, then by seq. */
  events: LogEventInput[];
  /** How many events the board dropped since the last `log.sync` acknowledged its count. */
  dropped: number;
  /** The highest seq in the batch: what `log.sync` acknowledges (undefined: none). */
  lastSeq: number | undefined;
}

/** Validates a `log.get` result; returns the batch, or a reason. */
export function parseLogBatch(result: unknown): LogBatch | { error: string } {
  if (typeof result !== 'object' || result === null) return { error: 'log.get result is not an object' };
  const r = result as { events?: unknown; dropped?: unknown };
  if (!Array.isArray(r.events)) return { error: 'log.get result has no events list' };
  const dropped = Number.isSafeInteger(r.dropped) && (r.dropped as number) >= 0 ? (r.dropped as number) : 0;
  const events: LogEventInput[] = [];
  for (const e of r.events) {
    if (
      !Array.isArray(e) ||
      e.length !== 2 ||
      !(e[0] === null || (Number.isSafeInteger(e[0]) && e[0] >= 0)) ||
      typeof e[1] !== 'object' ||
      e[1] === null
    )
      return { error: 'a log event is not [seq, {meta, msg, level}] (seq a non-negative integer or null)' };
    const body = e[1] as { meta?: unknown; msg?: unknown; level?: unknown };
    const meta = typeof body.meta === 'object' && body.meta !== null ? (body.meta as Record<string, unknown>) : {};
    const time = (meta as { time?: unknown }).time;
    events.push({
      seq: e[0] as number | null,
      time_us: Number.isSafeInteger(time) ? (time as number) : null,
      level: typeof body.level === 'string' ? body.level : null,
      msg: body.msg ?? null,
      meta,
    });
  }
  events.sort((a, b) => (a.seq ?? -1) - (b.seq ?? -1));
  const last = events[events.length - 1]?.seq;
  return { events, dropped, lastSeq: last ?? undefined };
}

/** Stores a batch of log events, the acknowledged position and the dropped count, in one transaction. */
export async function storeLogBatch(db: Db, deviceId: string, batch: LogBatch): Promise<void> {
  const { events, dropped, lastSeq } = batch;
  await db.transaction().execute(async (trx) => {
    if (events.length) {
      await trx
        .insertInto('grisp_log_events')
        .values(
          events.map((e) => ({
            device_id: deviceId,
            seq: e.seq,
            time_us: e.time_us,
            level: e.level,
            msg: JSON.stringify(e.msg),
            meta: JSON.stringify(e.meta),
          })),
        )
        .execute();
    }
    await trx
      .insertInto('grisp_devices')
      .values({ device_id: deviceId, log_seq: lastSeq ?? null, log_dropped: dropped })
      .onConflict((oc) =>
        oc.column('device_id').doUpdateSet({
          ...(lastSeq !== undefined ? { log_seq: lastSeq } : {}),
          log_dropped: sql`grisp_devices.log_dropped + ${dropped}`,
          updated_at: sql`now()`,
        }),
      )
      .execute();
  });
}

export interface StoredLogEvent {
  id: string;
  /** null for the board's `log_drop` event. */
  seq: number | null;
  time: string | null;
  level: string | null;
  msg: unknown;
  meta: Record<string, unknown>;
  received_at: string;
}

/** A device's stored log events, newest first (`before`: only ids below it, for paging). */
export async function listLogEvents(
  db: Db,
  deviceId: string,
  o: { limit: number; before?: string; level?: string },
): Promise<StoredLogEvent[]> {
  let q = db.selectFrom('grisp_log_events').selectAll().where('device_id', '=', deviceId);
  if (o.before && /^\d+$/.test(o.before)) q = q.where('id', '<', o.before);
  if (o.level) q = q.where('level', '=', o.level);
  const rows = await q.orderBy('id', 'desc').limit(o.limit).execute();
  return rows.map((r) => ({
    id: String(r.id),
    seq: r.seq === null ? null : Number(r.seq),
    time: r.time_us === null ? null : new Date(Number(r.time_us) / 1000).toISOString(),
    level: r.level,
    msg: r.msg,
    meta: r.meta,
    received_at: r.received_at.toISOString(),
  }));
}

// --- device linking ----------------------------------------------------------------------------

/** Linking errors a device can get (the GRiSP protocol's custom codes; docs/edges/grisp.md). */
export const LinkErrors = {
  notLinked: { code: -1, message: 'device not linked' },
  expired: { code: -2, message: 'token expired' },
  alreadyLinked: { code: -3, message: 'device already linked' },
  invalid: { code: -4, message: 'invalid token' },
} as const;

const TOKEN_PATTERN = /^glt_[A-Za-z0-9_-]{43}$/;

function tokenHash(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

/** An operator creates a single-use linking token for their org (shown once). */
export async function createLinkToken(
  db: Db,
  actor: Actor,
  orgId: string,
  ttlSeconds: number,
): Promise<{ id: string; token: string; expires_at: Date }> {
  const token = `glt_${randomBytes(32).toString('base64url')}`;
  const expiresAt = new Date(Date.now() + ttlSeconds * 1000);
  return db.transaction().execute(async (trx) => {
    const row = await trx
      .insertInto('grisp_link_tokens')
      .values({
        org_id: orgId,
        token_hash: tokenHash(token),
        created_by: `${actor.type}:${actor.id ?? ''}`,
        expires_at: expiresAt,
      })
      .returning(['id', 'expires_at'])
      .executeTakeFirstOrThrow();
    await audit(trx, actor, {
      orgId,
      action: 'grisp.link_token.create',
      resourceType: 'grisp_link_token',
      resourceId: row.id,
      details: { expires_at: expiresAt.toISOString() },
    });
    return { id: row.id, token, expires_at: row.expires_at };
  });
}

export type LinkOutcome = { ok: true } | { ok: false; error: { code: number; message: string } };

/**
 * `post device_linking_token {token}`: links the board to the org that issued the token.
 * -4 malformed/unknown/used/other org, -2 expired, -3 board already linked, -1 board not approved.
 */
export async function linkDevice(
  db: Db,
  device: { deviceId: string; orgId: string },
  token: unknown,
): Promise<LinkOutcome> {
  if (typeof token !== 'string' || !TOKEN_PATTERN.test(token)) return { ok: false, error: LinkErrors.invalid };
  return db.transaction().execute(async (trx) => {
    const row = await trx
      .selectFrom('grisp_link_tokens')
      .selectAll()
      .where('token_hash', '=', tokenHash(token))
      .forUpdate()
      .executeTakeFirst();
    if (!row || row.org_id !== device.orgId || row.used_at) return { ok: false as const, error: LinkErrors.invalid };
    if (row.expires_at.getTime() <= Date.now()) return { ok: false as const, error: LinkErrors.expired };
    // Read now, not from the connection: an operator may have changed it since the board connected.
    const approval = (await deviceById(trx, device.deviceId))?.approval;
    if (approval !== 'approved') return { ok: false as const, error: LinkErrors.notLinked };
    const state = await trx
      .selectFrom('grisp_devices')
      .select('linked_at')
      .where('device_id', '=', device.deviceId)
      .forUpdate()
      .executeTakeFirst();
    if (state?.linked_at) return { ok: false as const, error: LinkErrors.alreadyLinked };
    await trx
      .updateTable('grisp_link_tokens')
      .set({ used_at: new Date(), used_by_device: device.deviceId })
      .where('id', '=', row.id)
      .execute();
    await trx
      .insertInto('grisp_devices')
      .values({ device_id: device.deviceId, linked_at: new Date(), linked_by: row.created_by })
      .onConflict((oc) =>
        oc
          .column('device_id')
          .doUpdateSet({ linked_at: new Date(), linked_by: row.created_by, updated_at: sql`now()` }),
      )
      .execute();
    await audit(
      trx,
      { type: 'device', id: device.deviceId },
      {
        orgId: device.orgId,
        action: 'grisp.linked',
        resourceType: 'device',
        resourceId: device.deviceId,
        details: { token_id: row.id },
      },
    );
    return { ok: true as const };
  });
}

/** An operator unlinks a board (it may link again with a new token). */
export async function unlinkDevice(db: Db, actor: Actor, orgId: string, deviceId: string): Promise<boolean> {
  return db.transaction().execute(async (trx) => {
    const row = await trx
      .updateTable('grisp_devices')
      .set({ linked_at: null, linked_by: null })
      .where('device_id', '=', deviceId)
      .where('linked_at', 'is not', null)
      .returning('device_id')
      .executeTakeFirst();
    if (row) await audit(trx, actor, { orgId, action: 'grisp.unlinked', resourceType: 'device', resourceId: deviceId });
    return row !== undefined;
  });
}

export async function isLinked(db: Db, deviceId: string): Promise<boolean> {
  const row = await db
    .selectFrom('grisp_devices')
    .select('linked_at')
    .where('device_id', '=', deviceId)
    .executeTakeFirst();
  return Boolean(row?.linked_at);
}
