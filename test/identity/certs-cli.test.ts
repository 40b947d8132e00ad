import assert from 'node:assert/strict';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { CliIo } from '../../server/cli/client.ts';
import { runCertsCommand as runCerts } from '../../server/cli/certs.ts';

describe('fleethub certs', () => {
  let tmp: string;
  let output: string[];
  const io: CliIo = {
    out: (t) => void output.push(t.replace(/\n$/, '')),
    err: (t) => void output.push(t.replace(/\n$/, '')),
    env: process.env,
  };
  const runCertsCommand = (argv: string[]) => runCerts(argv, io);

  before(() => {
    tmp = mkdtempSync(path.join(os.tmpdir(), 'fleethub-certs-cli-'));
    output = [];
  });

  after(() => {
    rmSync(tmp, { recursive: true, force: true });
  });

  const snapshot = (dir: string) =>
    Object.fromEntries(
      readdirSync(dir)
        .sort()
        .map((f) => [f, readFileSync(path.join(dir, f), 'utf8')]),
    );

  test('certs init creates the root CA, signer CA and server certificate with private keys mode 0600', async () => {
    const dir = path.join(tmp, 'pki');
    assert.equal(await runCertsCommand(['init', '--dir', dir]), 0);
    assert.deepEqual(readdirSync(dir).sort(), [
      'root-ca.key',
      'root-ca.pem',
      'server.key',
      'server.pem',
      'signer-ca.key',
      'signer-ca.pem',
    ]);
    for (const key of ['root-ca.key', 'signer-ca.key', 'server.key']) {
      assert.equal(statSync(path.join(dir, key)).mode & 0o777, 0o600, key);
    }
    const root = new X509Certificate(readFileSync(path.join(dir, 'root-ca.pem')));
    const signer = new X509Certificate(readFileSync(path.join(dir, 'signer-ca.pem')));
    const server = new X509Certificate(readFileSync(path.join(dir, 'server.pem')));
    assert.ok(root.ca && signer.ca && !server.ca);
    assert.ok(signer.verify(root.publicKey), 'the signer CA is signed by the root');
    assert.ok(server.verify(root.publicKey), 'the server certificate is signed by the root');
    assert.ok(server.checkHost('localhost') && server.checkIP('127.0.0.1') && server.checkIP('::1'));
  });

  test('certs init run a second time leaves every file byte-identical', async () => {
    const dir = path.join(tmp, 'pki');
    const first = snapshot(dir);
    output.length = 0;
    assert.equal(await runCertsCommand(['init', '--dir', dir]), 0);
    assert.deepEqual(snapshot(dir), first);
    assert.match(output.join('\n'), /nothing created/);
  });

  test('certs init re-issues a deleted certificate for the key that is still there', async () => {
    const dir = path.join(tmp, 'pki');
    const serverKey = readFileSync(path.join(dir, 'server.key'), 'utf8');
    rmSync(path.join(dir, 'server.pem'));
    assert.equal(await runCertsCommand(['init', '--dir', dir, '--host', 'fleet.example.test']), 0);
    assert.equal(readFileSync(path.join(dir, 'server.key'), 'utf8'), serverKey);
    const server = new X509Certificate(readFileSync(path.join(dir, 'server.pem')));
    assert.ok(server.checkPrivateKey(createPrivateKey(serverKey)));
    assert.ok(server.checkHost('fleet.example.test'));
  });

  test('certs device writes cert.pem, key.pem and ca.pem for the serial', async () => {
    const dir = path.join(tmp, 'pki');
    const out = path.join(tmp, 'device-SN-7');
    assert.equal(await runCertsCommand(['device', 'SN-7', '--out', out, '--dir', dir]), 0);
    assert.deepEqual(readdirSync(out).sort(), ['ca.pem', 'cert.pem', 'key.pem']);
    assert.equal(statSync(path.join(out, 'key.pem')).mode & 0o777, 0o600);
    const cert = new X509Certificate(readFileSync(path.join(out, 'cert.pem')));
    assert.equal(
      cert.subject.split('\n').find((l) => l.startsWith('CN=')),
      'CN=SN-7',
    );
    assert.ok(cert.checkPrivateKey(createPrivateKey(readFileSync(path.join(out, 'key.pem')))));
    const signer = new X509Certificate(readFileSync(path.join(dir, 'signer-ca.pem')));
    assert.ok(cert.verify(signer.publicKey), 'issued by the signer CA');
    assert.equal(readFileSync(path.join(out, 'ca.pem'), 'utf8'), readFileSync(path.join(dir, 'root-ca.pem'), 'utf8'));
    assert.ok(
      new X509Certificate(readFileSync(path.join(dir, 'server.pem'))).verify(
        new X509Certificate(readFileSync(path.join(out, 'ca.pem'))).publicKey,
      ),
      'ca.pem verifies the server certificate',
    );
  });

  test('certs device refuses to overwrite an existing device key', async () => {
    const dir = path.join(tmp, 'pki');
    const out = path.join(tmp, 'device-SN-7');
    const key = readFileSync(path.join(out, 'key.pem'), 'utf8');
    output.length = 0;
    assert.equal(await runCertsCommand(['device', 'SN-7', '--out', out, '--dir', dir]), 1);
    assert.match(output.join('\n'), /PKI_KEY_EXISTS/);
    assert.equal(readFileSync(path.join(out, 'key.pem'), 'utf8'), key);
  });

  test('certs device before certs init tells the user to run init', async () => {
    output.length = 0;
    assert.equal(
      await runCertsCommand(['device', 'SN-8', '--out', path.join(tmp, 'x'), '--dir', path.join(tmp, 'empty')]),
      1,
    );
    assert.match(output.join('\n'), /PKI_NOT_INITIALISED.*certs init/);
  });

  test('certs --help prints the usage and a missing --out is a usage error', async () => {
    output.length = 0;
    assert.equal(await runCertsCommand(['--help']), 0);
    assert.match(output.join('\n'), /Usage: fleethub certs/);
    assert.equal(await runCertsCommand(['device', 'SN-9']), 2);
  });
});
