/**
 * The operator CLI: `fleethub login | orgs | products | devices | groups | firmware | target |
 * status | tokens`, a thin layer over the REST API (server/cli/client.ts). Tables by default,
 * `--json` for scripts, `--help` on every command, exit code 1 with the server's message on errors
 * (2 for usage errors).
 */
import { createInterface } from 'node:readline';
import { Writable } from 'node:stream';
import {
  CliError,
  clientFor,
  helpRequested,
  orgOf,
  orgPath,
  parseCommand,
  printJson,
  printRecord,
  printRows,
  processIo,
  runCommand,
  saveCredentials,
  usageError,
  type CliIo,
  type Column,
} from './client.ts';
import {
  runDevicesCommand,
  runFirmwareCommand,
  runGroupsCommand,
  runStatusCommand,
  runTargetCommand,
} from './operator-fleet.ts';

/** Commands this module runs, with their one-line help (for the dispatcher's usage text). */
export const OPERATOR_COMMANDS: Record<string, string> = {
  login: 'log in to a fleethub server and save the token (~/.config/fleethub)',
  orgs: 'organizations: list | create <name>',
  products: 'products: list | create <name>',
  devices: 'devices: list [filters] | show <device>',
  groups: 'groups: list | create <name> | show | members | add | remove | delete',
  firmware: 'firmware: list | show <id> | delete <id>',
  target: 'targets: set <version> --group G | --device D, clear --group G | --device D',
  status: 'counts by version and update state (--group G, --watch)',
  tokens: 'API tokens: list | create <name> | revoke <id>',
};

/** Runs `fleethub <command> ...` for an operator command; `argv[0]` is the command name. */
export async function runOperatorCommand(argv: string[], io: CliIo = processIo): Promise<number> {
  const [command, ...rest] = argv;
  return runCommand(io, async () => {
    switch (command) {
      case 'login':
        return login(rest, io);
      case 'orgs':
        return orgs(rest, io);
      case 'products':
        return products(rest, io);
      case 'tokens':
        return tokens(rest, io);
      case 'devices':
        return runDevicesCommand(rest, io);
      case 'groups':
        return runGroupsCommand(rest, io);
      case 'firmware':
        return runFirmwareCommand(rest, io);
      case 'target':
        return runTargetCommand(rest, io);
      case 'status':
        return runStatusCommand(rest, io);
      default: {
        const lines = Object.entries(OPERATOR_COMMANDS).map(([name, help]) => `  ${name.padEnd(10)} ${help}`);
        throw new CliError(
          `unknown operator command ${JSON.stringify(command ?? '')}\n\nOperator commands:\n${lines.join('\n')}`,
          2,
        );
      }
    }
  });
}

const ORG_OPTION = { org: { type: 'string' } } as const;

// ---------------------------------------------------------------------------------------------

const LOGIN_USAGE = `Usage: fleethub login --email <email> [--password <password>] [--url <server>]

Logs in and saves the token in ~/.config/fleethub/credentials.json (mode 0600).
The password comes from --password, FLEETHUB_PASSWORD, or is read from standard input.`;

