import { sql, type ColumnType } from 'kysely';
import { inTransaction, Topics, type FleetContext } from './context.ts';

export interface NodesTable {
  name: string;
  started_at: ColumnType<Date, Date | string | undefined, never>;
  heartbeat_at: ColumnType<Date, Date | string | undefined, Date | string>;
}

declare module '../db/schema.ts' {
  interface Database {
    nodes: NodesTable;
  }
}

/** Records that this node is alive (call at boot and then periodically, well inside `staleAfterMs`). */
export async function markNodeAlive(ctx: FleetContext): Promise<void> {
  await ctx.db
    .insertInto('nodes')
    .values({ name: ctx.nodeName })
    .onConflict((oc) => oc.column('name').doUpdateSet({ heartbeat_at: sql`now()` }))
    .execute();
}

/** Removes this node on a clean shutdown, after its devices were marked offline. */
export async function removeNode(ctx: FleetContext): Promise<void> {
  await ctx.db.deleteFrom('nodes').where('name', '=', ctx.nodeName).execute();
}

export interface ReconcileOfflineOptions {
  staleAfterMs?: number;
  /** Devices this node name held count as dead too (at boot: what this name held before a crash). */
  ownConnections?: boolean;
  /** No other node can be alive (embedded PGlite belongs to one process): forget every other node now. */
  soleNode?: boolean;
}

/**
 * Marks offline every device whose connection belongs to a node that stopped beating for
 * `staleAfterMs` (or is not known at all), and forgets those nodes. At boot, pass
 * `ownConnections: true` so devices this node name held before a crash are cleared too.
 * Returns how many devices went offline.
 */
export async function reconcileOfflineDevices(
  ctx: FleetContext,
  options: ReconcileOfflineOptions = {},
): Promise<number> {
  const cutoff = new Date(Date.now() - (options.staleAfterMs ?? 90_000));
  return inTransaction(ctx, async (trx, outbox) => {
    let deadNodes = trx.deleteFrom('nodes').where('name', '!=', ctx.nodeName);
    if (!options.soleNode) deadNodes = deadNodes.where('heartbeat_at', '<', cutoff);
    await deadNodes.execute();
    const rows = await trx
      .updateTable('devices')
      .set({ connection_status: 'offline', connected_node: null, updated_at: new Date() })
      .where('connection_status', '=', 'online')
      .where((eb) =>
        eb.or([
          eb('connected_node', 'is', null),
          eb('connected_node', 'not in', eb.selectFrom('nodes').select('name')),
          ...(options.ownConnections ? [eb('connected_node', '=', ctx.nodeName)] : []),
        ]),
      )
      .returning(['id', 'org_id'])
      .execute();
    for (const d of rows)
      outbox.push({
        topic: Topics.operator(d.org_id),
        event: 'device_status',
        payload: { device_id: d.id, status: 'offline' },
      });
    if (rows.length) ctx.log.info({ count: rows.length }, 'devices of dead nodes marked offline');
    return rows.length;
  });
}
