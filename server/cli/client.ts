/**
 * What every operator CLI command shares: where the server is and which token to use
 * (`--url`/`--token`, then FLEETHUB_URL/FLEETHUB_TOKEN, then the login saved by `fleethub login`
 * in ~/.config/fleethub/credentials.json, mode 0600), an HTTP client that turns the API's
 * `{error: {code, message}}` into `CliError`, and table / `--json` output. Profiles keep one saved
 * login per server (`--profile`, FLEETHUB_PROFILE; docs/cli.md).
 */
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { CliError, type CliIo } from '../../shared/cli.ts';

export { CliError, type CliIo, processIo, runCommand } from '../../shared/cli.ts';
import { createFleethubClient, data, FleethubApiError, type FleethubClient } from '../../client/index.ts';

export const DEFAULT_URL = 'http://127.0.0.1:4000';

// ---------------------------------------------------------------------------------------------
// Saved credentials and profiles

export interface SavedCredentials {
  url: string;
  token: string;
  email?: string;
  expiresAt?: string;
  /** The user's org (org-scoped users): the default `--org`. */
  org?: string;
}

/** The config file: one saved login per profile (docs/cli.md). */
export interface CredentialsFile {
  profiles: Record<string, SavedCredentials>;
}

export const DEFAULT_PROFILE = 'default';

/** `$XDG_CONFIG_HOME/fleethub/credentials.json`, default `~/.config/fleethub/credentials.json`. */
export function credentialsPath(env: NodeJS.ProcessEnv = process.env): string {
  const base = env.XDG_CONFIG_HOME || path.join(env.HOME || os.homedir(), '.config');
  return path.join(base, 'fleethub', 'credentials.json');
}

/** The profile a command uses: `--profile`, then FLEETHUB_PROFILE, then `default`. */
export function profileName(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): string {
  const name = flag || env.FLEETHUB_PROFILE || DEFAULT_PROFILE;
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name))
    throw new CliError(`profile names are letters, digits, '.', '_' and '-' (got ${JSON.stringify(name)})`, 2);
  return name;
}

function isCredentials(value: unknown): value is SavedCredentials {
  const v = value as Partial<SavedCredentials> | null;
  return typeof v?.url === 'string' && typeof v.token === 'string';
}

/** Reads the config file; the single-login format of earlier versions reads as profile `default`. */
export function readCredentialsFile(env: NodeJS.ProcessEnv = process.env): CredentialsFile {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(credentialsPath(env), 'utf8'));
  } catch {
    return { profiles: {} }; // no saved login (or an unreadable one): flags and environment only
  }
  if (isCredentials(parsed)) return { profiles: { [DEFAULT_PROFILE]: parsed } };
  const profiles: Record<string, SavedCredentials> = {};
  const raw = (parsed as { profiles?: unknown } | null)?.profiles;
  if (raw && typeof raw === 'object')
    for (const [name, value] of Object.entries(raw)) if (isCredentials(value)) profiles[name] = value;
  return { profiles };
}

export function loadCredentials(
  env: NodeJS.ProcessEnv = process.env,
  profile = profileName(undefined, env),
): SavedCredentials | undefined {
  return readCredentialsFile(env).profiles[profile];
}

/** Saves (or with `undefined`, forgets) one profile's login, readable only by its owner (0600 in 0700). */
export function saveCredentials(
  credentials: SavedCredentials | undefined,
  env: NodeJS.ProcessEnv = process.env,
  profile = profileName(undefined, env),
): string {
  const file = credentialsPath(env);
  const content = readCredentialsFile(env);
  if (credentials) content.profiles[profile] = credentials;
  else delete content.profiles[profile];
  mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
  writeFileSync(file, `${JSON.stringify(content, null, 2)}\n`, { mode: 0o600 });
  chmodSync(file, 0o600); // an existing file keeps its old mode on write
  return file;
}

// ---------------------------------------------------------------------------------------------
// HTTP client

export interface ClientOptions {
  url: string;
  token?: string;
  /** The profile whose saved login gave the token, if one did. */
  profile?: string;
  /** When the saved login expires (to tell an expired login from a refused token). */
  expiresAt?: string;
}

/** Resolves server URL and token: flags, then environment, then the profile's saved login. */
export function resolveClientOptions(
  flags: { url?: string; token?: string; profile?: string },
  env: NodeJS.ProcessEnv = process.env,
): ClientOptions {
  const profile = profileName(flags.profile, env);
  const saved = loadCredentials(env, profile);
  const url = (flags.url || env.FLEETHUB_URL || saved?.url || DEFAULT_URL).replace(/\/+$/, '');
  const explicit = flags.token || env.FLEETHUB_TOKEN;
  if (explicit) return { url, token: explicit };
  // A saved token belongs to the server it was issued by.
  if (saved && saved.url.replace(/\/+$/, '') === url)
    return { url, token: saved.token, profile, expiresAt: saved.expiresAt };
  return { url, profile };
}

