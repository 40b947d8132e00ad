/**
 * The operator CLI's account commands: `fleethub login | logout | orgs | products | tokens`, a thin
 * layer over the REST API (server/cli/client.ts). Tables by default, `--json` for scripts.
 */
import { createInterface } from 'node:readline';
import { Writable } from 'node:stream';
import type { Command } from 'commander';
import type { operations, Schemas } from '../../client/index.ts';
import {
  CliError,
  listRange,
  orgSession,
  printJson,
  printRecord,
  printRows,
  profileName,
  resolveClientOptions,
  saveCredentials,
  loadCredentials,
  sessionFor,
  sessionOf,
  usageError,
  type CliIo,
  type Column,
  type CommonFlags,
} from './client.ts';
import { act, type CliContext, type PageFlags, paged, withOrg, withServer } from './command.ts';

/** `fleethub <argv>` as the operator CLI runs it (kept for callers of the old entry point). */
export async function runOperatorCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(argv, io);
}

/** Adds login, logout, orgs, products and tokens to `program`. */
export function registerAccountCommands(program: Command, ctx: CliContext): void {
  const { io } = ctx;
  act<CommonFlags & { email?: string; password?: string }>(
    withServer(
      program
        .command('login')
        .description('log in to a fleethub server and save the token in the profile (docs/cli.md)')
        .option('--email <email>', 'your email (FLEETHUB_EMAIL)')
        .option('--password <password>', 'your password (FLEETHUB_PASSWORD; else read from standard input)'),
    ),
    ctx,
    (o) => login(o, io),
  );
  act<CommonFlags>(
    withServer(program.command('logout').description("end the profile's session on the server and forget its token")),
    ctx,
    (o) => logout(o, io),
  );

  const orgs = program.command('orgs').description('organizations');
  act<CommonFlags & PageFlags>(
    paged(withServer(orgs.command('list', { isDefault: true }).description('organizations you can see'))),
    ctx,
    async (o) => {
      const { api, list } = sessionFor(o, io);
      const { items } = await list((page) => api.GET('/api/v1/orgs', { params: { query: page } }), listRange(o));
      printRows(io, o.json, items, ORG_COLUMNS);
    },
  );
  act<CommonFlags>(
    withServer(orgs.command('create').description('create an organization (instance admins)').argument('<name>')),
    ctx,
    async (o, [name]) => {
      const { api, call } = sessionFor(o, io);
      const org = await call(api.POST('/api/v1/orgs', { body: { name: name as string } }));
      if (o.json) printJson(io, org);
      else io.out(`created organization ${org.name} (${org.id})\n`);
    },
  );

  const products = program.command('products').description('products');
  act<CommonFlags & PageFlags>(
    paged(withOrg(products.command('list', { isDefault: true }).description("the org's products"))),
    ctx,
    async (o) => {
      const { api, list, org } = await orgSession(o, io);
      const { items } = await list(
        (page) => api.GET('/api/v1/orgs/{org}/products', { params: { path: { org }, query: page } }),
        listRange(o),
      );
      printRows(io, o.json, items, [
        { header: 'name', value: (p) => p.name },
        { header: 'id', value: (p) => p.id },
        { header: 'signed', value: (p) => (p.requires_signature ? 'required' : 'optional') },
        {
          header: 'update timeout',
          value: (p) => (p.update_timeout_seconds === null ? 'default' : `${p.update_timeout_seconds} s`),
        },
      ]);
    },
  );
  act<CommonFlags>(
    withOrg(
      products
        .command('set-timeout')
        .description('how long an update may stay in flight before it times out (admins)')
        .argument('<product>', 'name or id')
        .argument('<seconds>', 'a number of seconds, or "default" (the server\'s)'),
    ),
    ctx,
    async (o, [name, raw]) => {
      if (raw !== 'default' && !/^\d+$/.test(raw as string))
        throw usageError('the timeout is a number of seconds, or "default" (the server\'s)');
      const { api, call, org } = await orgSession(o, io);
      const product = await call(
        api.PATCH('/api/v1/orgs/{org}/products/{product}', {
          params: { path: { org, product: name as string } },
          body: { update_timeout_seconds: raw === 'default' ? null : Number(raw) },
        }),
      );
      if (o.json) return printJson(io, product);
      io.out(
        `product ${product.name}: updates time out after ${product.update_timeout_seconds === null ? "the server's default" : `${product.update_timeout_seconds} s`}\n`,
      );
    },
  );
  act<CommonFlags & { requiresSignature?: boolean }>(
    withOrg(
      products
        .command('create')
        .description('create a product (admins)')
        .argument('<name>')
        .option('--requires-signature', 'refuse unsigned firmware for this product'),
    ),
    ctx,
    async (o, [name]) => {
      const { api, call, org } = await orgSession(o, io);
      const product = await call(
        api.POST('/api/v1/orgs/{org}/products', {
          params: { path: { org } },
          body: { name: name as string, requires_signature: o.requiresSignature ?? false },
        }),
      );
      if (o.json) printJson(io, product);
      else io.out(`created product ${product.name} (${product.id})\n`);
    },
  );

  const tokens = program.command('tokens').description('API tokens for automation');
  act<CommonFlags & PageFlags & { all?: boolean }>(
    paged(
      withServer(
        tokens
          .command('list', { isDefault: true })
          .description('your API tokens')
          .option('--all', "every user's tokens (admins)"),
      ),
    ),
    ctx,
    async (o) => {
      const { api, list } = sessionFor(o, io);
      const { items } = await list(
        (page) => api.GET('/api/v1/tokens', { params: { query: { ...page, all: o.all ? true : undefined } } }),
        listRange(o),
      );
      printRows(io, o.json, items, [
        { header: 'id', value: (t) => t.id },
        { header: 'name', value: (t) => t.name },
        { header: 'role', value: (t) => t.role },
        { header: 'expires', value: (t) => t.expires_at },
        { header: 'last used', value: (t) => t.last_used_at },
        { header: 'state', value: (t) => (t.revoked ? 'revoked' : 'active') },
      ]);
    },
  );
  act<CommonFlags & { role?: string; expiresDays?: string }>(
    withServer(
      tokens
        .command('create')
        .description('create an API token (printed once)')
        .argument('<name>')
        .option('--role <role>', 'admin | operator | viewer, at most your own (default: yours)')
        .option('--expires-days <n>', 'lifetime in days (default: no expiry)'),
    ),
    ctx,
    async (o, [name]) => {
      const days = o.expiresDays === undefined ? undefined : Number(o.expiresDays);
      if (days !== undefined && !Number.isInteger(days))
        throw usageError('--expires-days must be a whole number of days');
      const { api, call } = sessionFor(o, io);
      const created = await call(
        api.POST('/api/v1/tokens', {
          body: { name: name as string, role: o.role as TokenRole, expires_in_days: days },
        }),
      );
      if (o.json) return printJson(io, created);
      printRecord(io, false, {
        id: created.api_token.id,
        name: created.api_token.name,
        role: created.api_token.role,
        expires: created.api_token.expires_at,
      });
      io.out(`\ntoken (shown only now; use it as FLEETHUB_TOKEN or --token):\n${created.token}\n`);
    },
  );
  act<CommonFlags>(
    withServer(tokens.command('revoke').description('revoke an API token').argument('<id>')),
    ctx,
    async (o, [id]) => {
      const { api, call } = sessionFor(o, io);
      await call(api.DELETE('/api/v1/tokens/{id}', { params: { path: { id: id as string } } }));
      if (o.json) printJson(io, { ok: true, id });
      else io.out(`revoked token ${id}\n`);
    },
  );
}

