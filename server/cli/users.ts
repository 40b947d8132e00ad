/**
 * `fleethub users create|list`: manages operator accounts directly in the database (no running
 * server needed), so the first admin can be created on a fresh install.
 */
import { loadConfig } from '../config.ts';
import { openDatabase } from '../db/index.ts';
import { migrateToLatest } from '../db/migrate.ts';
import { ApiError } from '../http/errors.ts';
import { createUser, isRole, listUsers, ROLES } from '../api/operators.ts';
import {
  CliError,
  parseCommand,
  printJson,
  printRows,
  processIo,
  runCommand,
  usageError,
  type CliIo,
} from './client.ts';

const USAGE = `Usage:
  fleethub users create --email <email> --password <password> --role admin|operator|viewer [--org <org>] [--name <name>]
  fleethub users list

Without --org the user sees every organization (instance user). The password may also come from
FLEETHUB_PASSWORD. The database is the server's: --data-dir / --database-url (or FLEETHUB_DATA_DIR /
DATABASE_URL) as for \`fleethub serve\`.
Options: --json`;

/** Runs `fleethub users ...`; returns the exit code. */
export async function runUsersCommand(argv: string[], io: CliIo = processIo): Promise<number> {
  return runCommand(io, async () => {
    const { values, positionals } = parseCommand(
      argv,
      {
        email: { type: 'string' },
        password: { type: 'string' },
        role: { type: 'string' },
        org: { type: 'string' },
        name: { type: 'string' },
        'data-dir': { type: 'string' },
        'database-url': { type: 'string' },
      },
      USAGE,
    );
    if (values.help) {
      io.out(`${USAGE}\n`);
      return 0;
    }
    const [sub] = positionals;
    if (sub !== 'create' && sub !== 'list')
      throw usageError(sub ? `unknown subcommand ${JSON.stringify(sub)}` : 'users needs create or list', USAGE);
    if (sub === 'create') {
      if (!values.email) throw usageError('--email is required', USAGE);
      if (!values.role || !isRole(values.role)) throw usageError(`--role must be one of ${ROLES.join(', ')}`, USAGE);
      if (!(values.password ?? io.env.FLEETHUB_PASSWORD))
        throw usageError('--password (or FLEETHUB_PASSWORD) is required', USAGE);
    }

    const config = loadConfig([], io.env, {
      ...(values['data-dir'] ? { dataDir: values['data-dir'] } : {}),
      ...(values['database-url'] ? { databaseUrl: values['database-url'] } : {}),
    });
    const handle = await openDatabase({ databaseUrl: config.databaseUrl, dataDir: config.dataDir, poolSize: 2 });
    try {
      await migrateToLatest(handle.db);
      if (sub === 'list') {
        const users = await listUsers(handle.db, null);
        printRows(
          io,
          values.json,
          users,
          [
            { header: 'email', value: (u) => u.email },
            { header: 'role', value: (u) => u.role },
            { header: 'org', value: (u) => u.org_id ?? '(all)' },
            { header: 'state', value: (u) => (u.disabled ? 'disabled' : 'active') },
            { header: 'id', value: (u) => u.id },
          ],
          '(no users)',
        );
        return 0;
      }
      try {
        const user = await createUser(handle.db, {
          email: values.email!,
          password: (values.password ?? io.env.FLEETHUB_PASSWORD)!,
          role: values.role as (typeof ROLES)[number],
          orgId: values.org ?? null,
          name: values.name ?? null,
        });
        if (values.json) printJson(io, user);
        else
          io.out(
            `created ${user.role} ${user.email}${user.org_id ? ` in org ${user.org_id}` : ' (all organizations)'} (${user.id})\n`,
          );
        return 0;
      } catch (err) {
        if (err instanceof ApiError) throw new CliError(err.message, 1, err.status, err.code);
        throw err;
      }
    } finally {
      await handle.close();
    }
  });
}
