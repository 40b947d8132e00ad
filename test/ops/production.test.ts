/**
 * Production mode and the image, read as an operator deploying fleethub would: the server
 * refuses to invent a PKI or an admin password and says what to configure; settings can come
 * from files (Docker secrets); the Dockerfile and .dockerignore keep a developer's data/ out of
 * the image (docker cannot run here, so the files are read).
 */
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { loadConfig } from '../../server/config.ts';
import { startServer } from '../../server/main.ts';
import { createLogger } from '../../server/log.ts';
import { createTestDatabase } from '../helpers/db.ts';
import { getTestPki } from '../helpers/pki.ts';
import { startServerProcess } from '../helpers/server-process.ts';

const ROOT = path.resolve(import.meta.dirname, '../..');
const dirs: string[] = [];
const tmp = (name: string) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), `fleethub-${name}-`));
  dirs.push(dir);
  return dir;
};
after(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

const ports = { host: '127.0.0.1', apiPort: 0, devicePort: 0, keyauthPort: -1, devicePublicUrl: 'https://localhost:0' };

describe('production mode', () => {
  test('refuses to start without the server certificate, names the files, and creates no development PKI', async () => {
    const certsDir = tmp('certs');
    const database = await createTestDatabase();
    try {
      const config = loadConfig([], {}, { ...ports, production: true, dataDir: tmp('data'), certsDir });
      assert.equal(config.bootstrapDev, false, 'no development tenant in production mode');
      await assert.rejects(startServer(config, { database, log: createLogger({ level: 'silent' }) }), (err: Error) => {
        assert.match(err.message, /^production mode: .*server\.pem and .*server\.key missing/);
        assert.match(err.message, /never creates a development PKI/);
        return true;
      });
      assert.deepEqual(readdirSync(certsDir), [], 'nothing was created in the certificates directory');
    } finally {
      await database.close();
    }
  });

  test('refuses the development tenant', () => {
    assert.throws(
      () => loadConfig(['--production', '--bootstrap-dev'], {}),
      /production mode: --bootstrap-dev registers the development signer CA/,
    );
    assert.equal(loadConfig([], { FLEETHUB_PRODUCTION: '1' }).production, true);
    assert.equal(loadConfig([], {}).production, false);
  });

  test('with a certificate but no admin password, the first start refuses and says what to set', async () => {
    const pki = await getTestPki();
    const certsDir = tmp('server-cert');
    for (const f of ['server.pem', 'server.key']) copyFileSync(path.join(pki.dir, f), path.join(certsDir, f));
    const dataDir = tmp('data');
    await assert.rejects(
      startServerProcess({ dataDir, certsDir, extraArgs: ['--production'], env: { FLEETHUB_ADMIN_PASSWORD: '' } }),
      /production mode: there is no operator yet and no password for the first admin\. Set FLEETHUB_ADMIN_EMAIL/,
    );
    assert.ok(!existsSync(path.join(dataDir, 'initial-admin-password')));
  });

  test('every setting can be read from <VARIABLE>_FILE (Docker secrets)', () => {
    const file = path.join(tmp('secret'), 'fleethub_secret');
    writeFileSync(file, 'a-secret-from-a-docker-secret-file\n');
    assert.equal(loadConfig([], { FLEETHUB_SECRET_FILE: file }).secret, 'a-secret-from-a-docker-secret-file');
    const url = path.join(tmp('db'), 'database_url');
    writeFileSync(url, 'postgres://u:p@db:5432/fleethub');
    assert.equal(loadConfig([], { DATABASE_URL_FILE: url }).databaseUrl, 'postgres://u:p@db:5432/fleethub');
  });
});

describe('the Docker image, read', () => {
  const dockerfile = readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8');
  const ignored = readFileSync(path.join(ROOT, '.dockerignore'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  const instructions = dockerfile
    .replace(/\\\n/g, ' ')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  const stages = instructions.filter((l) => /^FROM\s/i.test(l));
  const runtime = instructions.slice(instructions.lastIndexOf(stages.at(-1)!));

  test('.dockerignore keeps out data/, .git, node_modules, build and test output, secrets and keys', () => {
    for (const entry of [
      'data/',
      '.git/',
      'node_modules/',
      'dist/',
      'bench/results/',
      'secrets/',
      '*.pem',
      '*.key',
      '.env',
    ])
      assert.ok(ignored.includes(entry), `.dockerignore lists ${entry}`);
  });

  test('no COPY from the build context can bring in data/: each copies named paths, none the whole context', () => {
    const copies = instructions.filter((l) => /^COPY\s/i.test(l) && !/--from=/i.test(l));
    assert.ok(copies.length > 0);
    for (const line of copies) {
      const sources = line
        .split(/\s+/)
        .slice(1, -1)
        .filter((a) => !a.startsWith('--'));
      for (const source of sources) {
        assert.notEqual(source.replace(/^\.\/?/, ''), '', `${line}: copies the whole build context`);
        assert.ok(!source.replace(/^\.\//, '').startsWith('data'), `${line}: copies data/`);
        assert.ok(existsSync(path.join(ROOT, source)), `${line}: ${source} exists in the repository`);
      }
    }
  });

  test('is multi-stage, runs the compiled build as a non-root user in production mode, with a readiness HEALTHCHECK', () => {
    assert.ok(stages.length >= 2, 'a build stage and a runtime stage');
    assert.ok(
      runtime.some((l) => /^COPY --from=build \S*dist/.test(l)),
      'the runtime stage takes dist/ from the build',
    );
    assert.ok(
      runtime.some((l) => /npm ci --omit=dev/.test(l)),
      'production dependencies only',
    );
    const user = runtime.filter((l) => /^USER\s/i.test(l)).at(-1);
    assert.ok(user && !/^USER\s+(root|0)\b/i.test(user), `runs as ${user}`);
    assert.ok(
      runtime.some((l) => /^ENV .*FLEETHUB_PRODUCTION=1/.test(l)),
      'production mode by default',
    );
    assert.ok(
      runtime.some((l) => /^HEALTHCHECK .*\/readyz/.test(l)),
      'HEALTHCHECK on /readyz',
    );
    const cmd = runtime.filter((l) => /^CMD\s/i.test(l)).at(-1)!;
    assert.match(cmd, /bin\/fleethub\.js/);
    assert.doesNotMatch(runtime.join('\n'), /tsx/);
  });

  test('compose takes secrets from files, not literals', () => {
    const compose = readFileSync(path.join(ROOT, 'docker-compose.yml'), 'utf8');
    assert.doesNotMatch(compose, /FLEETHUB_SECRET:|POSTGRES_PASSWORD:|change-me/);
    for (const name of ['fleethub_secret', 'database_url', 'postgres_password', 'admin_password'])
      assert.match(compose, new RegExp(`${name}:\\n\\s+file: \\./secrets/${name}`));
  });
});
