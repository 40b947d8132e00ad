/**
 * `fleethub/client`: a typed client of the fleethub operator API, generated from its OpenAPI
 * document (openapi-typescript types in ./schema.ts, requests by openapi-fetch). Every path,
 * parameter, body and answer is typed from the document; nothing here is written by hand but the
 * bearer token and the error that a non-2xx answer becomes.
 *
 *     const api = createFleethubClient({ url: 'http://127.0.0.1:4000', token });
 *     const { items } = await data(api.GET('/api/v1/orgs/{org}/groups', { params: { path: { org: 'default' } } }));
 */
import createClient, { type Client } from 'openapi-fetch';
import type { components, operations, paths } from './schema.ts';

export type { components, operations, paths };
export { streamingFetch } from './streaming-fetch.ts';
export type Schemas = components['schemas'];
export type FleethubClient = Client<paths>;
/** The error body every non-2xx answer carries. */
export type ApiErrorBody = Schemas['ApiErrorBody'];

export interface FleethubClientOptions {
  /** The server, e.g. `http://127.0.0.1:4000` (no `/api/v1`). */
  url: string;
  /** A login JWT or an API token, sent as `Authorization: Bearer <token>`. */
  token?: string;
  /** A fetch to use instead of the global one. */
  fetch?: typeof globalThis.fetch;
}

/** A client for one server; `token` is sent with every request. */
export function createFleethubClient(options: FleethubClientOptions): FleethubClient {
  return createClient<paths>({
    baseUrl: options.url.replace(/\/+$/, ''),
    headers: options.token ? { authorization: `Bearer ${options.token}` } : {},
    ...(options.fetch ? { fetch: options.fetch } : {}),
  });
}

/** A non-2xx answer: its status and the server's `{error: {code, message, details}}`. */
export class FleethubApiError extends Error {
  override readonly name = 'FleethubApiError';
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
  }
}

/**
 * The data of an answer, or a `FleethubApiError` thrown for an error answer:
 * `const group = await data(api.GET(...))`.
 */
export async function data<T>(
  request: Promise<{ data?: T; error?: unknown; response: Response }>,
): Promise<Exclude<T, undefined>> {
  const { data, error, response } = await request;
  if (error !== undefined || !response.ok) {
    const body = (error as Partial<ApiErrorBody> | undefined)?.error;
    throw new FleethubApiError(
      response.status,
      body?.code ?? 'http_error',
      body?.message ?? `${response.status} ${response.statusText}`,
      body?.details,
    );
  }
  return data as Exclude<T, undefined>;
}

/** One page of a list endpoint as openapi-fetch answers it. */
type PageAnswer<T> = Promise<{
  data?: { items: T[]; total?: number };
  error?: unknown;
  response: Response;
}>;

/**
 * The items of a list endpoint from `offset` on (default 0), page after page (at most 1000 a
 * page), all of them or the first `max`, with the list's `total` (the number of items read when
 * the endpoint gives none): `listPages((page) => api.GET(path, { params: { path, query: page } }))`.
 */
export async function listPages<T>(
  fetchPage: (page: { limit: number; offset: number }) => PageAnswer<T>,
  range: { offset?: number; max?: number } = {},
): Promise<{ items: T[]; total: number }> {
  const start = range.offset ?? 0;
  const max = range.max ?? Number.POSITIVE_INFINITY;
  const items: T[] = [];
  let total: number | undefined;
  while (items.length < max) {
    const limit = Math.min(1000, max - items.length);
    const page = await data(fetchPage({ limit, offset: start + items.length }));
    items.push(...page.items);
    total = page.total;
    if (page.items.length < limit || (total !== undefined && start + items.length >= total)) break;
  }
  return { items, total: total ?? start + items.length };
}

/**
 * Every item of a list endpoint, page after page (`limit` 1000): `listAll((page) => api.GET(path,
 * { params: { path, query: { ...page } } }))`.
 */
export async function listAll<T>(fetchPage: (page: { limit: number; offset: number }) => PageAnswer<T>): Promise<T[]> {
  return (await listPages(fetchPage)).items;
}
