// The operator REST API from the browser: the JWT lives in sessionStorage (gone when the tab
// closes), every call sends it as a bearer, and errors carry the server's code and message.

const TOKEN_KEY = 'fleethub.token';
const EXPIRES_KEY = 'fleethub.expires_at';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The stored JWT, or null when absent or expired. */
export function token() {
  const value = sessionStorage.getItem(TOKEN_KEY);
  const expires = Date.parse(sessionStorage.getItem(EXPIRES_KEY) ?? '');
  if (!value || !(expires > Date.now())) return null;
  return value;
}

export async function login(email, password) {
  const body = await request('POST', '/auth/login', { email, password }, { anonymous: true });
  sessionStorage.setItem(TOKEN_KEY, body.token);
  sessionStorage.setItem(EXPIRES_KEY, body.expires_at);
  return body;
}

/** Forgets the token in this tab (the server already refused it, or signOut ended it). */
export function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(EXPIRES_KEY);
}

/** Signing out ends the session on the server (its token stops working everywhere at once), then forgets it. */
export async function signOut() {
  const value = token();
  logout();
  if (!value) return;
  try {
    await fetch('/api/v1/auth/session', { method: 'DELETE', headers: { authorization: `Bearer ${value}` } });
  } catch {
    // Offline: the token is forgotten here and expires on its own.
  }
}

/** Called when the server refuses the token (expired, revoked): the app shows the login form. */
let onUnauthorized = () => {};
export function whenUnauthorized(fn) {
  onUnauthorized = fn;
}

/** `request('GET', '/orgs')` → parsed JSON of `/api/v1/orgs`; throws ApiError on a non-2xx answer. */
export async function request(method, path, body, { anonymous = false } = {}) {
  const headers = {};
  if (!anonymous) headers.authorization = `Bearer ${token()}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(`/api/v1${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let json;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    json = undefined;
  }
  if (!res.ok) {
    const error = json?.error ?? {};
    // The server says why (session expired, revoked, invalid token); the sign-in form shows it.
    if (res.status === 401 && !anonymous) onUnauthorized(error.message);
    throw new ApiError(res.status, error.code ?? 'http_error', error.message ?? `the server answered ${res.status}`);
  }
  return json;
}

/** `/orgs/<org>` + path, with the path segments encoded. */
export function orgPath(orgId, ...segments) {
  return `/orgs/${encodeURIComponent(orgId)}${segments.map((s) => `/${encodeURIComponent(s)}`).join('')}`;
}

/** A query string from an object, skipping empty values. */
export function query(params) {
  const qs = new URLSearchParams();
  for (const [key, value] of Object.entries(params))
    if (value !== undefined && value !== null && value !== '') qs.set(key, String(value));
  const text = qs.toString();
  return text ? `?${text}` : '';
}

/** Paths of the OpenAPI document, to find routes this server offers (e.g. device approval). */
let openapi;
export async function apiPaths() {
  openapi ??= fetch('/api/docs/json')
    .then((res) => (res.ok ? res.json() : { paths: {} }))
    .catch(() => ({ paths: {} }));
  return (await openapi).paths ?? {};
}
