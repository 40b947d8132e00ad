import { createHash, randomUUID } from 'node:crypto';
import pino from 'pino';
import type { Db } from '../../server/db/index.ts';
import * as fleet from '../../server/fleet/index.ts';
import type { Actor, FleetContext, FleetEvent } from '../../server/fleet/index.ts';

export const OPERATOR: Actor = { type: 'operator', id: 'op-1' };

/** A fleet context over `db` whose bus records every published event. */
export function recordingContext(db: Db, nodeName = 'node-a'): FleetContext & { events: FleetEvent[] } {
  const events: FleetEvent[] = [];
  return {
    db,
    nodeName,
    log: pino({ level: 'silent' }),
    events,
    bus: {
      async publish(topic, event, payload) {
        events.push({ topic, event, payload });
      },
    },
    firmwareUrl: (f) => `https://fleethub.test/firmware/${f.id}?sig=test`,
  };
}

let counter = 0;
/** A unique name for this run. */
export function uniq(prefix: string): string {
  counter += 1;
  return `${prefix}-${counter}-${randomUUID().slice(0, 6)}`;
}

export interface Tenant {
  org: fleet.Org;
  product: fleet.Product;
}

export async function tenant(ctx: FleetContext, opts: { requiresSignature?: boolean } = {}): Promise<Tenant> {
  const org = await fleet.createOrg(ctx, OPERATOR, { name: uniq('org') });
  const product = await fleet.createProduct(ctx, OPERATOR, {
    orgId: org.id,
    name: uniq('prod'),
    requiresSignature: opts.requiresSignature,
  });
  return { org, product };
}

export async function firmware(
  ctx: FleetContext,
  t: Tenant,
  version: string,
  extra: Partial<fleet.CreateFirmwareInput> = {},
): Promise<fleet.Firmware> {
  return fleet.createFirmware(ctx, OPERATOR, {
    orgId: t.org.id,
    productId: t.product.id,
    version,
    platform: 'rpi4',
    architecture: 'arm',
    sha256: createHash('sha256').update(version).digest('hex'),
    size: 1024,
    hasBlob: true,
    ...extra,
  });
}

export async function devices(ctx: FleetContext, t: Tenant, n: number): Promise<fleet.Device[]> {
  const out: fleet.Device[] = [];
  for (let i = 0; i < n; i++)
    out.push(
      await fleet.createDevice(ctx, OPERATOR, { orgId: t.org.id, productId: t.product.id, identifier: uniq('dev') }),
    );
  return out;
}

export function ref(d: fleet.Device): fleet.ConnectedDevice {
  return { deviceId: d.id, orgId: d.org_id, productId: d.product_id };
}
