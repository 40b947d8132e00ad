/**
 * keyauth (public-key TCP) against the real server over real TCP: handshake (unknown key → 102
 * and pending; approved → 103), envelopes, actions, limits (tampered envelope, plaintext after
 * 103, oversize line, slowloris, flood), and a mixed group of a Main Server Pi and a keyauth
 * client retargeted once.
 */
import assert from 'node:assert/strict';
import { createHash, createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startKeyauth, type KeyauthServer } from '../../server/edges/keyauth/index.ts';
import { open, seal } from '../../shared/keyauth-envelope.ts';
import { createZip } from '../../shared/main-server-package.ts';
import { runKeyauthCommand } from '../../server/cli/keyauth.ts';
import { KeyauthClient } from '../../device-client/simulators/keyauth.ts';
import { MainServerDevice } from '../../device-client/simulators/main-server.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

let server: TestServer;
let strict: KeyauthServer;
const tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-keyauth-'));
const sockets = new Set<net.Socket>();

/** One keyauth line, plain or opened from its envelope, as the tests read it. */
interface Line {
  code: number;
  enc?: string;
  data: {
    key: string;
    fingerprint: string;
    device_id: string;
    state: string;
    update_available: boolean;
    update: { version: string; sha256: string; url: string };
  };
  error: { type: string; msg: string };
}

/** A raw line-oriented TCP client: `send` a line, `next` the next line, `closed` when the server hangs up. */
class Wire {
  readonly socket: net.Socket;
  #buffer = '';
  #lines: string[] = [];
  #waiters: Array<(line: string | null) => void> = [];
  ended = false;
  readonly closed: Promise<void>;

