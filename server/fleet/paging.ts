/** Paged lists: the bounds a caller may ask for and the page every list answers. */
import { FleetError } from './errors.ts';

/** One page of a list, with the total the filter matches. */
export interface Page<T> {
  items: T[];
  total: number;
}

/** Page bounds: limit 1..1000 (default 100), offset ≥ 0. */
export function pageBounds(limit: unknown, offset: unknown): { limit: number; offset: number } {
  const l = limit === undefined ? 100 : Number(limit);
  const o = offset === undefined ? 0 : Number(offset);
  if (!Number.isInteger(l) || l < 1 || l > 1000)
    throw new FleetError('invalid', 'limit must be an integer from 1 to 1000', { field: 'limit' });
  if (!Number.isInteger(o) || o < 0)
    throw new FleetError('invalid', 'offset must be a non-negative integer', { field: 'offset' });
  return { limit: l, offset: o };
}
