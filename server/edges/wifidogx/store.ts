/** WiFiDogX persistence: reported gateways and device info, operator auth-mode settings, commands. */
import { sql, type ColumnType, type Generated, type Selectable } from 'kysely';
import type { Db } from '../../db/index.ts';

declare module '../../db/schema.ts' {
  interface Database {
    wifidogx_gateways: WifidogxGatewaysTable;
    wifidogx_commands: WifidogxCommandsTable;
  }
}

type Json<T> = ColumnType<T, string | undefined, string>;

export interface WifidogxGatewaysTable {
  device_id: string;
  device_info: Json<Record<string, unknown>>;
  gateways: Json<Array<Record<string, unknown>>>;
  auth_modes: Json<Record<string, number>>;
  firmware_info: ColumnType<Record<string, unknown> | null, string | null | undefined, string | null>;
  last_heartbeat_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  /** SHA-256 (hex) of the gateway's credential (credentials.ts); null until one is issued. */
  credential_hash: ColumnType<string | null, string | null | undefined, string | null>;
  credential_issued_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  updated_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

export type CommandStatus = 'queued' | 'sent' | 'delivered' | 'succeeded' | 'failed' | 'refused';

export interface WifidogxCommandsTable {
  id: Generated<string>;
  org_id: string;
  device_id: string;
  req_id: string;
  type: string;
  payload: Json<Record<string, unknown>>;
  status: CommandStatus;
  response: ColumnType<Record<string, unknown> | null, string | null | undefined, string | null>;
  error: string | null;
  created_by: string | null;
  created_at: ColumnType<Date, Date | string | undefined, never>;
  sent_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  completed_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
}

export type WifidogxCommand = Selectable<WifidogxCommandsTable>;

/** Records what a connect/heartbeat reported. */
export async function saveReport(
  db: Db,
  deviceId: string,
  report: { device_info?: unknown; gateway?: unknown },
  heartbeat: boolean,
): Promise<void> {
  const set = {
    ...(isRecord(report.device_info) ? { device_info: JSON.stringify(report.device_info) } : {}),
    ...(Array.isArray(report.gateway)
      ? { gateways: JSON.stringify(report.gateway.filter(isRecord).slice(0, 64)) }
      : {}),
    ...(heartbeat ? { last_heartbeat_at: new Date() } : {}),
  };
  await db
    .insertInto('wifidogx_gateways')
    .values({ device_id: deviceId, ...set })
    .onConflict((oc) => oc.column('device_id').doUpdateSet({ ...set, updated_at: sql`now()` }))
    .execute();
}

export async function saveFirmwareInfo(db: Db, deviceId: string, info: Record<string, unknown>): Promise<void> {
  await db
    .insertInto('wifidogx_gateways')
    .values({ device_id: deviceId, firmware_info: JSON.stringify(info) })
    .onConflict((oc) =>
      oc.column('device_id').doUpdateSet({ firmware_info: JSON.stringify(info), updated_at: sql`now()` }),
    )
    .execute();
}

/** What the operator sees of a gateway (never its credential hash: only when one was issued). */
export async function getGatewayState(db: Db, deviceId: string) {
  return db
    .selectFrom('wifidogx_gateways')
    .select([
      'device_id',
      'device_info',
      'gateways',
      'auth_modes',
      'firmware_info',
      'last_heartbeat_at',
      'credential_issued_at',
      'updated_at',
    ])
    .where('device_id', '=', deviceId)
    .executeTakeFirst();
}

/** The operator's auth mode for `gwId` (persisted; sent in every connect/heartbeat reply). */
export async function setAuthMode(db: Db, deviceId: string, gwId: string, mode: number): Promise<void> {
  const patch = JSON.stringify({ [gwId]: mode });
  await db
    .insertInto('wifidogx_gateways')
    .values({ device_id: deviceId, auth_modes: patch })
    .onConflict((oc) =>
      oc
        .column('device_id')
        .doUpdateSet({ auth_modes: sql`wifidogx_gateways.auth_modes || ${patch}::jsonb`, updated_at: sql`now()` }),
    )
    .execute();
}

/**
 * The gateway list of a reply: every gateway the device reported (or the operator configured),
 * with the operator's auth mode when set, else the mode the device reported (integers only).
 */
export async function gatewaySettings(
  db: Db,
  deviceId: string,
  reported: unknown,
): Promise<Array<{ gw_id: string; auth_mode: number }>> {
  const row = await db
    .selectFrom('wifidogx_gateways')
    .select(['auth_modes', 'gateways'])
    .where('device_id', '=', deviceId)
    .executeTakeFirst();
  const modes = row?.auth_modes ?? {};
  const list = Array.isArray(reported) ? reported.filter(isRecord) : (row?.gateways ?? []);
  const out = new Map<string, number>();
  for (const gw of list) {
    if (typeof gw.gw_id !== 'string') continue;
    const mode = Number.isInteger(modes[gw.gw_id])
      ? modes[gw.gw_id]!
      : Number.isInteger(gw.auth_mode)
        ? (gw.auth_mode as number)
        : 0;
    out.set(gw.gw_id, mode);
  }
  for (const [gwId, mode] of Object.entries(modes)) if (!out.has(gwId) && Number.isInteger(mode)) out.set(gwId, mode);
  return [...out].map(([gw_id, auth_mode]) => ({ gw_id, auth_mode }));
}

export async function createCommand(
  db: Db,
  c: {
    orgId: string;
    deviceId: string;
    reqId: string;
    type: string;
    payload: Record<string, unknown>;
    createdBy: string | null;
  },
): Promise<WifidogxCommand> {
  return db
    .insertInto('wifidogx_commands')
    .values({
      org_id: c.orgId,
      device_id: c.deviceId,
      req_id: c.reqId,
      type: c.type,
      payload: JSON.stringify(c.payload),
      status: 'queued',
      created_by: c.createdBy,
    })
    .returningAll()
    .executeTakeFirstOrThrow();
}

export async function getCommand(db: Db, id: string): Promise<WifidogxCommand | undefined> {
  return db.selectFrom('wifidogx_commands').selectAll().where('id', '=', id).executeTakeFirst();
}

export async function updateCommand(
  db: Db,
  id: string,
  patch: { status: CommandStatus; response?: Record<string, unknown>; error?: string },
): Promise<void> {
  const final = patch.status !== 'queued' && patch.status !== 'sent';
  await db
    .updateTable('wifidogx_commands')
    .set({
      status: patch.status,
      ...(patch.status === 'sent' || patch.status === 'delivered' ? { sent_at: new Date() } : {}),
      ...(final ? { completed_at: new Date() } : {}),
      ...(patch.response ? { response: JSON.stringify(patch.response) } : {}),
      ...(patch.error ? { error: patch.error } : {}),
    })
    .where('id', '=', id)
    .execute();
}

/** The command a device response answers: by req_id when the device echoes it, else the oldest sent command of that type. */
export async function commandForResponse(
  db: Db,
  deviceId: string,
  type: string,
  reqId: unknown,
): Promise<WifidogxCommand | undefined> {
  let q = db.selectFrom('wifidogx_commands').selectAll().where('device_id', '=', deviceId).where('status', '=', 'sent');
  q = typeof reqId === 'string' && reqId ? q.where('req_id', '=', reqId) : q.where('type', '=', type);
  return q.orderBy('created_at', 'asc').limit(1).executeTakeFirst();
}

export async function listCommands(db: Db, deviceId: string, limit: number): Promise<WifidogxCommand[]> {
  return db
    .selectFrom('wifidogx_commands')
    .selectAll()
    .where('device_id', '=', deviceId)
    .orderBy('created_at', 'desc')
    .limit(limit)
    .execute();
}

export function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
