/**
 * `fleethub users create|list`: manages operator accounts directly in the database (no running
 * server needed), so the first admin can be created on a fresh install.
 */
import { loadConfig } from '../config.ts';
import { openDatabase } from '../db/index.ts';
import { migrateToLatest } from '../db/migrate.ts';
import { ApiError } from '../http/errors.ts';
import { createUser, isRole, listUsers, ROLES } from '../api/operators.ts';
import { CliError, printJson, printRows, usageError, type CliIo } from './client.ts';

export interface UsersFlags {
  email?: string;
  password?: string;
  role?: string;
  org?: string;
  name?: string;
  dataDir?: string;
  databaseUrl?: string;
  json?: boolean;
}

/** `fleethub users ...` as the CLI runs it (kept for callers of the old entry point). */
export async function runUsersCommand(argv: string[], io?: CliIo): Promise<number> {
  return (await import('./index.ts')).main(['users', ...argv], io);
}

/** `users create` or `users list` against the configured database (declared in server/cli/index.ts). */
export async function runUsers(sub: 'create' | 'list', values: UsersFlags, io: CliIo): Promise<number> {
  if (sub === 'create') {
    if (!values.role || !isRole(values.role)) throw usageError(`--role must be one of ${ROLES.join(', ')}`);
    if (!(values.password ?? io.env.FLEETHUB_PASSWORD))
      throw usageError('--password (or FLEETHUB_PASSWORD) is required');
  }

  const config = loadConfig([], io.env, {
    ...(values.dataDir ? { dataDir: values.dataDir } : {}),
    ...(values.databaseUrl ? { databaseUrl: values.databaseUrl } : {}),
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
}
