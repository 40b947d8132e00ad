import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { CliIo } from '../../server/cli/client.ts';
import { main } from '../../server/cli/index.ts';
import { DATABASE_KIND } from '../helpers/db.ts';
import { getTestPki } from '../helpers/pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';
import { simulateUntil } from '../helpers/simulate.ts';
import { until } from '../helpers/until.ts';

const DEVICE_BIN = path.resolve(import.meta.dirname, '../../bin/fleethub-device.js');

describe(`fleethub-device connect and simulate tell why (${DATABASE_KIND})`, () => {
  let server: TestServer;
  let tmp: string;
  let socketUrl: string;
  const quiet: CliIo = { out: () => undefined, err: () => undefined, env: {} };

  before(async () => {
    server = await startTestServer();
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-device-cli-'));
    socketUrl = `${server.deviceUrl.replace(/^https/, 'wss')}/socket`;
  });
  after(async () => {
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  test('connect as the banner prints it: a fresh data directory, no firmware flags, state under data/', async () => {
    const cwd = path.join(tmp, 'fresh');
    const pki = await getTestPki();
    const issued = await main(
      ['certs', 'device', 'dev-0001', '--out', path.join(cwd, 'data/dev-0001'), '--dir', pki.dir],
      quiet,
    );
    assert.equal(issued, 0);
    const env = { ...process.env };
    delete env.FLEETHUB_DATA_DIR;
    const child = spawn(
      process.execPath,
      [
        DEVICE_BIN,
        'connect',
        '--url',
        socketUrl,
        '--cert',
        'data/dev-0001/cert.pem',
        '--key',
        'data/dev-0001/key.pem',
        '--ca',
        'data/dev-0001/ca.pem',
      ],
      { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let log = '';
    child.stderr!.setEncoding('utf8').on('data', (t: string) => {
      log += t;
    });
    const exited = once(child, 'exit');
    try {
      await until(() => /joined device:/.test(log) || child.exitCode !== null, 'the device to join', 60_000);
      assert.match(log, /running 0\.0\.1 \([0-9a-f-]{36}\); state in .*data\/device-state\/dev-0001/);
      assert.match(log, /joined device:[0-9a-f-]{36}; groups: \(none\)/);
      assert.ok(existsSync(path.join(cwd, 'data/device-state/dev-0001')));
      const device = await server.call<{ connection_status: string; firmware_version: string }>(
        'GET',
        '/api/v1/orgs/default/devices/dev-0001',
      );
      assert.equal(device.firmware_version, '0.0.1');
    } finally {
      child.kill('SIGTERM');
    }
    const [code] = await exited;
    assert.equal(code, 0, log);
  });

  test('simulate with certificates from another PKI reports "unknown CA" and counts it', async () => {
    const other = path.join(tmp, 'other-pki');
    assert.equal(await main(['certs', 'init', '--dir', other], quiet), 0);
    const res = await simulateUntil(/unknown CA/, [
      '--count',
      '2',
      '--url',
      socketUrl,
      '--pki',
      other,
      '--certs',
      path.join(tmp, 'foreign-certs'),
      '--serial-prefix',
      'foreign',
    ]);
    assert.equal(res.code, 0, res.err);
    assert.match(
      res.err,
      // Certificates and CA from another PKI: the device does not trust the server either.
      /foreign-000[01]: cannot connect to .*: unknown CA: the server's certificate is not signed by the CA given to the device/,
    );
    assert.match(res.out, /^connect failed: unknown CA\s+[1-9]\d*$/m);
    assert.match(res.out, /^connected\s+0$/m);
  });

  test('simulate against a stopped server reports "connection refused" and counts it', async () => {
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    const port = (probe.address() as { port: number }).port;
    await new Promise((resolve) => probe.close(resolve));
    const pki = await getTestPki();
    const res = await simulateUntil(/connection refused/, [
      '--count',
      '1',
      '--url',
      `wss://localhost:${port}/socket`,
      '--pki',
      pki.dir,
      '--certs',
      path.join(tmp, 'stopped-certs'),
    ]);
    assert.equal(res.code, 0, res.err);
    assert.match(res.err, new RegExp(`connection refused \\(127\\.0\\.0\\.1:${port}\\): is the server running`));
    assert.match(res.out, /^connect failed: connection refused\s+[1-9]\d*$/m);
  });
});