/** `fleethub login` with the flags that select this profile (for hints). */
export function loginHint(options: ClientOptions): string {
  const profile = options.profile && options.profile !== DEFAULT_PROFILE ? ` --profile ${options.profile}` : '';
  return `fleethub login --url ${options.url}${profile}`;
}

/**
 * The message for a 401: the server's, and what to do. Without a token: log in. An expired
 * session (the server's `details.reason`, or a saved login past its expiry) says so; otherwise the
 * server's reason (revoked, logged out, ...).
 */
export function unauthorizedMessage(
  options: ClientOptions,
  serverMessage: string | undefined,
  details?: unknown,
): string {
  const reason = serverMessage ?? 'unauthorized';
  const login = `run \`${loginHint(options)}\``;
  if (!options.token) return `${reason}\nnot logged in: ${login} or pass --token / set FLEETHUB_TOKEN`;
  const code = (details as { reason?: unknown } | undefined)?.reason;
  const savedExpired = options.expiresAt !== undefined && Date.parse(options.expiresAt) <= Date.now();
  if (code === 'session_expired' || (savedExpired && code === undefined))
    return `your login session on ${options.url} expired${options.expiresAt ? ` at ${options.expiresAt}` : ''}: ${login}`;
  if (options.profile) return `${reason}\n${login}`;
  return reason;
}

/** A thin JSON client for `/api/v1`; non-2xx answers throw `CliError` with the server's message. */
export class ApiClient {
  /** `anonymous`: requests meant to work without a token (login), whose 401 is the server's word only. */
  constructor(
    readonly options: ClientOptions,
    readonly anonymous = false,
  ) {}

  get<T>(pathname: string, query?: Record<string, string | number | boolean | undefined>): Promise<T> {
    return this.request<T>('GET', withQuery(pathname, query));
  }
  post<T>(pathname: string, body?: unknown): Promise<T> {
    return this.request<T>('POST', pathname, body);
  }
  put<T>(pathname: string, body?: unknown): Promise<T> {
    return this.request<T>('PUT', pathname, body);
  }
  patch<T>(pathname: string, body?: unknown): Promise<T> {
    return this.request<T>('PATCH', pathname, body);
  }
  delete<T>(pathname: string, body?: unknown): Promise<T> {
    return this.request<T>('DELETE', pathname, body);
  }

  /** Sends one request; `body` is JSON unless it is a Buffer/stream (`contentType` then says what). */
  async request<T>(method: string, pathname: string, body?: unknown, contentType?: string): Promise<T> {
    const headers: Record<string, string> = { accept: 'application/json' };
    if (this.options.token) headers.authorization = `Bearer ${this.options.token}`;
    let payload: BodyInit | undefined;
    const init: RequestInit & { duplex?: 'half' } = { method, headers };
    if (body !== undefined) {
      if (contentType) {
        headers['content-type'] = contentType;
        payload = body as BodyInit;
        if (typeof (body as { pipe?: unknown }).pipe === 'function' || body instanceof ReadableStream)
          init.duplex = 'half';
      } else {
        headers['content-type'] = 'application/json';
        payload = JSON.stringify(body);
      }
      init.body = payload;
    }
    let response: Response;
    try {
      response = await fetch(this.options.url + pathname, init);
    } catch (err) {
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      throw new CliError(
        `cannot reach ${this.options.url} (${cause?.code ?? cause?.message ?? (err as Error).message}); check --url or FLEETHUB_URL`,
      );
    }
    const text = await response.text();
    let parsed: unknown;
    if (text) {
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = text;
      }
    }
    if (!response.ok) {
      const error = (parsed as { error?: { code?: string; message?: string; details?: unknown } } | undefined)?.error;
      // A refused login (no token sent) keeps the server's reason: "wrong email or password".
      const message =
        response.status === 401 && !this.anonymous
          ? unauthorizedMessage(this.options, error?.message, error?.details)
          : (error?.message ?? `${response.status} ${response.statusText}`);
      throw new CliError(message, 1, response.status, error?.code, error?.details);
    }
    return parsed as T;
  }
}

function withQuery(pathname: string, query?: Record<string, string | number | boolean | undefined>): string {
  if (!query) return pathname;
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== '') params.set(k, String(v));
  const qs = params.toString();
  return qs ? `${pathname}?${qs}` : pathname;
}

// ---------------------------------------------------------------------------------------------
// Output

export interface Column<T> {
  header: string;
  value: (row: T) => unknown;
}