  constructor(port: number) {
    this.socket = net.connect({ host: '127.0.0.1', port });
    sockets.add(this.socket);
    this.socket.setEncoding('utf8');
    this.socket.on('data', (chunk: string) => {
      this.#buffer += chunk;
      for (let nl = this.#buffer.indexOf('\n'); nl >= 0; nl = this.#buffer.indexOf('\n')) {
        const line = this.#buffer.slice(0, nl);
        this.#buffer = this.#buffer.slice(nl + 1);
        const w = this.#waiters.shift();
        if (w) w(line);
        else this.#lines.push(line);
      }
    });
    this.socket.on('error', () => undefined);
    this.closed = new Promise((resolve) =>
      this.socket.on('close', () => {
        this.ended = true;
        for (const w of this.#waiters.splice(0)) w(null);
        resolve();
      }),
    );
  }

  send(message: unknown): void {
    this.socket.write(`${typeof message === 'string' ? message : JSON.stringify(message)}\n`);
  }

  async next(): Promise<Line> {
    const line =
      this.#lines.shift() ??
      (this.ended ? null : await new Promise<string | null>((resolve) => this.#waiters.push(resolve)));
    if (line === null) throw new Error('the server closed the connection');
    return JSON.parse(line);
  }

  close(): void {
    this.socket.destroy();
  }
}

function clientKey(): { privateKey: KeyObject; pem: string; fingerprint: string } {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    privateKey,
    pem: publicKey.export({ type: 'spki', format: 'pem' }).toString(),
    fingerprint: createHash('sha256')
      .update(publicKey.export({ type: 'spki', format: 'der' }))
      .digest('hex'),
  };
}

/** Connects, handshakes (approving the key first), returns the wire and keys. */
async function authorised(port = server.keyauth!.port): Promise<{
  wire: Wire;
  key: ReturnType<typeof clientKey>;
  serverKey: KeyObject;
  call(action: string, data?: Record<string, unknown>): Promise<Line>;
}> {
  const key = clientKey();
  const wire = new Wire(port);
  wire.send({ code: 101, data: { key: key.pem } });
  assert.equal((await wire.next()).code, 102);
  await server.call('POST', `/api/v1/keyauth/clients/${key.fingerprint}/approve`);
  wire.send({ code: 101, data: { key: key.pem } });
  const hello = await wire.next();
  assert.equal(hello.code, 103);
  const serverKey = createPublicKey(hello.data.key);
  const call = async (action: string, data: Record<string, unknown> = {}) => {
    wire.send(seal(serverKey, { action, data }));
    const reply = await wire.next();
    assert.ok(reply.enc, `expected an envelope, got ${JSON.stringify(reply)}`);
    return open(key.privateKey, reply) as Line;
  };
  return { wire, key, serverKey, call };
}

async function uploadPackage(
  extension: string,
  version: string,
): Promise<{ package_id: string; extension_id: number; sha256: string }> {
  const zip = createZip([
    { name: 'device_update.json', data: JSON.stringify({ extension, version }) },
    { name: 'payload.bin', data: `image ${version}` },
  ]);
  const res = await fetch(`${server.apiUrl}/api/v1/main-server/packages`, {
    method: 'POST',
    headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/zip' },
    body: new Uint8Array(zip),
  });
  assert.equal(res.status, 201);
  return (await res.json()) as { package_id: string; extension_id: number; sha256: string };
}

before(async () => {
  server = await startTestServer();
  assert.ok(server.keyauth, 'startServer starts the keyauth listener on an ephemeral port');
  strict = await startKeyauth({
    fleet: server.fleet,
    pubsub: server.pubsub,
    log: server.log,
    secret: server.secret,
    port: 0,
    downloadBaseUrl: () => server.apiUrl,
    limits: { handshakeTimeoutMs: 400, idleTimeoutMs: 600, maxRequestsPerSecond: 5 },
  });
});

after(async () => {
  for (const s of sockets) s.destroy();
  await strict?.close();
  await server?.close();
  rmSync(tmp, { recursive: true, force: true });
});

describe(`keyauth TCP on ${DATABASE_KIND}`, () => {
  test('an unknown key gets 102 and is recorded as pending; once approved by fingerprint the same key gets 103 with the server key', async () => {
    const key = clientKey();
    const wire = new Wire(server.keyauth!.port);
    wire.send({ code: 101, data: { key: key.pem, name: 'hall-sensor' } });
    const refused = await wire.next();
    assert.equal(refused.code, 102);
    assert.equal(refused.error.type, 'KeyPending');
    assert.equal(refused.data.fingerprint, key.fingerprint);
    const out: string[] = [];
    const io = {
      out: (t: string) => void out.push(t),
      err: (t: string) => void out.push(t),
      env: { FLEETHUB_URL: server.apiUrl, FLEETHUB_TOKEN: server.adminToken, HOME: tmp },
    };
    assert.equal(await runKeyauthCommand(['list', '--pending'], io), 0);
    assert.match(out.join(''), new RegExp(`${key.fingerprint}.*hall-sensor.*pending`));
    assert.equal(await runKeyauthCommand(['approve', key.fingerprint.slice(0, 12)], io), 0);
    wire.send({ code: 101, data: { key: key.pem } });
    const accepted = await wire.next();
    assert.equal(accepted.code, 103);
    assert.equal(accepted.data.key, server.keyauth!.publicKeyPem);
    const device = await server.database.db
      .selectFrom('devices')
      .selectAll()
      .where('identifier', '=', `key-${key.fingerprint.slice(0, 16)}`)
      .executeTakeFirstOrThrow();
    assert.deepEqual([device.protocol, device.approval, device.connection_status], ['keyauth', 'approved', 'online']);
    wire.close();
  });

  test('the server key pair is fresh at every start', () => {
    assert.notEqual(strict.publicKeyPem, server.keyauth!.publicKeyPem);
    assert.notEqual(strict.fingerprint, server.keyauth!.fingerprint);
  });

  test('bad 101 messages are answered 400 and three of them close the connection', async () => {
    const wire = new Wire(server.keyauth!.port);
    wire.send({ code: 101, data: { key: 'not a key' } });
    assert.equal((await wire.next()).error.type, 'InvalidKey');
    const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' })
      .publicKey.export({ type: 'spki', format: 'pem' })
      .toString();
    wire.send({ code: 101, data: { key: ec } });
    assert.equal((await wire.next()).error.type, 'InvalidKey');
    wire.send('not json');
    assert.equal((await wire.next()).code, 400);
    await wire.closed;
  });

  test('actions over envelopes: status, check_update with a signed URL whose download matches the sha256, report progress and success, heartbeat', async () => {
    const { wire, call } = await authorised();
    const status = await call('status', { version: '1.0.0' });
    assert.equal(status.code, 200);
    assert.equal(status.data.update_available, false);
    assert.deepEqual(await call('check_update', {}), { code: 200, data: { update: null } });
    const pkg = await uploadPackage('firmware', '1.1.0');
    const deviceId = (
      await server.database.db
        .selectFrom('devices')
        .select('id')
        .where('identifier', '=', status.data.device_id)
        .executeTakeFirstOrThrow()
    ).id;
    await server.call('PUT', `/api/v1/orgs/default/devices/${deviceId}/target`, { firmware_id: pkg.package_id });
    const offer = await call('check_update', {});
    assert.equal(offer.code, 200);
    assert.equal(offer.data.update.version, '1.1.0');
    assert.equal(offer.data.update.sha256, pkg.sha256);
    const download = await fetch(offer.data.update.url);
    assert.equal(download.status, 200);
    assert.equal(
      createHash('sha256')
        .update(Buffer.from(await download.arrayBuffer()))
        .digest('hex'),
      pkg.sha256,
    );
    const tampered = offer.data.update.url.replace(/sig=[^&]+/, 'sig=AAAA');
    assert.equal((await fetch(tampered)).status, 403);
    assert.equal(
      (await call('report', { type: 'progress', version: '1.1.0', percent: 40, bytes: 40, total: 100 })).data.state,
      'downloading',
    );
    assert.equal((await call('report', { type: 'success', version: '1.1.0' })).data.state, 'succeeded');
    assert.equal((await call('heartbeat')).code, 200);
    assert.equal((await call('reboot')).code, 404);
    assert.equal((await call('report', { type: 'progress', version: '9.9.9' })).code, 404);
    assert.equal((await call('status', { version: 'latest' })).code, 400);
    wire.close();
    await wire.closed;
  });

  test('after 103 a tampered envelope and plaintext are refused with 400, and repeated failures close the connection', async () => {
    const { wire, serverKey } = await authorised();
    const env = seal(serverKey, { action: 'heartbeat', data: {} });
    const ct = Buffer.from(env.enc.ct, 'base64');
    ct[0]! ^= 0x01;
    wire.send({ enc: { ...env.enc, ct: ct.toString('base64') } });
    const tamperedReply = await wire.next();
    assert.deepEqual([tamperedReply.code, tamperedReply.error.type], [400, 'DecryptionFailed']);
    wire.send({ action: 'heartbeat', data: {} });
    const plain = await wire.next();
    assert.deepEqual([plain.code, plain.error.type], [400, 'NotEncrypted']);
    wire.send({ enc: { key: 'AAAA', iv: 'AAAA', ct: '', tag: 'AAAA' } });
    assert.equal((await wire.next()).code, 400);
    await wire.closed;
  });

  test('a revoked key is disconnected at once and gets 102 afterwards', async () => {
    const { wire, key } = await authorised();
    await server.call('POST', `/api/v1/keyauth/clients/${key.fingerprint}/revoke`);
    await wire.closed;
    const again = new Wire(server.keyauth!.port);
    again.send({ code: 101, data: { key: key.pem } });
    const refused = await again.next();
    assert.deepEqual([refused.code, refused.error.type], [102, 'KeyRevoked']);
    again.close();
  });

  test('a line longer than 64 KiB is refused and the connection closed', async () => {
    const wire = new Wire(server.keyauth!.port);
    wire.socket.write(`{"code":101,"data":{"key":"${'A'.repeat(70 * 1024)}`);
    const reply = await wire.next();
    assert.deepEqual([reply.code, reply.error.type], [400, 'LineTooLong']);
    await wire.closed;
  });

  test('a client that dribbles bytes without finishing a line (slowloris) is closed by the handshake timeout', async () => {
    const wire = new Wire(strict.port);
    const timer = setInterval(() => wire.socket.write('{'), 100);
    try {
      await wire.closed;
    } finally {
      clearInterval(timer);
    }
    // The server hung up (this client never closes); its side of the socket goes away too.
    for (let i = 0; i < 50 && strict.connections() > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(strict.connections(), 0);
  });

  test('a client flooding requests is rate limited and disconnected', async () => {
    const wire = new Wire(strict.port);
    const key = clientKey();
    wire.socket.write(`${JSON.stringify({ code: 101, data: { key: key.pem } })}\n`.repeat(200));
    const replies: Line[] = [];
    for (;;) {
      try {
        replies.push(await wire.next());
      } catch {
        break;
      }
    }
    assert.ok(
      replies.some((r) => r.error?.type === 'RateLimited'),
      JSON.stringify(replies.slice(-3)),
    );
    assert.ok(replies.length < 200);
    await wire.closed;
  });

  test('a mixed group of a Main Server Pi and a keyauth client retargeted once reaches the target on both', async () => {
    const pi = new MainServerDevice({
      url: server.apiUrl,
      deviceId: 'mixed-pi',
      stateDir: path.join(tmp, 'pi'),
      extensions: [{ name: 'firmware', version: '1.0.0' }],
      pollIntervalMs: 200,
      heartbeatIntervalMs: 60_000,
    });
    const client = new KeyauthClient({
      host: '127.0.0.1',
      port: server.keyauth!.port,
      stateDir: path.join(tmp, 'client'),
      version: '1.0.0',
      pollIntervalMs: 200,
    });
    const fingerprint = createHash('sha256')
      .update(createPublicKey(client.publicKeyPem).export({ type: 'spki', format: 'der' }))
      .digest('hex');
    try {
      await pi.start();
      await client.start();
      await server.call('POST', '/api/v1/main-server/devices/mixed-pi/approve');
      await server.call('POST', `/api/v1/keyauth/clients/${fingerprint}/approve`);
      await Promise.all([new Promise((r) => pi.once('approved', r)), new Promise((r) => client.once('authorised', r))]);
      const ids = await server.database.db
        .selectFrom('devices')
        .select('id')
        .where('identifier', 'in', ['mixed-pi', `key-${fingerprint.slice(0, 16)}`])
        .execute();
      assert.equal(ids.length, 2);
      const group = await server.call<{ id: string }>('POST', '/api/v1/orgs/default/groups', {
        product: 'default',
        name: 'mixed',
      });
      await server.call('POST', `/api/v1/orgs/default/groups/${group.id}/devices`, { devices: ids.map((d) => d.id) });
      const pkg = await uploadPackage('firmware', '3.0.0');
      const done = Promise.all([
        new Promise((r) => pi.on('update_succeeded', (u: { version: string }) => u.version === '3.0.0' && r(u))),
        new Promise((r) => client.on('update_succeeded', (u: { version: string }) => u.version === '3.0.0' && r(u))),
      ]);
      await server.call('PUT', `/api/v1/orgs/default/groups/${group.id}/target`, { firmware_id: pkg.package_id });
      await done;
      const states = await server.database.db
        .selectFrom('update_attempts')
        .select(['device_id', 'state'])
        .where('firmware_id', '=', pkg.package_id)
        .execute();
      assert.deepEqual(states.map((s) => s.state).sort(), ['succeeded', 'succeeded']);
      const versions = await server.database.db
        .selectFrom('device_components')
        .select('version')
        .where('component', '=', 'firmware')
        .where(
          'device_id',
          'in',
          ids.map((d) => d.id),
        )
        .execute();
      assert.deepEqual(
        versions.map((v) => v.version),
        ['3.0.0', '3.0.0'],
      );
    } finally {
      await pi.stop();
      await client.stop();
    }
  });
});
