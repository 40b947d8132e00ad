/**
 * Who may speak for a device on an edge: an identity belongs to one protocol and one credential
 * kind, and an approved WiFiDogX gateway is only served on its credential. Real server, real
 * sockets: the official Phoenix client over mutual TLS, the simulated gateway with the real
 * client's reader, keyauth over TCP, the GRiSP board simulator, the Main Server REST API.
 */
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';
import { DeviceClient } from '../../device-client/index.ts';
import { GrispBoard } from '../../device-client/simulators/grisp.ts';
import { WifidogxGateway } from '../../device-client/simulators/wifidogx.ts';
import { runWifidogxCommand } from '../../server/cli/wifidogx.ts';
import { wifidogxEdgeOf } from '../../server/edges/wifidogx/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { deviceCert, deviceTlsOptions, getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { until } from '../helpers/until.ts';

let server: TestServer;
let tmp: string;
let baseFirmwareId: string;
const stops: Array<() => Promise<void>> = [];

const wsUrl = () => `${server.apiUrl.replace('http:', 'ws:')}/ws/wifidogx`;
const deviceBy = (identifier: string) =>
  server.database.db.selectFrom('devices').selectAll().where('identifier', '=', identifier).executeTakeFirstOrThrow();
const refusals = async (identifier: string) =>
  (
    await server.database.db.selectFrom('audit_log').selectAll().where('action', '=', 'device.claim_refused').execute()
  ).filter((r) => (r.details as Record<string, unknown>).identifier === identifier);

function gateway(deviceId: string, o: Partial<ConstructorParameters<typeof WifidogxGateway>[0]> = {}): WifidogxGateway {
  const g = new WifidogxGateway({ url: wsUrl(), deviceId, version: '9.9.9', reconnectMs: 60_000, ...o });
  stops.push(() => g.stop());
  return g;
}

/** A gateway claim of `identifier` is closed with a 4xxx code, sends nothing else, and is audited. */
async function assertClaimRefused(identifier: string, code: number): Promise<WifidogxGateway> {
  const impostor = gateway(identifier);
  await impostor.start();
  await until(() => impostor.lastClose, `the claim of ${identifier} closed`);
  assert.equal(impostor.lastClose!.code, code, impostor.lastClose!.reason);
  assert.deepEqual(impostor.received, [], 'the claimant received nothing');
  await until(async () => (await refusals(identifier)).length > 0, 'the refusal audited');
  await impostor.stop();
  return impostor;
}

async function phoenixDevice(serial: string): Promise<DeviceClient> {
  const pki = await getTestPki();
  const cred = await deviceCert(serial);
  const client = new DeviceClient({
    url: `${server.deviceUrl.replace(/^https/, 'wss')}/socket`,
    tls: { cert: cred.certPem, key: cred.keyPem, ca: pki.rootCa.certPem },
    stateDir: path.join(tmp, serial),
    firmware: { uuid: baseFirmwareId, version: '1.0.0' },
  });
  stops.push(() => client.stop());
  await client.start();
  await until(
    async () => (await deviceBy(serial).catch(() => undefined))?.connection_status === 'online',
    'the Phoenix device online',
  );
  return client;
}

/** A keyauth answer line. */
interface KeyauthAnswer {
  code: number;
  data?: Record<string, unknown>;
  error: { type: string; msg: string };
}

/** Sends keyauth's 101 for a fresh key on a raw TCP socket; resolves with the first answer line. */
async function keyauthHello(): Promise<{ fingerprint: string; answer: KeyauthAnswer }> {
  const { publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const fingerprint = createHash('sha256')
    .update(publicKey.export({ type: 'spki', format: 'der' }))
    .digest('hex');
  return { fingerprint, answer: await keyauthHelloWith(publicKey.export({ type: 'spki', format: 'pem' }).toString()) };
}

function keyauthHelloWith(pem: string): Promise<KeyauthAnswer> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port: server.keyauth!.port });
    let buffer = '';
    socket.setEncoding('utf8');
    socket.on('connect', () => socket.write(`${JSON.stringify({ code: 101, data: { key: pem } })}\n`));
    socket.on('data', (chunk: string) => {
      buffer += chunk;
      const nl = buffer.indexOf('\n');
      if (nl < 0) return;
      socket.destroy();
      resolve(JSON.parse(buffer.slice(0, nl)));
    });
    socket.on('error', reject);
  });
}

