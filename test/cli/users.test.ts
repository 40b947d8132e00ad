import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runUsersCommand } from '../../server/cli/users.ts';
import { openDatabase } from '../../server/db/index.ts';
import { verifyPassword } from '../../server/api/operators.ts';
import { runCaptured } from '../helpers/cli-io.ts';

// `fleethub users` opens the server's own database from its configuration: here an embedded
// PGlite in a temporary data directory (the same code path serves DATABASE_URL).
describe('fleethub users (embedded database in a data directory)', () => {
  let dataDir: string;
  const run = (argv: string[], env: NodeJS.ProcessEnv = {}) =>
    runCaptured(runUsersCommand, argv, { env: { FLEETHUB_DATA_DIR: dataDir, ...env } });

  before(() => {
    dataDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-users-'));
  });
  after(() => rmSync(dataDir, { recursive: true, force: true }));

  test('users create makes an instance admin whose password verifies, and users list shows it', async () => {
    const created = await run([
      'create',
      '--email',
      'First@Example.com',
      '--password',
      'first-admin-pw',
      '--role',
      'admin',
    ]);
    assert.equal(created.code, 0, created.err);
    assert.match(created.out, /created admin first@example.com \(all organizations\)/);

    const listed = await run(['list', '--json']);
    assert.equal(listed.code, 0, listed.err);
    const users = JSON.parse(listed.out);
    assert.equal(users.length, 1);
    assert.equal(users[0].org_id, null);

    const handle = await openDatabase({ dataDir });
    try {
      const row = await handle.db.selectFrom('users').select('password_hash').executeTakeFirstOrThrow();
      assert.equal(await verifyPassword('first-admin-pw', row.password_hash), true);
      assert.equal(await verifyPassword('another-pw', row.password_hash), false);
    } finally {
      await handle.close();
    }
  });

  test('users create refuses a duplicate email, an unknown org, a bad role and a short password', async () => {
    const duplicate = await run([
      'create',
      '--email',
      'first@example.com',
      '--password',
      'whatever-pw',
      '--role',
      'viewer',
    ]);
    assert.equal(duplicate.code, 1);
    assert.match(duplicate.err, /already exists/);
    const unknownOrg = await run([
      'create',
      '--email',
      'x@example.com',
      '--password',
      'whatever-pw',
      '--role',
      'viewer',
      '--org',
      'nowhere',
    ]);
    assert.equal(unknownOrg.code, 1);
    assert.match(unknownOrg.err, /org "nowhere" does not exist/);
    const badRole = await run(['create', '--email', 'y@example.com', '--password', 'whatever-pw', '--role', 'root']);
    assert.equal(badRole.code, 2);
    const short = await run(['create', '--email', 'z@example.com', '--role', 'viewer'], { FLEETHUB_PASSWORD: 'short' });
    assert.equal(short.code, 1);
    assert.match(short.err, /at least 8 characters/);
  });
});