// ---------------------------------------------------------------------------------------------

async function login(o: CommonFlags & { email?: string; password?: string }, io: CliIo): Promise<number> {
  const email = o.email ?? io.env.FLEETHUB_EMAIL;
  if (!email) throw usageError('--email is required (or set FLEETHUB_EMAIL)');
  const password = o.password ?? io.env.FLEETHUB_PASSWORD ?? (await readPassword(io));
  const profile = profileName(o.profile, io.env);
  // A login sends no token: a 401 is the server's verdict on the password, shown as it is.
  const { url } = resolveClientOptions({ url: o.url, profile }, io.env);
  const { api, call } = sessionOf({ url, profile }, true);
  const session = await call(api.POST('/api/v1/auth/login', { body: { email, password } }));
  const user = { email, role: 'unknown', org_id: null as string | null, ...session.user };
  const file = saveCredentials(
    {
      url,
      token: session.token,
      email: user.email,
      expiresAt: session.expires_at,
      org: user.org_id ?? undefined,
    },
    io.env,
    profile,
  );
  if (o.json)
    printJson(io, {
      url,
      profile,
      email: user.email,
      role: user.role,
      org_id: user.org_id,
      expires_at: session.expires_at,
      credentials: file,
    });
  else
    io.out(
      `logged in to ${url} as ${user.email} (${user.role}); token saved in ${file} (profile ${profile}), valid until ${session.expires_at}\n`,
    );
  return 0;
}