describe(`edge identity (${DATABASE_KIND})`, () => {
  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-identity-'));
    baseFirmwareId = (
      await server.call<{ id: string }>('POST', '/api/v1/firmware', {
        product: server.productId,
        org: server.orgId,
        version: '1.0.0',
        platform: 'sim',
        architecture: 'sim',
      })
    ).id;
  });
  after(async () => {
    for (const stop of stops) await stop();
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  describe('an identity belongs to one protocol', () => {
    it('refuses a WiFiDogX claim of an online Phoenix device’s serial, audits it, and leaves the device alone', async () => {
      const serial = `phx-${randomBytes(4).toString('hex')}`;
      await phoenixDevice(serial);
      const before = await deviceBy(serial);
      await assertClaimRefused(serial, 4010);
      const afterwards = await deviceBy(serial);
      assert.equal(afterwards.protocol, 'phoenix');
      assert.equal(afterwards.connection_status, 'online');
      assert.equal(afterwards.firmware_version, before.firmware_version);
      const attempts = await server.database.db
        .selectFrom('update_attempts')
        .select('id')
        .where('device_id', '=', before.id)
        .execute();
      assert.equal(attempts.length, 0);
      const [entry] = await refusals(serial);
      assert.equal(entry!.org_id, server.orgId);
      assert.equal((entry!.details as Record<string, unknown>).protocol, 'wifidogx');
      // Once the Phoenix link is gone the claim stays refused: the serial is not up for grabs.
      await assertClaimRefused(serial, 4010);
    });

    it('refuses a WiFiDogX claim of a Main Server device_id', async () => {
      const id = `pi-${randomBytes(4).toString('hex')}`;
      const res = await fetch(`${server.apiUrl}/api/main-server/register-device`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ device_id: id, name: 'Pi', ip: '10.0.0.2', extensions: [] }),
      });
      assert.equal(res.status, 202, await res.clone().text());
      await assertClaimRefused(id, 4010);
      const device = await deviceBy(id);
      assert.equal(device.protocol, 'main-server');
      assert.equal(device.connection_status, 'offline');
    });

    it('refuses a WiFiDogX claim of a keyauth client’s identifier', async () => {
      const { fingerprint, answer } = await keyauthHello();
      assert.equal(answer.code, 102);
      const identifier = `key-${fingerprint.slice(0, 16)}`;
      await assertClaimRefused(identifier, 4010);
      assert.equal((await deviceBy(identifier)).protocol, 'keyauth');
    });

    it('answers a keyauth key whose identifier another protocol holds with a keyauth error, not a server error', async () => {
      const { publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
      const fingerprint = createHash('sha256')
        .update(publicKey.export({ type: 'spki', format: 'der' }))
        .digest('hex');
      const identifier = `key-${fingerprint.slice(0, 16)}`;
      const squatter = gateway(identifier);
      await squatter.start();
      await until(
        async () => (await deviceBy(identifier).catch(() => undefined))?.protocol === 'wifidogx',
        'the gateway registered',
      );
      const answer = await keyauthHelloWith(publicKey.export({ type: 'spki', format: 'pem' }).toString());
      assert.equal(answer.code, 409, JSON.stringify(answer));
      assert.equal(answer.error.type, 'IdentityTaken');
      assert.doesNotMatch(answer.error.msg, /[0-9a-f]{8}-[0-9a-f]{4}-/, 'no device id revealed');
      assert.ok(
        (await refusals(identifier)).some((r) => (r.details as Record<string, unknown>).protocol === 'keyauth'),
      );
    });

    it('refuses a Phoenix device’s certificate on the GRiSP endpoint with a reason, keeping its protocol', async () => {
      const serial = `phx-grisp-${randomBytes(4).toString('hex')}`;
      await phoenixDevice(serial);
      const cred = await deviceCert(serial);
      const tls = await deviceTlsOptions(cred);
      const board = new GrispBoard({
        url: `${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`,
        tls: { cert: tls.cert!, key: tls.key!, ca: tls.ca },
        serial,
        version: '1.0.0',
        reconnectMs: 60_000,
      });
      stops.push(() => board.stop());
      await assert.rejects(board.start(), /409/);
      assert.equal((await deviceBy(serial)).protocol, 'phoenix');
      assert.ok((await refusals(serial)).some((r) => (r.details as Record<string, unknown>).protocol === 'grisp'));
    });

    it('refuses a GRiSP board’s certificate on the Phoenix socket (WebSocket and LongPoll), audits it, and leaves the board alone', async () => {
      const serial = `GRiSP2 device b${randomBytes(4).toString('hex')}`;
      const tls = await deviceTlsOptions(await deviceCert(serial));
      const board = new GrispBoard({
        url: `${server.deviceUrl.replace('https:', 'wss:')}/grisp-connect/ws`,
        tls: { cert: tls.cert!, key: tls.key!, ca: tls.ca },
        serial,
        version: '1.0.0',
        reconnectMs: 60_000,
      });
      stops.push(() => board.stop());
      await board.start();
      await until(
        async () => (await deviceBy(serial).catch(() => undefined))?.connection_status === 'online',
        'the board online',
      );
      const before = await deviceBy(serial);
      assert.equal(before.protocol, 'grisp');

      const ws = new WebSocket(`${server.deviceUrl.replace('https:', 'wss:')}/socket/websocket?vsn=2.0.0`, {
        cert: tls.cert,
        key: tls.key,
        ca: tls.ca,
      });
      const upgrade = await new Promise<{ status: number; body: string }>((resolve, reject) => {
        ws.once('open', () => reject(new Error('the Phoenix socket accepted a GRiSP board’s certificate')));
        ws.once('unexpected-response', (_req, res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        });
        ws.once('error', () => undefined);
      });
      assert.equal(upgrade.status, 409, upgrade.body);
      assert.match(upgrade.body, /registered to another protocol/);

      const poll = await new Promise<string>((resolve, reject) => {
        const req = https.get(
          `${server.deviceUrl}/socket/longpoll?vsn=2.0.0`,
          { cert: tls.cert, key: tls.key, ca: tls.ca, agent: false },
          (res) => {
            let body = '';
            res.on('data', (c: Buffer) => (body += c.toString()));
            res.on('end', () => resolve(body));
          },
        );
        req.once('error', reject);
      });
      assert.equal((JSON.parse(poll) as { status: number }).status, 403, poll);

      const refused = (await refusals(serial)).filter(
        (r) => (r.details as Record<string, unknown>).protocol === 'phoenix',
      );
      assert.equal(refused.length, 2, 'both refusals audited');
      assert.equal((refused[0]!.details as Record<string, unknown>).owner_protocol, 'grisp');
      const afterwards = await deviceBy(serial);
      assert.equal(afterwards.protocol, 'grisp');
      assert.equal(afterwards.connection_status, 'online', 'the board is still connected');
      assert.equal(afterwards.updated_at.getTime(), before.updated_at.getTime(), 'the board’s row is untouched');
    });
  });

  describe('an approved gateway is served on its credential only', () => {
    async function approvedGateway(): Promise<{ g: WifidogxGateway; credential: string }> {
      const g = gateway(`gw-${randomBytes(4).toString('hex')}`, { reconnectMs: 100 });
      await g.start();
      await until(
        async () => (await deviceBy(g.o.deviceId).catch(() => undefined))?.approval === 'pending',
        'registered pending',
      );
      const approved = await server.call<{ credential?: { token: string; ws_path: string } }>(
        'POST',
        `/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}/approve`,
      );
      if (approved.credential) g.useCredential(approved.credential.token);
      await until(async () => (await deviceBy(g.o.deviceId)).firmware_version === '9.9.9', 'served');
      return { g, credential: approved.credential?.token ?? '' };
    }

    it('issues a credential on approval, for the gateway’s WSServerPath, and serves the gateway on it', async () => {
      const g = gateway(`gw-${randomBytes(4).toString('hex')}`, { reconnectMs: 100 });
      await g.start();
      await until(
        async () => (await deviceBy(g.o.deviceId).catch(() => undefined))?.approval === 'pending',
        'registered pending',
      );
      const approved = await server.call<{ credential?: { token: string; ws_path: string } }>(
        'POST',
        `/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}/approve`,
      );
      assert.ok(approved.credential, 'approval issues a credential');
      assert.match(approved.credential.token, /^[A-Za-z0-9_-]{43}$/);
      assert.equal(approved.credential.ws_path, `/ws/wifidogx?credential=${approved.credential.token}`);
      // The link without it is not served as approved: it is closed so the gateway comes back with it.
      await until(() => g.lastClose?.code === 4001, 'the uncredentialed link closed');
      assert.deepEqual(g.received, []);
      g.useCredential(approved.credential.token);
      await until(() => g.received.some((m) => m.type === 'connect'), 'served on its credential');
      const state = await server.call<{ gateway: Record<string, unknown> }>(
        'GET',
        `/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}`,
      );
      assert.equal(state.gateway.credential_hash, undefined, 'the hash is never shown');
      assert.equal(typeof state.gateway.credential_issued_at, 'string');
    });

    it('approves from the CLI, printing the WSServerPath line the gateway needs, and serves the gateway on it', async () => {
      const g = gateway(`gw-${randomBytes(4).toString('hex')}`, { reconnectMs: 100 });
      await g.start();
      await until(
        async () => (await deviceBy(g.o.deviceId).catch(() => undefined))?.approval === 'pending',
        'registered pending',
      );
      const out: string[] = [];
      const io = {
        out: (t: string) => void out.push(t),
        err: (t: string) => void out.push(t),
        env: { FLEETHUB_URL: server.apiUrl, FLEETHUB_TOKEN: server.adminToken, HOME: tmp },
      };
      assert.equal(await runWifidogxCommand(['approve', g.o.deviceId], io), 0);
      const line = /WSServerPath \/ws\/wifidogx\?credential=([A-Za-z0-9_-]{43})/.exec(out.join(''));
      assert.ok(line, out.join(''));
      g.useCredential(line[1]!);
      await until(() => g.received.some((m) => m.type === 'connect'), 'served on the printed credential');
    });

    it('refuses an uncredentialed claim of an offline approved gateway, which then works on its credential', async () => {
      const { g } = await approvedGateway();
      await g.stop();
      await until(async () => (await deviceBy(g.o.deviceId)).connection_status === 'offline', 'offline');
      await assertClaimRefused(g.o.deviceId, 4001);
      assert.equal(
        (await deviceBy(g.o.deviceId)).connection_status,
        'offline',
        'the claim did not bring the gateway online',
      );
      const commands = await fetch(
        `${server.apiUrl}/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}/commands`,
        {
          method: 'POST',
          headers: { authorization: `Bearer ${server.adminToken}`, 'content-type': 'application/json' },
          body: JSON.stringify({
            type: 'auth',
            token: 'client-token',
            client_ip: '10.0.0.5',
            client_mac: 'aa:bb:cc:dd:ee:02',
            gw_id: 'gw-1',
            once_auth: false,
          }),
        },
      );
      assert.equal(commands.status, 409, 'no command is queued for a claimant');

      const count = g.received.length;
      await g.start();
      await until(
        () => g.received.length > count && g.received.slice(count).some((m) => m.type === 'connect'),
        'the real gateway served again',
      );
      const auth = await server.call<{ id: string }>(
        'POST',
        `/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}/commands`,
        {
          type: 'auth',
          token: 'client-token',
          client_ip: '10.0.0.5',
          client_mac: 'aa:bb:cc:dd:ee:02',
          gw_id: 'gw-1',
          once_auth: false,
        },
      );
      await until(
        () => g.received.some((m) => m.type === 'auth' && m.token === 'client-token'),
        'auth delivered to the real gateway',
      );
      assert.ok(auth.id);
    });

    it('refuses an uncredentialed claim of an online approved gateway without touching it', async () => {
      const { g } = await approvedGateway();
      const before = await deviceBy(g.o.deviceId);
      await assertClaimRefused(g.o.deviceId, 4001);
      const afterwards = await deviceBy(g.o.deviceId);
      assert.equal(afterwards.connection_status, 'online');
      assert.equal(afterwards.firmware_version, before.firmware_version);
      assert.equal(g.socket?.destroyed, false);
    });

    it('refuses a wrong credential, and an old one after rotation', async () => {
      const { g, credential } = await approvedGateway();
      const liar = gateway(g.o.deviceId, { credential: randomBytes(24).toString('base64url') });
      await liar.start();
      await until(() => liar.lastClose, 'closed');
      assert.equal(liar.lastClose!.code, 4001);
      assert.deepEqual(liar.received, []);

      const rotated = await server.call<{ token: string }>(
        'POST',
        `/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}/credential`,
      );
      assert.notEqual(rotated.token, credential);
      await until(() => g.lastClose?.code === 4001, 'the link on the old credential closed');
      const old = gateway(g.o.deviceId, { credential });
      await old.start();
      await until(() => old.lastClose, 'old credential refused');
      assert.equal(old.lastClose!.code, 4001);
      g.useCredential(rotated.token);
      const count = g.received.length;
      await until(() => g.received.slice(count).some((m) => m.type === 'connect'), 'served on the new credential');
    });

    // Revoking voids the credential: a leaked one does not survive revoke + re-approve.
    for (const via of ['generic', 'wifidogx'] as const) {
      it(`refuses the old credential after revoke (${via} route) and re-approval, and serves the new one`, async () => {
        const { g, credential } = await approvedGateway();
        const device = await deviceBy(g.o.deviceId);
        const revoke =
          via === 'generic'
            ? `/api/v1/orgs/${server.orgId}/devices/${device.id}/revoke`
            : `/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}/revoke`;
        await server.call('POST', revoke);
        await until(() => g.lastClose?.code === 4003, 'the revoked link closed');
        await g.stop();
        const approved = await server.call<{ credential?: { token: string } }>(
          'POST',
          `/api/v1/orgs/${server.orgId}/wifidogx/devices/${g.o.deviceId}/approve`,
        );
        assert.ok(approved.credential, 're-approval issues a new credential');
        assert.notEqual(approved.credential.token, credential);
        const old = gateway(g.o.deviceId, { credential });
        await old.start();
        await until(() => old.lastClose, 'old credential refused');
        assert.equal(old.lastClose!.code, 4001);
        assert.deepEqual(old.received, []);
        const fresh = gateway(g.o.deviceId, { credential: approved.credential.token });
        await fresh.start();
        await until(() => fresh.received.some((m) => m.type === 'connect'), 'served on the new credential');
      });
    }
  });

  describe('unidentified WiFiDogX sockets', () => {
    function silentSocket(): Promise<{ ws: WebSocket; closed: Promise<{ code: number; reason: string }> }> {
      return new Promise((resolve, reject) => {
        const ws = new WebSocket(wsUrl());
        const closed = new Promise<{ code: number; reason: string }>((r) =>
          ws.on('close', (code, reason) => r({ code, reason: reason.toString() })),
        );
        ws.on('open', () => resolve({ ws, closed }));
        ws.on('error', reject);
        stops.push(async () => ws.terminate());
      });
    }

    it('refuses sockets over the cap of connections that have not sent connect', async () => {
      const edge = wifidogxEdgeOf(server.api)!;
      edge.configure({ maxUnidentified: 2 });
      try {
        const a = await silentSocket();
        const b = await silentSocket();
        const c = await silentSocket();
        assert.equal((await c.closed).code, 1013);
        a.ws.close();
        await a.closed;
        await until(() => edge.unidentified() < 2, 'a slot freed');
        const d = await silentSocket();
        d.ws.send(JSON.stringify({ type: 'connect', device_id: `gw-${randomBytes(4).toString('hex')}` }));
        const e = await silentSocket();
        assert.equal(edge.unidentified(), 2);
        b.ws.close();
        e.ws.close();
        d.ws.close();
      } finally {
        edge.configure({ maxUnidentified: 1000 });
      }
    });

    it('closes a socket that sends no connect within the deadline', async () => {
      const edge = wifidogxEdgeOf(server.api)!;
      edge.configure({ timings: { identifyTimeoutMs: 300 } });
      try {
        const started = Date.now();
        const s = await silentSocket();
        const closed = await s.closed;
        assert.equal(closed.code, 4008);
        assert.ok(Date.now() - started < 3000);
      } finally {
        edge.configure({ timings: { identifyTimeoutMs: 10_000 } });
      }
    });
  });
});
