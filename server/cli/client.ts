/**
 * What every operator CLI command shares: where the server is and which token to use
 * (`--url`/`--token`, then FLEETHUB_URL/FLEETHUB_TOKEN, then the login saved by `fleethub login`
 * in ~/.config/fleethub/credentials.json, mode 0600), an HTTP client that turns the API's
 * `{error: {code, message}}` into `CliError`, argument parsing, and table / `--json` output.
 */
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { createFleethubClient, data, FleethubApiError, type FleethubClient } from 'fleethub/client';

export const DEFAULT_URL = 'http://127.0.0.1:4000';

/** Where a command writes; tests pass buffers, the real CLI passes process streams. */
export interface CliIo {
  out(text: string): void;
  err(text: string): void;
  env: NodeJS.ProcessEnv;
  /** Stops long-running commands (`status --watch`); the real CLI stops on Ctrl-C instead. */
  signal?: AbortSignal;
}

export const processIo: CliIo = {
  out: (text) => void process.stdout.write(text),
  err: (text) => void process.stderr.write(text),
  env: process.env,
};

/** An error a command reports to the user: message on stderr, non-zero exit. */
export class CliError extends Error {
  override readonly name = 'CliError';
  constructor(
    message: string,
    readonly exitCode = 1,
    /** HTTP status and API code when the server refused. */
    readonly status?: number,
    readonly code?: string,
    readonly details?: unknown,
  ) {
    super(message);
  }
}

// ---------------------------------------------------------------------------------------------
// Saved credentials

export interface SavedCredentials {
  url: string;
  token: string;
  email?: string;
  expiresAt?: string;
  /** The user's org (org-scoped users): the default `--org`. */
  org?: string;
}

/** `$XDG_CONFIG_HOME/fleethub/credentials.json`, default `~/.config/fleethub/credentials.json`. */
export function credentialsPath(env: NodeJS.ProcessEnv = process.env): string {
  const base = env.XDG_CONFIG_HOME || path.join(env.HOME || os.homedir(), '.config');
  return path.join(base, 'fleethub', 'credentials.json');
}

export function loadCredentials(env: NodeJS.ProcessEnv = process.env): SavedCredentials | undefined {
  try {
    const parsed = JSON.parse(readFileSync(credentialsPath(env), 'utf8')) as Partial<SavedCredentials>;
    if (typeof parsed.url === 'string' && typeof parsed.token === 'string') return parsed as SavedCredentials;
  } catch {
    // No saved login (or an unreadable one): callers fall back to flags and environment.
  }
  return undefined;
}

/** Saves a login readable only by its owner (0600 file in a 0700 directory). */
export function saveCredentials(credentials: SavedCredentials, env: NodeJS.ProcessEnv = process.env): string {
  const file = credentialsPath(env);
  mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
  writeFileSync(file, `${JSON.stringify(credentials, null, 2)}\n`, { mode: 0o600 });
  chmodSync(file, 0o600); // an existing file keeps its old mode on write
  return file;
}

// ---------------------------------------------------------------------------------------------
// HTTP client

export interface ClientOptions {
  url: string;
  token?: string;
}

/** Resolves server URL and token: flags, then environment, then the saved login. */
export function resolveClientOptions(
  flags: { url?: string; token?: string },
  env: NodeJS.ProcessEnv = process.env,
): ClientOptions {
  const saved = loadCredentials(env);
  const url = flags.url || env.FLEETHUB_URL || saved?.url || DEFAULT_URL;
  // A saved token belongs to the server it was issued by.
  const savedToken = saved && saved.url.replace(/\/+$/, '') === url.replace(/\/+$/, '') ? saved.token : undefined;
  const token = flags.token || env.FLEETHUB_TOKEN || savedToken;
  return { url: url.replace(/\/+$/, ''), token };
}

/** A thin JSON client for `/api/v1`; non-2xx answers throw `CliError` with the server's message. */
export class ApiClient {
  constructor(readonly options: ClientOptions) {}

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
      let message = error?.message ?? `${response.status} ${response.statusText}`;
      if (response.status === 401 && !this.options.token)
        message = 'not logged in: run `fleethub login` or pass --token / set FLEETHUB_TOKEN';
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
// Arguments

/** Options every operator command accepts. */
export const COMMON_OPTIONS = {
  url: { type: 'string' },
  token: { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const satisfies ParseArgsConfig['options'];

/** `node:util` parseArgs with the common options; unknown flags become a CliError naming the fix. */
export function parseCommand<O extends NonNullable<ParseArgsConfig['options']>>(
  argv: string[],
  options: O,
  usage: string,
) {
  try {
    return parseArgs({ args: argv, options: { ...COMMON_OPTIONS, ...options }, allowPositionals: true, strict: true });
  } catch (err) {
    throw new CliError(`${(err as Error).message}\n\n${usage}`, 2);
  }
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
  org?: string;
  json?: boolean;
}

/** The API client for a command's flags (then environment, then the saved login). */
export function clientFor(flags: CommonFlags, io: CliIo): ApiClient {
  return new ApiClient(resolveClientOptions(flags, io.env));
}

/** The org a command works on: `--org`, FLEETHUB_ORG, the saved login's org, or the only org visible. */
export async function orgOf(client: ApiClient, flags: CommonFlags, io: CliIo): Promise<string> {
  const explicit = flags.org || io.env.FLEETHUB_ORG || loadCredentials(io.env)?.org;
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

/** Prints usage and returns 0 when `--help` was given, else undefined. */
export function helpRequested(values: { help?: boolean }, usage: string, io: CliIo): number | undefined {
  if (!values.help) return undefined;
  io.out(`${usage}\n`);
  return 0;
}

export function usageError(message: string, usage: string): CliError {
  return new CliError(`${message}\n\n${usage}`, 2);
}

/**
 * Runs a command body and turns failures into an exit code: CliError → its message on stderr
 * (`error: ...`), anything else → the error text. Returns 0 on success.
 */
export async function runCommand(io: CliIo, body: () => Promise<number | undefined>): Promise<number> {
  try {
    return (await body()) ?? 0;
  } catch (err) {
    if (err instanceof CliError) {
      io.err(`error: ${err.message}\n`);
      return err.exitCode;
    }
    io.err(`error: ${(err as Error).message ?? String(err)}\n`);
    return 1;
  }
}

// ---------------------------------------------------------------------------------------------
// The generated client (fleethub/client): typed from the OpenAPI document

/** The typed API client for a command's flags (then environment, then the saved login). */
export function apiFor(flags: CommonFlags, io: CliIo): FleethubClient {
  return createFleethubClient(resolveClientOptions(flags, io.env));
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
      const message =
        err.status === 401 && !options.token
          ? 'not logged in: run `fleethub login` or pass --token / set FLEETHUB_TOKEN'
          : err.message;
      throw new CliError(message, 1, err.status, err.code, err.details);
    }
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    throw new CliError(
      `cannot reach ${options.url} (${cause?.code ?? cause?.message ?? (err as Error).message}); check --url or FLEETHUB_URL`,
    );
  }
}
