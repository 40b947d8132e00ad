type Fetch = (
  url: string,
  init: { method: string; headers: Record<string, string>; body?: string },
) => Promise<{ ok: boolean; status: number; text(): Promise<string> }>;

export type ApiCall = <T = unknown>(method: string, url: string, body?: unknown) => Promise<T>;

/**
 * Calls the operator API under `base` with a bearer `token`: JSON in and out; throws on a non-2xx
 * answer with the server's error (`METHOD url → status body`).
 */
export function apiCaller(base: string, token: string, fetchFn: Fetch = globalThis.fetch): ApiCall {
  return async <T>(method: string, url: string, body?: unknown): Promise<T> => {
    const res = await fetchFn(`${base}${url}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${url} → ${res.status} ${text}`);
    return (text ? JSON.parse(text) : undefined) as T;
  };
}
