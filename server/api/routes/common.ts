/** Helpers the route modules share: snake_case bodies (resolving `:org` and devices: server/http/resolve.ts). */

/** Converts a camelCase record (identity layer) to the API's snake_case keys. */
export function snakeKeys<T extends object>(record: T): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(record)) out[key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)] = value;
  return out;
}