/** The session route of the server (DELETE ends the session the bearer belongs to). */
export const SESSION_PATH = '/api/v1/auth/session' as const;

async function logout(o: CommonFlags, io: CliIo): Promise<number> {
  const profile = profileName(o.profile, io.env);
  const saved = loadCredentials(io.env, profile);
  const token = o.token ?? saved?.token;
  if (!token) throw new CliError(`profile ${profile} has no saved login; nothing to log out of`);
  const url = (o.url ?? saved?.url ?? io.env.FLEETHUB_URL)?.replace(/\/+$/, '');
  if (!url) throw usageError('pass --url');
  let revoked = true;
  try {
    const { api, call } = sessionOf({ url, token }, true);
    await call(api.DELETE(SESSION_PATH));
  } catch (err) {
    // A session that already ended (expired, revoked) is as logged out as it gets.
    if (!(err instanceof CliError) || err.status !== 401) throw err;
    revoked = false;
  }
  if (!o.token || o.token === saved?.token) saveCredentials(undefined, io.env, profile);
  if (o.json) printJson(io, { url, profile, revoked });
  else
    io.out(
      `${revoked ? `logged out of ${url}` : `the session on ${url} had already ended`}; forgot the token of profile ${profile}\n`,
    );
  return 0;
}

/** Reads one line from stdin; on a terminal the typed characters are not echoed. */
async function readPassword(io: CliIo): Promise<string> {
  if (!process.stdin.isTTY && process.stdin.readableEnded)
    throw new CliError('no password given: pass --password or set FLEETHUB_PASSWORD', 2);
  io.err('Password: ');
  const muted = new Writable({ write: (_chunk, _enc, done) => done() });
  const rl = createInterface({
    input: process.stdin,
    output: process.stdin.isTTY ? muted : undefined,
    terminal: Boolean(process.stdin.isTTY),
  });
  try {
    const line = await new Promise<string>((resolve, reject) => {
      rl.once('line', resolve);
      rl.once('close', () => reject(new CliError('no password given: pass --password or set FLEETHUB_PASSWORD', 2)));
    });
    if (process.stdin.isTTY) io.err('\n');
    return line;
  } finally {
    rl.close();
  }
}

// ---------------------------------------------------------------------------------------------

type Org = Schemas['Org'];
type TokenRole = operations['createToken']['requestBody']['content']['application/json']['role'];

const ORG_COLUMNS: Column<Org>[] = [
  { header: 'name', value: (o) => o.name },
  { header: 'id', value: (o) => o.id },
  { header: 'created', value: (o) => o.created_at },
];
