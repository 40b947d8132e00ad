import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, utimesSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Socket } from 'phoenix';
import { createProcessDatabase, DATABASE_KIND } from '../helpers/db.ts';
import { disconnectSocket, joinChannel, openSocket, waitFor } from '../helpers/phoenix.ts';
import { deviceCert, deviceTlsOptions, getTestPki } from '../helpers/pki.ts';
import { startServerProcess, type ServerProcess, type ServerProcessOptions } from '../helpers/server-process.ts';

// `fleethub serve` killed with SIGKILL mid-work and started again on the same data: what the
// crash left behind (devices shown online, a half-written upload) is cleared at start-up as far
// as the database kind allows (one process owns PGlite; PostgreSQL nodes may share everything).

const ADMIN = { email: 'crash-admin@example.com', password: 'crash-password-123456' };
const FIRMWARE_UUID = '7b0d5a4e-2f7c-4d0e-9a59-1f0e6c1d2a01';

interface Session {
  server: ServerProcess;
  token: string;
}

let dataDir: string;
let certsDir: string;
let databaseUrl: string | undefined;
let closeDatabase: (() => Promise<void>) | undefined;
const sockets: Socket[] = [];
const servers: ServerProcess[] = [];

before(async () => {
  dataDir = mkdtempSync(path.join(os.tmpdir(), 'fleethub-crash-'));
  certsDir = (await getTestPki()).dir;
  const database = await createProcessDatabase('crash');
  databaseUrl = database?.url;
  closeDatabase = database?.drop;
});
after(async () => {
  for (const socket of sockets) socket.disconnect();
  for (const server of servers) await server.kill();
  await closeDatabase?.();
  rmSync(dataDir, { recursive: true, force: true });
});

async function start(options: Partial<ServerProcessOptions> = {}): Promise<Session> {
  const server = await startServerProcess({
    dataDir,
    certsDir,
    databaseUrl,
    env: { FLEETHUB_ADMIN_EMAIL: ADMIN.email, FLEETHUB_ADMIN_PASSWORD: ADMIN.password },
    ...options,
  });
  servers.push(server);
  const login = await fetch(`${server.apiUrl}/api/v1/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(ADMIN),
  });
  assert.equal(login.status, 200, await login.clone().text());
  return { server, token: ((await login.json()) as { token: string }).token };
}

async function connectDevice(server: ServerProcess, serial: string): Promise<void> {
  const socket = await openSocket(server.socketUrl, {
    tls: await deviceTlsOptions(await deviceCert(serial)),
    reconnectAfterMs: () => 60_000,
  });
  sockets.push(socket);
  await joinChannel(socket.channel(`device:${FIRMWARE_UUID}`, { version: '1.0.0' }));
}

async function statusOf(session: Session, serials: string[]): Promise<string[]> {
  const res = await fetch(`${session.server.apiUrl}/api/v1/orgs/default/devices?q=crash-&limit=100`, {
    headers: { authorization: `Bearer ${session.token}` },
  });
  assert.equal(res.status, 200);
  const page = (await res.json()) as { items: { identifier: string; connection_status: string }[] };
  return serials.map((s) => page.items.find((d) => d.identifier === s)?.connection_status ?? 'missing');
}

const tmpDir = () => path.join(dataDir, 'blobs', 'tmp');
const partials = () => (existsSync(tmpDir()) ? readdirSync(tmpDir()).filter((n) => n.endsWith('.part')) : []);

/** Starts an image upload and leaves it hanging once its first bytes are on disk. */
async function hangingUpload(session: Session): Promise<http.ClientRequest> {
  const url = new URL(
    `${session.server.apiUrl}/api/v1/firmware?org=default&product=default&version=9.9.${Date.now() % 1000}`,
  );
  const req = http.request(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${session.token}`, 'content-type': 'application/octet-stream' },
  });
  req.on('error', () => undefined);
  const before = new Set(partials());
  req.write(Buffer.alloc(256 * 1024, 7));
  await waitFor(
    () => partials().some((n) => !before.has(n) && statSync(path.join(tmpDir(), n)).size > 0),
    10_000,
    'the upload to reach the temp folder',
  );
  return req;
}

async function dropSockets(): Promise<void> {
  await Promise.all(sockets.splice(0).map((s) => disconnectSocket(s)));
}

describe(`crash and restart of fleethub serve (${DATABASE_KIND})`, {
  skip: DATABASE_KIND !== 'pglite' && 'PGlite only: see the PostgreSQL suite below',
}, () => {
  test('after kill -9, the restarted single-node server shows every device offline at once and has no partial upload left', async () => {
    const serials = ['crash-pg-lite-1', 'crash-pg-lite-2'];
    const first = await start();
    for (const serial of serials) await connectDevice(first.server, serial);
    assert.deepEqual(await statusOf(first, serials), ['online', 'online']);
    const upload = await hangingUpload(first);
    await first.server.kill();
    upload.destroy();
    await dropSockets();
    assert.equal(partials().length, 1, 'the crash left its partial upload');

    // A new process: a new default node name, and the old node's heartbeat is seconds old.
    const second = await start();
    try {
      assert.deepEqual(await statusOf(second, serials), ['offline', 'offline']);
      assert.deepEqual(partials(), []);
    } finally {
      await second.server.kill();
    }
  });
});

describe(`crash and restart of a PostgreSQL node (${DATABASE_KIND})`, {
  skip: DATABASE_KIND !== 'postgres' && 'PostgreSQL only: set DATABASE_URL',
}, () => {
  test('another node leaves a dead node to the heartbeat rule; the same node name releases its own devices at once', async () => {
    const serials = ['crash-pg-1', 'crash-pg-2'];
    const first = await start({ nodeName: 'crash-node-a' });
    for (const serial of serials) await connectDevice(first.server, serial);
    const upload = await hangingUpload(first);
    await first.server.kill();
    upload.destroy();
    await dropSockets();

    // Node B cannot tell a crashed node A from a live one until A's heartbeat is 90 s old.
    const other = await start({ nodeName: 'crash-node-b' });
    try {
      assert.deepEqual(await statusOf(other, serials), ['online', 'online']);
      assert.equal(partials().length, 1, "a fresh partial upload may be a live node's: it stays");
    } finally {
      await other.server.kill();
    }

    // The partial upload is now past the bound (an hour without a write).
    const stale = path.join(tmpDir(), partials()[0]!);
    const past = new Date(Date.now() - 2 * 3600_000);
    utimesSync(stale, past, past);
    const again = await start({ nodeName: 'crash-node-a' });
    try {
      assert.deepEqual(await statusOf(again, serials), ['offline', 'offline']);
      assert.deepEqual(partials(), []);
    } finally {
      await again.server.kill();
    }
  });
});
