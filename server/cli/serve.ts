import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { createUser } from '../api/operators.ts';
import type { Db } from '../db/index.ts';
import { loadConfig } from '../config.ts';
import { startServer } from '../main.ts';

/**
 * `fleethub serve`: runs a node until SIGTERM/SIGINT, then drains devices with 1012. `argv` holds
 * only settings' flags (server/cli/index.ts declares one option per SETTINGS entry).
 */
export async function runServeCommand(argv: string[]): Promise<number> {
  const config = loadConfig(argv);
  const server = await startServer(config);
  const firstAdmin = await bootstrapFirstAdmin(server.database.db, config.dataDir, process.env);
  const rel = (p: string) => path.relative(process.cwd(), p) || '.';
  const certsDir = rel(config.certsDir);
  const socketUrl = `${server.deviceUrl.replace(/^https:/, 'wss:')}/socket`;
  const banner = [
    '',
    `fleethub is running (node ${config.nodeName}, database: ${server.database.kind === 'pglite' ? `embedded PGlite in ${rel(config.dataDir)}` : 'PostgreSQL'})`,
    '',
    `  operator API      ${server.apiUrl}/api/v1   (OpenAPI: ${server.apiUrl}/api/docs)`,
    `  devices (mTLS)    ${socketUrl}   (development PKI in ${certsDir})`,
    `  GRiSP boards      ${server.deviceUrl.replace(/^https:/, 'wss:')}/grisp-connect/ws   (mTLS, subprotocol grisp-io-v1)`,
    `  WiFiDogX          ${server.apiUrl.replace(/^http/, 'ws')}/ws/wifidogx`,
    `  Main Server REST  ${server.apiUrl}/api/main-server`,
    server.keyauth ? `  keyauth (TCP)     ${config.host}:${server.keyauth.port}` : '',
    `  dashboard         ${server.apiUrl}/`,
    '',
    firstAdmin
      ? `First start: created the admin ${firstAdmin.email}; the password is in ${rel(firstAdmin.passwordFile)}. Log in with\n  npx fleethub login --url ${server.apiUrl} --email ${firstAdmin.email} --password "$(cat ${rel(firstAdmin.passwordFile)})"\n`
      : `Log in: npx fleethub login --url ${server.apiUrl} --email <your email>\n`,
    'Connect 10 simulated devices (certificates are issued from the development PKI):',
    `  npx fleethub-device simulate --count 10 --url ${socketUrl} --pki ${certsDir} --certs ${rel(path.join(config.dataDir, 'sim-certs'))}`,
    '',
    'Connect one device with its own certificate:',
    `  npx fleethub certs device dev-0001 --out ${rel(path.join(config.dataDir, 'dev-0001'))}`,
    `  npx fleethub-device connect --url ${socketUrl} --cert ${rel(path.join(config.dataDir, 'dev-0001/cert.pem'))} --key ${rel(path.join(config.dataDir, 'dev-0001/key.pem'))} --ca ${rel(path.join(config.dataDir, 'dev-0001/ca.pem'))}`,
    '',
  ]
    .filter((line, i, all) => line !== '' || all[i - 1] !== '')
    .join('\n');
  console.log(banner);

  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    server.log.info({ signal }, 'draining: closing device sockets with 1012');
    server.close().then(
      () => process.exit(0),
      (err: unknown) => {
        server.log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
  return 0;
}

/**
 * With no operator at all, creates the first admin (FLEETHUB_ADMIN_EMAIL, FLEETHUB_ADMIN_PASSWORD
 * or a random password written to `<data-dir>/initial-admin-password`, mode 0600). The embedded
 * database belongs to the server process, so this cannot be left to a second process.
 */
async function bootstrapFirstAdmin(
  db: Db,
  dataDir: string,
  env: NodeJS.ProcessEnv,
): Promise<{ email: string; passwordFile: string } | undefined> {
  const existing = await db.selectFrom('users').select('id').limit(1).executeTakeFirst();
  if (existing) return undefined;
  const email = env.FLEETHUB_ADMIN_EMAIL || 'admin@fleethub.local';
  const password = env.FLEETHUB_ADMIN_PASSWORD || randomBytes(18).toString('base64url');
  const passwordFile = path.join(dataDir, 'initial-admin-password');
  writeFileSync(passwordFile, `${password}\n`, { mode: 0o600 });
  await createUser(db, { email, password, role: 'admin' });
  return { email, passwordFile };
}