/** Renders rows as an aligned text table (header, then one line per row). */
export function formatTable<T>(rows: readonly T[], columns: readonly Column<T>[]): string {
  const cells = rows.map((row) => columns.map((c) => formatCell(c.value(row))));
  const widths = columns.map((c, i) => Math.max(c.header.length, ...cells.map((r) => r[i]!.length)));
  const line = (values: string[]) =>
    values
      .map((v, i) => (i === values.length - 1 ? v : v.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return `${[line(columns.map((c) => c.header.toUpperCase())), ...cells.map(line)].join('\n')}\n`;
}

function formatCell(value: unknown): string {
  if (value === null || value === undefined || value === '') return '-';
  if (Array.isArray(value)) return value.length ? value.map(formatCell).join(',') : '-';
  if (value instanceof Date) return value.toISOString();
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

/** Prints `value` as JSON with `--json`, otherwise as a table (or `empty` when there are no rows). */
export function printRows<T>(
  io: CliIo,
  json: boolean | undefined,
  rows: readonly T[],
  columns: readonly Column<T>[],
  empty = '(none)',
): void {
  if (json) {
    printJson(io, rows);
    return;
  }
  io.out(rows.length ? formatTable(rows, columns) : `${empty}\n`);
}

/** Prints one record as `key: value` lines, or JSON with `--json`. */
export function printRecord(io: CliIo, json: boolean | undefined, record: Record<string, unknown>): void {
  if (json) {
    printJson(io, record);
    return;
  }
  const width = Math.max(...Object.keys(record).map((k) => k.length));
  io.out(
    `${Object.entries(record)
      .map(([k, v]) => `${k.padEnd(width)}  ${formatCell(v)}`)
      .join('\n')}\n`,
  );
}

export function printJson(io: CliIo, value: unknown): void {
  io.out(`${JSON.stringify(value, null, 2)}\n`);
}

// ---------------------------------------------------------------------------------------------
// Operator command helpers

export interface CommonFlags {
  url?: string;
  token?: string;
  profile?: string;
  org?: string;
  json?: boolean;
}

/** The API client for a command's flags (then environment, then the saved login). */
export function clientFor(flags: CommonFlags, io: CliIo): ApiClient {
  return new ApiClient(resolveClientOptions(flags, io.env));
}

/** The org a command works on: `--org`, FLEETHUB_ORG, the saved login's org, or the only org visible. */
export async function orgOf(client: ApiClient, flags: CommonFlags, io: CliIo): Promise<string> {
  const saved = client.options.profile ? loadCredentials(io.env, client.options.profile) : undefined;
  const explicit = flags.org || io.env.FLEETHUB_ORG || saved?.org;
  if (explicit) return explicit;
  const { items } = await client.get<{ items: { id: string; name: string }[] }>('/api/v1/orgs');
  if (items.length === 1) return items[0]!.name;
  throw new CliError(
    items.length === 0
      ? 'no organization is visible to you; create one with `fleethub orgs create <name>`'
      : `you can see ${items.length} organizations; pass --org <name> (or set FLEETHUB_ORG)`,
    2,
  );
}

export function orgPath(org: string): string {
  return `/api/v1/orgs/${encodeURIComponent(org)}`;
}

/** A usage error (exit 2): a missing argument or a combination of flags the command refuses. */
export function usageError(message: string): CliError {
  return new CliError(message, 2);
}

// ---------------------------------------------------------------------------------------------
// The generated client (fleethub/client): typed from the OpenAPI document

/** The typed API client for a command's flags (then environment, then the saved login). */
export function apiFor(flags: CommonFlags, io: CliIo): FleethubClient {
  return createFleethubClient(resolveClientOptions(flags, io.env));
}

/** The typed client, the options it was made from, and the org a command's flags name. */
export async function orgApi(
  flags: CommonFlags,
  io: CliIo,
): Promise<{ options: ClientOptions; api: FleethubClient; org: string }> {
  const options = resolveClientOptions(flags, io.env);
  return { options, api: createFleethubClient(options), org: await orgOf(new ApiClient(options), flags, io) };
}

/**
 * The data of a typed client call; an error answer or an unreachable server becomes a
 * `CliError` with the server's message.
 */
export async function call<T>(
  request: Promise<{ data?: T; error?: unknown; response: Response }>,
  options: ClientOptions,
): Promise<Exclude<T, undefined>> {
  try {
    return await data(request);
  } catch (err) {
    if (err instanceof FleethubApiError) {
      const message = err.status === 401 ? unauthorizedMessage(options, err.message, err.details) : err.message;
      throw new CliError(message, 1, err.status, err.code, err.details);
    }
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    throw new CliError(
      `cannot reach ${options.url} (${cause?.code ?? cause?.message ?? (err as Error).message}); check --url or FLEETHUB_URL`,
    );
  }
}
