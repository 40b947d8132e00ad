/** Resolving what a path names, for the operator API and the edges' REST routes alike. */
import type { Device } from '../db/schema.ts';
import { getDevice, getOrg, isUuid, listDevices, type FleetContext, type Org } from '../fleet/index.ts';
import { canAccessOrg, type OperatorPrincipal } from './auth.ts';
import { ApiError } from './errors.ts';

/**
 * The org a path's `:org` (id or name) names, when the principal may see it. Unknown orgs and
 * other orgs answer the same 404 so a scoped token cannot probe which orgs exist.
 */
export async function resolveOrg(fleet: FleetContext, principal: OperatorPrincipal, ref: string): Promise<Org> {
  const notFound = () =>
    new ApiError(404, 'not_found', `organization ${JSON.stringify(ref)} not found; list yours with GET /api/v1/orgs`);
  let org: Org;
  try {
    org = await getOrg(fleet, ref);
  } catch (err) {
    if (
      (err as { name?: string; code?: string }).name === 'FleetError' &&
      (err as { code?: string }).code === 'not_found'
    )
      throw notFound();
    throw err;
  }
  if (!canAccessOrg(principal, org.id)) throw notFound();
  return org;
}

/**
 * A device of `orgId` by id or by identifier (serial). Identifiers are unique per product, so an
 * identifier shared by two products is ambiguous (409: use the id).
 */
export async function resolveDevice(fleet: FleetContext, orgId: string, ref: string): Promise<Device> {
  if (isUuid(ref)) return getDevice(fleet, orgId, ref);
  const page = await listDevices(fleet, { orgId, q: ref, limit: 1000 });
  const matches = page.items.filter((d) => d.identifier === ref);
  if (matches.length === 0) throw new ApiError(404, 'not_found', `device ${JSON.stringify(ref)} not found`);
  if (matches.length > 1)
    throw new ApiError(
      409,
      'conflict',
      `${matches.length} devices of different products are called ${JSON.stringify(ref)}; use the device id`,
      { ids: matches.map((d) => d.id) },
    );
  return matches[0]!;
}
