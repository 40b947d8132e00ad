/**
 * Every simulator says why it cannot connect, and the summary counts failures by reason: a stopped
 * server (connection refused), the wrong port (not TLS / not the protocol), and, where the protocol
 * uses TLS client certificates, a certificate from another PKI (unknown CA). Each run is bounded:
 * the simulation is stopped as soon as the reason is printed, or after 30 s.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { GrispBoard } from '../../device-client/simulators/grisp.ts';
import { KeyauthClient } from '../../device-client/simulators/keyauth.ts';
import { MainServerDevice } from '../../device-client/simulators/main-server.ts';
import type { ConnectionFailure } from '../../device-client/connection-failure.ts';
import type { CliIo } from '../../server/cli/client.ts';
import { main } from '../../server/cli/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { simulateUntil } from '../helpers/simulate.ts';

/** A port nothing listens on (bound, then closed). */
async function stoppedPort(): Promise<number> {
  const probe = net.createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const port = (probe.address() as net.AddressInfo).port;
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

/** A TCP server that accepts connections and calls `onSocket` with each; `close()` ends them all. */
async function tcpServer(onSocket: (socket: net.Socket) => void) {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    onSocket(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

describe(`every simulator says why it cannot connect (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let pkiDir: string;
  let foreignPki: string;
  let apiPort: number;
  let devicePort: number;
  let keyauthPort: number;
  let refusedPort: number;
  const quiet: CliIo = { out: () => undefined, err: () => undefined, env: {} };

  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-connection-failures-'));
    pkiDir = (await getTestPki()).dir;
    foreignPki = path.join(tmp, 'foreign-pki');
    assert.equal(await main(['certs', 'init', '--dir', foreignPki], quiet), 0);
    apiPort = Number(new URL(server.apiUrl).port);
    devicePort = Number(new URL(server.deviceUrl).port);
    keyauthPort = server.keyauth!.port;
    refusedPort = await stoppedPort();
  });
  after(async () => {
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  let run = 0;
  /**
   * `fleethub-device simulate --count 1 --protocol <protocol> --url <url>` until stderr names
   * `kind` (at most 30 s); its exit code, stdout (the summary table) and stderr.
   */
  async function simulate(protocol: string, url: string, kind: string, pki = pkiDir) {
    const dir = path.join(tmp, `run-${++run}`);
    const argv = ['--protocol', protocol, '--count', '1', '--url', url, '--serial-prefix', `cf${run}`];
    const { code, out, err } = await simulateUntil(`: ${kind}`, [
      ...argv,
      '--certs',
      path.join(dir, 'certs'),
      '--pki',
      pki,
    ]);
    assert.equal(code, 0, err);
    const line = new RegExp(`^connect failed: ${kind}\\s+[1-9]\\d*$`, 'm');
    assert.match(out, line, `the summary counts "${kind}":\n${out}\n${err}`);
    assert.match(out, /^connected\s+0$/m);
    return { out, err };
  }

  const cases: Array<{ protocol: string; url: () => string; kind: string; says: RegExp; pki?: () => string }> = [
    // Phoenix
    {
      protocol: 'phoenix',
      url: () => `wss://127.0.0.1:${apiPort}/socket`,
      kind: 'not TLS',
      says: /the port does not speak TLS/,
    },
    // GRiSP: mutual TLS on the device port
    {
      protocol: 'grisp',
      url: () => `wss://127.0.0.1:${refusedPort}/grisp-connect/ws`,
      kind: 'connection refused',
      says: /connection refused \(127\.0\.0\.1:\d+\): is the server running/,
    },
    {
      protocol: 'grisp',
      url: () => `wss://127.0.0.1:${apiPort}/grisp-connect/ws`,
      kind: 'not TLS',
      says: /the port does not speak TLS/,
    },
    {
      protocol: 'grisp',
      url: () => `wss://localhost:${devicePort}/grisp-connect/ws`,
      kind: 'unknown CA',
      says: /unknown CA: the server's certificate is not signed by the CA given to the device/,
      pki: () => foreignPki,
    },
    // WiFiDogX: plain WebSocket on the API port
    {
      protocol: 'wifidogx',
      url: () => `ws://127.0.0.1:${refusedPort}/ws/wifidogx`,
      kind: 'connection refused',
      says: /connection refused \(127\.0\.0\.1:\d+\)/,
    },
    {
      protocol: 'wifidogx',
      url: () => `ws://127.0.0.1:${keyauthPort}/ws/wifidogx`,
      kind: 'not the protocol',
      says: /the port does not speak HTTP: it answered "\{.*/,
    },
    // Main Server: REST on the API port
    {
      protocol: 'main-server',
      url: () => `http://127.0.0.1:${refusedPort}`,
      kind: 'connection refused',
      says: /connection refused \(127\.0\.0\.1:\d+\)/,
    },
    {
      protocol: 'main-server',
      url: () => `http://127.0.0.1:${keyauthPort}`,
      kind: 'not HTTP',
      says: /the port does not answer HTTP/,
    },
    // keyauth: JSON lines over TCP
    {
      protocol: 'keyauth',
      url: () => `tcp://127.0.0.1:${refusedPort}`,
      kind: 'connection refused',
      says: /connection refused \(127\.0\.0\.1:\d+\)/,
    },
    {
      protocol: 'keyauth',
      url: () => `tcp://127.0.0.1:${apiPort}`,
      kind: 'not the protocol',
      says: /the port does not speak keyauth: it answered "HTTP\/1\.1 400 Bad Request", not a JSON line/,
    },
  ];
  for (const c of cases)
    test(`${c.protocol}: ${c.kind}`, async () => {
      const { err } = await simulate(c.protocol, c.url(), c.kind, c.pki?.());
      assert.match(err, new RegExp(`cf\\d+-0000: cannot connect to \\S+: ${c.kind}`), err);
      assert.match(err, c.says, err);
    });

  test('a GRiSP board schedules one reconnect per failed attempt', async () => {
    let accepted = 0;
    let failures = 0;
    let most = 0;
    // Every connection is cut at once: each attempt fails with "connection reset" or similar.
    const port = await tcpServer((socket) => {
      accepted++;
      most = Math.max(most, accepted - failures);
      socket.destroy();
    });
    const pki = await getTestPki();
    const board = new GrispBoard({
      url: `wss://127.0.0.1:${port.port}/grisp-connect/ws`,
      tls: { cert: pki.server.certPem, key: pki.server.keyPem, ca: pki.rootCa.certPem },
      serial: 'reconnects',
      version: '1.0.0',
      reconnectMs: 5,
    });
    const failed = new Promise<void>((resolve) =>
      board.on('connect_error', () => {
        if (++failures === 12) resolve();
      }),
    );
    await board.start().catch(() => undefined);
    await Promise.race([
      failed,
      new Promise((_, reject) => setTimeout(() => reject(new Error(`only ${failures} failures`)), 30_000).unref()),
    ]);
    await board.stop();
    await port.close();
    // One attempt in flight at a time: never more accepted connections than failures + 1.
    assert.ok(most <= 1, `${most} attempts were in flight at once (${accepted} accepted, ${failures} failed)`);
  });

  test('the Main Server device starts against an unreachable server, says why and keeps trying', async () => {
    const failures: ConnectionFailure[] = [];
    const device = new MainServerDevice({
      url: `http://127.0.0.1:${refusedPort}`,
      deviceId: 'ms-unreachable',
      stateDir: path.join(tmp, 'ms-unreachable'),
      extensions: [{ name: 'firmware', version: '1.0.0' }],
      pollIntervalMs: 20,
    });
    const twice = new Promise<void>((resolve) =>
      device.on('connect_error', (f: ConnectionFailure) => {
        if (failures.push(f) === 2) resolve();
      }),
    );
    await device.start(); // resolves: before the fix it threw "fetch failed"
    await Promise.race([
      twice,
      new Promise((_, reject) => setTimeout(() => reject(new Error('no retry')), 30_000).unref()),
    ]);
    await device.stop();
    assert.equal(failures[0]!.kind, 'connection refused');
    assert.equal(failures[1]!.kind, 'connection refused');
  });

  test('the keyauth client fails an attempt on a port that takes the line and never answers', async () => {
    const silent = await tcpServer(() => undefined);
    const client = new KeyauthClient({
      host: '127.0.0.1',
      port: silent.port,
      stateDir: path.join(tmp, 'keyauth-silent'),
      version: '1.0.0',
      replyTimeoutMs: 200,
      reconnectMs: 60_000,
    });
    const failure = new Promise<ConnectionFailure>((resolve) => client.once('connect_error', resolve));
    await client.start();
    const f = await Promise.race([
      failure,
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error('no failure')), 30_000).unref()),
    ]);
    await client.stop();
    await silent.close();
    assert.equal(f.kind, 'not the protocol');
    assert.match(f.message, /no answer within 200 ms to the authorisation request \(101\)/);
  });
});