async function login(argv: string[], io: CliIo): Promise<number> {
  const { values } = parseCommand(argv, { email: { type: 'string' }, password: { type: 'string' } }, LOGIN_USAGE);
  const help = helpRequested(values, LOGIN_USAGE, io);
  if (help !== undefined) return help;
  const email = values.email ?? io.env.FLEETHUB_EMAIL;
  if (!email) throw usageError('--email is required', LOGIN_USAGE);
  const password = values.password ?? io.env.FLEETHUB_PASSWORD ?? (await readPassword(io));
  const client = clientFor({ url: values.url }, io);
  const session = await client.post<{
    token: string;
    expires_at: string;
    user: { email: string; org_id: string | null; role: string };
  }>('/api/v1/auth/login', { email, password });
  const file = saveCredentials(
    {
      url: client.options.url,
      token: session.token,
      email: session.user.email,
      expiresAt: session.expires_at,
      org: session.user.org_id ?? undefined,
    },
    io.env,
  );
  if (values.json)
    printJson(io, {
      url: client.options.url,
      email: session.user.email,
      role: session.user.role,
      org_id: session.user.org_id,
      expires_at: session.expires_at,
      credentials: file,
    });
  else
    io.out(
      `logged in to ${client.options.url} as ${session.user.email} (${session.user.role}); token saved in ${file}, valid until ${session.expires_at}\n`,
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

const ORGS_USAGE = `Usage:
  fleethub orgs [list]          organizations you can see
  fleethub orgs create <name>   create one (instance admins)
Options: --json --url --token`;

interface Org {
  id: string;
  name: string;
  created_at: string;
}
const ORG_COLUMNS: Column<Org>[] = [
  { header: 'name', value: (o) => o.name },
  { header: 'id', value: (o) => o.id },
  { header: 'created', value: (o) => o.created_at },
];

async function orgs(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(argv, {}, ORGS_USAGE);
  const help = helpRequested(values, ORGS_USAGE, io);
  if (help !== undefined) return help;
  const client = clientFor(values, io);
  const [sub = 'list', name] = positionals;
  switch (sub) {
    case 'list': {
      const { items } = await client.get<{ items: Org[] }>('/api/v1/orgs');
      printRows(io, values.json, items, ORG_COLUMNS);
      return 0;
    }
    case 'create': {
      if (!name) throw usageError('orgs create needs a name', ORGS_USAGE);
      const org = await client.post<Org>('/api/v1/orgs', { name });
      if (values.json) printJson(io, org);
      else io.out(`created organization ${org.name} (${org.id})\n`);
      return 0;
    }
    default:
      throw usageError(`unknown subcommand ${JSON.stringify(sub)}`, ORGS_USAGE);
  }
}

// ---------------------------------------------------------------------------------------------

const PRODUCTS_USAGE = `Usage:
  fleethub products [list] [--org O]
  fleethub products create <name> [--requires-signature] [--org O]   (admins)
  fleethub products set-timeout <name> <seconds|default> [--org O]   in-flight update timeout (admins)
Options: --json --url --token`;

interface Product {
  id: string;
  name: string;
  requires_signature: boolean;
  update_timeout_seconds: number | null;
  created_at: string;
}

async function products(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(
    argv,
    { ...ORG_OPTION, 'requires-signature': { type: 'boolean' } },
    PRODUCTS_USAGE,
  );
  const help = helpRequested(values, PRODUCTS_USAGE, io);
  if (help !== undefined) return help;
  const client = clientFor(values, io);
  const org = await orgOf(client, values, io);
  const [sub = 'list', name] = positionals;
  switch (sub) {
    case 'list': {
      const { items } = await client.get<{ items: Product[] }>(`${orgPath(org)}/products`);
      printRows(io, values.json, items, [
        { header: 'name', value: (p) => p.name },
        { header: 'id', value: (p) => p.id },
        { header: 'signed', value: (p) => (p.requires_signature ? 'required' : 'optional') },
        {
          header: 'update timeout',
          value: (p) => (p.update_timeout_seconds === null ? 'default' : `${p.update_timeout_seconds} s`),
        },
      ]);
      return 0;
    }
    case 'set-timeout': {
      const raw = positionals[2];
      if (!name || raw === undefined)
        throw usageError('products set-timeout needs a product and seconds', PRODUCTS_USAGE);
      if (raw !== 'default' && !/^\d+$/.test(raw))
        throw usageError('the timeout is a number of seconds, or "default" (the server\'s)', PRODUCTS_USAGE);
      const product = await client.patch<Product>(`${orgPath(org)}/products/${encodeURIComponent(name)}`, {
        update_timeout_seconds: raw === 'default' ? null : Number(raw),
      });
      if (values.json) printJson(io, product);
      else
        io.out(
          `product ${product.name}: updates time out after ${product.update_timeout_seconds === null ? "the server's default" : `${product.update_timeout_seconds} s`}\n`,
        );
      return 0;
    }
    case 'create': {
      if (!name) throw usageError('products create needs a name', PRODUCTS_USAGE);
      const product = await client.post<Product>(`${orgPath(org)}/products`, {
        name,
        requires_signature: values['requires-signature'] ?? false,
      });
      if (values.json) printJson(io, product);
      else io.out(`created product ${product.name} (${product.id})\n`);
      return 0;
    }
    default:
      throw usageError(`unknown subcommand ${JSON.stringify(sub)}`, PRODUCTS_USAGE);
  }
}

// ---------------------------------------------------------------------------------------------

const TOKENS_USAGE = `Usage:
  fleethub tokens [list] [--all]                                 your API tokens (--all: every token, admins)
  fleethub tokens create <name> [--role R] [--expires-days N]    prints the token once
  fleethub tokens revoke <id>
Options: --json --url --token`;

interface ApiTokenRow {
  id: string;
  name: string;
  role: string;
  org_id: string | null;
  expires_at: string | null;
  last_used_at: string | null;
  revoked: boolean;
}

async function tokens(argv: string[], io: CliIo): Promise<number> {
  const { values, positionals } = parseCommand(
    argv,
    { role: { type: 'string' }, 'expires-days': { type: 'string' }, all: { type: 'boolean' } },
    TOKENS_USAGE,
  );
  const help = helpRequested(values, TOKENS_USAGE, io);
  if (help !== undefined) return help;
  const client = clientFor(values, io);
  const [sub = 'list', arg] = positionals;
  switch (sub) {
    case 'list': {
      const { items } = await client.get<{ items: ApiTokenRow[] }>('/api/v1/tokens', {
        all: values.all ? 'true' : undefined,
      });
      printRows(io, values.json, items, [
        { header: 'id', value: (t) => t.id },
        { header: 'name', value: (t) => t.name },
        { header: 'role', value: (t) => t.role },
        { header: 'expires', value: (t) => t.expires_at },
        { header: 'last used', value: (t) => t.last_used_at },
        { header: 'state', value: (t) => (t.revoked ? 'revoked' : 'active') },
      ]);
      return 0;
    }
    case 'create': {
      if (!arg) throw usageError('tokens create needs a name', TOKENS_USAGE);
      const days = values['expires-days'] === undefined ? undefined : Number(values['expires-days']);
      if (days !== undefined && !Number.isInteger(days))
        throw usageError('--expires-days must be a whole number of days', TOKENS_USAGE);
      const created = await client.post<{ token: string; api_token: ApiTokenRow }>('/api/v1/tokens', {
        name: arg,
        role: values.role,
        expires_in_days: days,
      });
      if (values.json) printJson(io, created);
      else {
        printRecord(io, false, {
          id: created.api_token.id,
          name: created.api_token.name,
          role: created.api_token.role,
          expires: created.api_token.expires_at,
        });
        io.out(`\ntoken (shown only now; use it as FLEETHUB_TOKEN or --token):\n${created.token}\n`);
      }
      return 0;
    }
    case 'revoke': {
      if (!arg) throw usageError('tokens revoke needs the token id', TOKENS_USAGE);
      await client.delete(`/api/v1/tokens/${encodeURIComponent(arg)}`);
      if (values.json) printJson(io, { ok: true, id: arg });
      else io.out(`revoked token ${arg}\n`);
      return 0;
    }
    default:
      throw usageError(`unknown subcommand ${JSON.stringify(sub)}`, TOKENS_USAGE);
  }
}
