/** Helpers the route modules share: resolving `:org` for a principal, snake_case bodies. */
import { getOrg, type Org, type FleetContext } from '../../fleet/index.ts';
import { canAccessOrg, type OperatorPrincipal } from '../auth.ts';
import { ApiError } from '../errors.ts';

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

/** Converts a camelCase record (identity layer) to the API's snake_case keys. */
export function snakeKeys<T extends object>(record: T): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(record)) out[key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)] = value;
  return out;
}
